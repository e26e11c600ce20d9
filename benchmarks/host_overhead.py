"""Host overhead of one optimizer step: what the host spends per step, the device work left out.

    python -m benchmarks.host_overhead                  # 189, 398 and 2,000 tensors, every backend and variant
    python -m benchmarks.host_overhead --quick          # 189 tensors, a few rounds (CI)
    python -m benchmarks.host_overhead --shapes real    # the parameter sets' own shapes

A step is memory-bound on the GPU, so fast kernels only show when the host keeps up. Each
contender steps N one-element fp32 tensors (nil arithmetic) on one thread, with its device work
left out: Triton's launches are no-ops; CUDA's are real on a GPU, timed on the host alone
(perf_counter around step(), the device idle at each call, as step_time.py's host time), and
without a GPU run through the CUDA emulator (tests/cuda_emulator) under its "skip" schedule,
which checks and counts each launch but runs no block, so csrc/binding.cpp's host code is timed.
N = 189 is Faster R-CNN R50-FPN's tensor count, 398 BERT-large's, 2,000 the many_small set's;
--shapes real takes those sets' shapes (then the CPU rows' device work is not nil).

Variants of every backend: plain PMDLAMB; clip (max_grad_norm); amp (GradScaler's grad_scale and
found_inf attributes); lamb (apex-style LAMB, clipping on); sharded (DTensor parameters on a
one-rank gloo mesh, each all-reduce counted and made a no-op: exact on one rank, its wait left out);
telemetry (plain with telemetry=True: trust-ratio records written).
Yardsticks: torch.optim.AdamW with fused=True and with foreach=True. Reported: median (min, max) µs
per step, µs per tensor and its ratio to fused AdamW's, launches and all-reduces per step, and the
goals (at most 0.15× fused AdamW at 2,000 tensors, 150 µs per step at 189), marked pass or fail
without failing the run. Contenders run interleaved, round after round; the JSON goes to --out
beside step_time.py's, named host-overhead-<device>-<date>.json.
"""

import argparse
import contextlib
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

if not torch.cuda.is_available():  # the triton backend then runs on CPU tensors; read when Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.step_time import (RUNS_DIR, SHAPES_DIR, save_results, host_times_ms, launches_per_step, load_shapes,
                                  make_params, run_meta)  # fmt: skip
from largedet_kernels import LAMB, PMDLAMB, dispatch

TENSORS = (189, 398, 2000)
BACKENDS = ("torch", "cpu", "triton", "cuda")
VARIANTS = ("plain", "clip", "amp", "lamb", "sharded", "telemetry")
ADAMW = ("adamw", ("fused", "foreach"))  # the yardsticks, as (backend, variants)
FUSED_ADAMW = "adamw/fused"
GOALS = {2000: ("ratio", 0.15), 189: ("us_per_step", 150.0)}  # N: (what, at most)
EMULATOR_HOME = Path(__file__).resolve().parent.parent / "tests"


@dataclass
class Count:
    n: int = 0


