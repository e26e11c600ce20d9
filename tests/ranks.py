"""Runs a function on N gloo ranks spawned by the test, and collects what each returns."""

import os
import socket
import traceback
from typing import Any, Callable, List

import torch.distributed as dist
import torch.multiprocessing as mp

from triton_interpreter import patch_the_language_once_per_launch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    patch_the_language_once_per_launch()  # in every rank, whether its test module imports conftest.py or not
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out[rank] = ("ok", fn(rank, world, *args))
    except BaseException:
        out[rank] = ("error", traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, world: int, *args: Any) -> List[Any]:
    """fn(rank, world, *args) on ``world`` CPU ranks of one gloo process group; its return values by rank."""
    with mp.Manager() as manager:
        out = manager.dict()
        try:
            mp.spawn(_worker, args=(world, _free_port(), fn, args, out), nprocs=world)
        except mp.ProcessRaisedException:
            errors = [out[r][1] for r in range(world) if r in out and out[r][0] == "error"]
            raise AssertionError("\n".join(errors) or "a rank failed") from None
        return [out[r][1] for r in range(world)]
