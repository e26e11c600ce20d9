"""Runs a function on N gloo ranks and collects what each returns.

The ranks of a world size are spawned once and take one function after another in one process group: a spawned
rank imports torch and the test module again, seconds that each of the tests would otherwise pay. A rank that
fails or dies, or a call that outlives DEADLINE_S (a rank waiting on a collective the others never join), ends
those ranks: the call fails with what went wrong, and the next call spawns new ones. The ranks keep the
environment they started with."""

import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable, Dict, List

import torch.distributed as dist
import torch.multiprocessing as mp

from triton_interpreter import patch_the_language_once_per_launch

DEADLINE_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, world: int, port: int, tasks, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    patch_the_language_once_per_launch()  # in every rank, whether its test module imports conftest.py or not
    dist.init_process_group("gloo", rank=rank, world_size=world)
    while True:
        try:
            task = tasks.get()
            if task is None:
                break
            fn, args = pickle.loads(task)
            # Pickled here: put() pickles in a thread of its own, which drops what fails with only a print.
            results.put((rank, "ok", pickle.dumps(fn(rank, world, *args))))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))
            return  # the others may wait on this rank in a collective: the caller ends them
    dist.destroy_process_group()


class _Ranks:
    def __init__(self, world: int):
        context = mp.get_context("spawn")
        self.tasks = [context.Queue() for _ in range(world)]
        self.results = context.Queue()
        port = _free_port()
        self.procs = [context.Process(target=_serve, args=(rank, world, port, self.tasks[rank], self.results),
                                      daemon=True) for rank in range(world)]  # fmt: skip
        for proc in self.procs:
            proc.start()

    def run(self, fn: Callable, args: tuple) -> List[Any]:
        task = pickle.dumps((fn, args))  # here, not in put()'s thread (see _serve)
        for tasks in self.tasks:
            tasks.put(task)
        out, errors, deadline = {}, [], time.monotonic() + DEADLINE_S
        while len(out) + len(errors) < len(self.procs):
            try:
                rank, status, value = self.results.get(timeout=1.0)
            except queue.Empty:
                if errors:  # the others had a second to say theirs; they may be stuck on the failed one
                    break
                dead = [f"rank {r} died (exit code {p.exitcode})" for r, p in enumerate(self.procs)
                        if not p.is_alive() and r not in out]  # fmt: skip
                if dead or time.monotonic() > deadline:
                    raise AssertionError("\n".join(dead) or f"the ranks did not finish in {DEADLINE_S} s") from None
                continue
            if status == "ok":
                out[rank] = pickle.loads(value)
            else:
                errors.append(value)
        if errors:
            raise AssertionError("\n".join(errors))
        return [out[rank] for rank in range(len(self.procs))]

    def close(self, grace_s: float = 10.0) -> None:
        for tasks, proc in zip(self.tasks, self.procs):
            if proc.is_alive():
                tasks.put(None)
        for proc in self.procs:
            proc.join(timeout=grace_s)
            if proc.is_alive():
                proc.kill()
                proc.join()


_ranks: Dict[int, _Ranks] = {}


def run_ranks(fn: Callable, world: int, *args: Any) -> List[Any]:
    """fn(rank, world, *args) on ``world`` CPU ranks of one gloo process group; its return values by rank."""
    if world not in _ranks:
        _ranks[world] = _Ranks(world)
    ranks = _ranks[world]
    try:
        return ranks.run(fn, args)
    except BaseException:
        del _ranks[world]
        ranks.close(grace_s=0)  # a rank may wait on a collective for good
        raise


def close_all() -> None:
    """Ends the ranks of every world size (a module's tests are done with them)."""
    while _ranks:
        _ranks.popitem()[1].close()