class _NoOpKernel:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` is counted and does nothing."""

    def __init__(self, count: Count) -> None:
        self.count = count

    def __getitem__(self, grid) -> Callable[..., None]:
        return self._launch

    def _launch(self, *args, **kwargs) -> None:
        self.count.n += 1


def _emulated(backend: str, device: torch.device) -> bool:
    return backend == "cuda" and device.type == "cpu"


class Hooks:
    """What takes the device work out of a step, set up for one run and undone after it."""

    def __init__(self, device: torch.device, emulate: bool) -> None:
        self.device, self.emulate, self.stack = device, emulate, contextlib.ExitStack()
        self.triton_launches, self.all_reduces = Count(), Count()
        self.emulator, self.emulator_reason = None, "the CUDA emulator is left out (--no-emulator)"
        self.mesh, self.mesh_reason = None, "no process group"

    def __enter__(self) -> "Hooks":
        self._noop_triton()
        if self.device.type != "cuda" and self.emulate:
            self._emulated_cuda()
        self._one_rank_mesh()
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def _patch(self, owner, name: str, value) -> None:
        saved = getattr(owner, name)
        setattr(owner, name, value)
        self.stack.callback(setattr, owner, name, saved)

    def _noop_triton(self) -> None:
        # The backend looks its kernels up in this module at each launch.
        try:
            from triton.runtime import KernelInterface

            from largedet_kernels import triton_kernels
        except ImportError:
            return  # the triton rows then give dispatch's reason
        for name, value in list(vars(triton_kernels).items()):
            if isinstance(value, KernelInterface):
                self._patch(triton_kernels, name, _NoOpKernel(self.triton_launches))

    def _emulated_cuda(self) -> None:
        try:
            if str(EMULATOR_HOME) not in sys.path:
                sys.path.append(str(EMULATOR_HOME))
            import cuda_emulator

            cuda_emulator.load()
        except Exception as err:  # no compiler, no ninja, ...: the cuda rows say so
            self.emulator_reason = f"the CUDA emulator cannot be built: {type(err).__name__}: {err}"
            return
        from largedet_kernels.backends import cuda

        on_gpus = cuda.unavailable_reason  # as tests/conftest.py's emulated_cuda fixture
        self._patch(cuda, "unavailable_reason", lambda device: None if device.type == "cpu" else on_gpus(device))
        self._patch(cuda.KERNELS, "ops", getattr(torch.ops, cuda_emulator.NAMESPACE))
        cuda_emulator.configure("skip")
        self.stack.callback(cuda_emulator.configure, cuda_emulator.DEFAULT_SCHEDULE)
        self.emulator = cuda_emulator

    def _one_rank_mesh(self) -> None:
        import torch.distributed as dist

        if not dist.is_available():
            self.mesh_reason = "torch is built without torch.distributed"
            return
        try:
            from torch.distributed.device_mesh import init_device_mesh

            if not dist.is_initialized():
                backend = "cpu:gloo,cuda:nccl" if self.device.type == "cuda" else "gloo"
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
                self.stack.callback(dist.destroy_process_group)
            if dist.get_world_size() != 1:
                self.mesh_reason = f"runs on one rank, and this process group has {dist.get_world_size()}"
                return
            self.mesh = {d: init_device_mesh(d, (1,)) for d in {"cpu", self.device.type}}
        except Exception as err:
            self.mesh_reason = f"no one-rank mesh: {type(err).__name__}: {err}"
            return

        def all_reduce(tensor, *args, **kwargs):  # the sum over one rank is the tensor itself
            self.all_reduces.n += 1

        self._patch(dist, "all_reduce", all_reduce)

    def unavailable(self, backend: str, variant: str, device: torch.device) -> Optional[str]:
        if backend == ADAMW[0]:
            return None
        if _emulated(backend, device) and self.emulator is None:
            return self.emulator_reason
        if variant == "sharded" and self.mesh is None:
            return self.mesh_reason
        return dispatch.unavailable_reason(backend, device)

    def launches(self, backend: str, device: torch.device, step: Callable[[], None]) -> Tuple[Optional[int], int]:
        """(kernel launches, all-reduces) of one step; launches None where there are none to count (CPU ops)."""
        triton, reduces = self.triton_launches.n, self.all_reduces.n
        if backend != "triton" and device.type == "cuda":
            return launches_per_step(step, device), self.all_reduces.n - reduces  # a step under torch.profiler
        if _emulated(backend, device):
            self.emulator.reset_counters()
        step()
        reduces = self.all_reduces.n - reduces
        if backend == "triton":
            return self.triton_launches.n - triton, reduces
        return self.emulator.counters()["launches"] if _emulated(backend, device) else None, reduces

    def shard(self, params: List[torch.nn.Parameter]) -> List[torch.nn.Parameter]:
        """The parameters as one-rank DTensors (Shard(0), as FSDP2's), sharing their storage."""
        from torch.distributed.tensor import DTensor, Shard

        mesh = self.mesh[params[0].device.type]
        out = []
        for p in params:
            d = torch.nn.Parameter(DTensor.from_local(p.detach(), mesh, [Shard(0)], run_check=False))
            d.grad = DTensor.from_local(p.grad, mesh, [Shard(0)], run_check=False)
            out.append(d)
        return out


def launch_mode(backend: str, device: torch.device) -> str:
    if backend == "triton":
        return "no-op"
    if backend == "cuda":
        return "emulated: counted, no block runs" if device.type == "cpu" else "real, host time only"
    return "real" if device.type == "cuda" else "host ops"


def make_step(backend: str, variant: str, params: List[torch.nn.Parameter]) -> Callable[[], None]:
    if backend == ADAMW[0]:
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=5e-4, **{variant: True}).step
    if variant == "lamb":
        opt = LAMB(params, backend=backend)  # apex FusedLAMB's defaults: max_grad_norm=1.0
    else:
        opt = PMDLAMB(params, max_grad_norm=1.0 if variant == "clip" else None, backend=backend,
                      telemetry=variant == "telemetry")  # fmt: skip
    if variant == "amp":  # what torch.amp.GradScaler.step sets on an optimizer with _step_supports_amp_scaling
        device = params[0].device
        opt.grad_scale = torch.full((), 2.0**16, device=device)
        opt.found_inf = torch.zeros((), device=device)
    return opt.step


def goal(n: int, row: Dict) -> Optional[str]:
    if row["backend"] == ADAMW[0] or n not in GOALS or row[GOALS[n][0]] is None:
        return None
    return "pass" if row[GOALS[n][0]] <= GOALS[n][1] else "fail"


def bench_n(n: int, shapes: List[List[int]], set_name: Optional[str], grid: List[Tuple[str, str]], args,
            hooks: Hooks) -> Dict:  # fmt: skip
    params: Dict[Tuple[torch.device, bool], List[torch.nn.Parameter]] = {}  # shared by the contenders
    steps: Dict[str, Tuple[str, str, torch.device, Callable[[], None]]] = {}
    skipped: Dict[str, str] = {}
    for backend, variant in grid:
        name = f"{backend}/{variant}"
        device = torch.device("cpu") if backend == "cpu" else args.device
        chosen = backend == ADAMW[0] or (backend in args.backends and variant in args.variants)
        reason = hooks.unavailable(backend, variant, device) if chosen else "left out with --backends/--variants"
        if reason is None:
            try:
                key = (device, variant == "sharded")
                if key not in params:
                    plain = params.setdefault((device, False), make_params(shapes, device, torch.float32))
                    params[key] = hooks.shard(plain) if key[1] else plain
                step = make_step(backend, variant, params[key])
                host_times_ms(step, args.device, args.warmup)
                steps[name] = (backend, variant, device, step)
            except Exception as err:  # a path that breaks is reported, not fatal
                reason = f"failed: {type(err).__name__}: {err}"
        if reason is not None:
            skipped[name] = reason
    times: Dict[str, List[float]] = {name: [] for name in steps}
    order = list(steps)
    for r in range(args.rounds):  # interleaved, each round starting one later, so drift hurts all alike
        for name in order[r % len(order):] + order[: r % len(order)]:
            times[name] += host_times_ms(steps[name][3], args.device, args.steps)
    fused = statistics.median(times[FUSED_ADAMW]) * 1e3 / n if FUSED_ADAMW in times else None
    rows = {}
    for name, (backend, variant, device, step) in steps.items():
        us = [t * 1e3 for t in times[name]]
        launches, all_reduces = hooks.launches(backend, device, step)
        row = {
            "backend": backend, "variant": variant, "device": str(device), "launch_mode": launch_mode(backend, device),
            "us_per_step": statistics.median(us), "min_us": min(us), "max_us": max(us), "samples": len(us),
            "us_per_tensor": statistics.median(us) / n, "launches": launches, "all_reduces": all_reduces,
        }  # fmt: skip
        row["ratio"] = row["us_per_tensor"] / fused if fused else None
        row["goal"] = goal(n, row)
        rows[name] = row
    return {"tensors": n, "set": set_name, "params": sum(torch.Size(s).numel() for s in shapes), "rows": rows,
            "skipped": skipped}  # fmt: skip


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(result: Dict, meta: Dict) -> None:
    what = result["set"] or "one-element tensors"
    print(f"\n{result['tensors']} tensors ({what}) on {meta['device_name']}, {meta['threads']} thread(s)")
    head = ("backend/variant", "launches", "us/step", "min", "max", "us/tensor", "x fused", "n launch", "n reduce",
            "goal")  # fmt: skip
    print(f"{head[0]:<17}{head[1]:<34}" + "".join(f"{h:>10}" for h in head[2:]))
    for name, r in result["rows"].items():
        cells = [_fmt(r["us_per_step"], ".1f"), _fmt(r["min_us"], ".1f"), _fmt(r["max_us"], ".1f"),
                 _fmt(r["us_per_tensor"], ".3f"), _fmt(r["ratio"], ".2f"), _fmt(r["launches"], "d"),
                 _fmt(r["all_reduces"], "d"), r["goal"] or ""]  # fmt: skip
        print(f"{name:<17}{r['launch_mode']:<34}" + "".join(f"{c:>10}" for c in cells))
    for name, reason in result["skipped"].items():
        print(f"{name:<17}skipped: {reason}")


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--tensors", nargs="+", type=int, help=f"tensor counts (default {TENSORS})")
    parser.add_argument("--shapes", choices=("one-element", "real"), default="one-element",
                        help="one-element tensors, or the shapes of the set with that many tensors")  # fmt: skip
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--warmup", type=int, help="untimed steps per contender (default 3)")
    parser.add_argument("--steps", type=int, help="timed steps per contender per round (default 10)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 7)")
    parser.add_argument("--quick", action="store_true", help="CI size: 189 tensors, 3 rounds of 3 steps")
    parser.add_argument("--no-emulator", action="store_true", help="without a GPU, leave the cuda rows out")
    parser.add_argument("--out", type=Path, default=RUNS_DIR, help="where the JSON goes")
    parser.add_argument("--no-files", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    quick = args.quick
    args.tensors = args.tensors or ([189] if quick else list(TENSORS))
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    args.steps = args.steps if args.steps is not None else (3 if quick else 10)
    args.rounds = args.rounds if args.rounds is not None else (3 if quick else 7)
    sets = {len(load_shapes(p.stem)): p.stem for p in sorted(SHAPES_DIR.glob("*.json"))}
    if args.shapes == "real" and set(args.tensors) - set(sets):
        parser.error(f"--shapes real takes the tensor counts of benchmarks/shapes/: {sets}")
    args.device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available()
                                                                          else "cpu"))  # fmt: skip
    grid = [(b, v) for b in BACKENDS for v in VARIANTS] + [(ADAMW[0], v) for v in ADAMW[1]]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # host cost, not how well torch's ops spread over cores
    try:
        meta = run_meta(args.device, "benchmarks.host_overhead", argv)
        meta.update(shapes=args.shapes, goals={str(n): f"{what} <= {limit}" for n, (what, limit) in GOALS.items()})
        results = []
        with Hooks(args.device, emulate=not args.no_emulator) as hooks:
            for n in args.tensors:
                set_name = sets[n] if args.shapes == "real" else None
                shapes = load_shapes(set_name) if set_name else [[1]] * n
                results.append(bench_n(n, shapes, set_name, grid, args, hooks))
                print_table(results[-1], meta)
    finally:
        torch.set_num_threads(threads)
    doc = {"meta": meta, "results": results}
    if not args.no_files:
        save_results(doc, args.out, "host-overhead-")
    return doc


if __name__ == "__main__":
    main(sys.argv[1:])
