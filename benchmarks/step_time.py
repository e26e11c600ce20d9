"""Step time of PMDLAMB's backends against a per-tensor loop of the reference.

    python -m benchmarks.step_time                      # Faster R-CNN R50-FPN, fp32, best device
    python -m benchmarks.step_time --device cpu --limit 20

Parameter shapes ship as JSON under benchmarks/shapes/ (no torchvision needed).
On CUDA each step is timed with CUDA events after warm-up; on CPU with
perf_counter. Contenders run interleaved, round after round, and the median
over all timed steps is reported, so a noisy machine hurts them alike.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from largedet_kernels import PMDLAMB, dispatch, reference

SHAPES_DIR = Path(__file__).parent / "shapes"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_shapes(name: str, limit: Optional[int] = None) -> List[List[int]]:
    doc = json.loads((SHAPES_DIR / f"{name}.json").read_text())
    shapes = [entry["shape"] for entry in doc["params"]]
    return shapes[:limit] if limit else shapes


def make_params(shapes, device, dtype, seed=0) -> List[torch.nn.Parameter]:
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, device=device, dtype=dtype, generator=gen))
        p.grad = torch.randn(shape, device=device, dtype=dtype, generator=gen)
        params.append(p)
    return params


class ReferenceLoop:
    """The reference, one tensor after another: the naive baseline."""

    def __init__(self, params, **hyper):
        self.params, self.hyper, self.t = params, hyper, 0
        self.m = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.v = [torch.zeros_like(p, dtype=torch.float32) for p in params]

    @torch.no_grad()
    def step(self):
        self.t += 1
        for p, m, v in zip(self.params, self.m, self.v):
            x = p.float() if p.dtype != torch.float32 else p
            reference.pmd_lamb_step(x, p.grad.float(), m, v, self.t, **self.hyper)
            if x is not p:
                p.copy_(x)


def contenders(shapes, device, dtype) -> Dict[str, Callable[[], Optional[Callable[[], None]]]]:
    """name → factory returning a step function; each builds its own params and state."""
    hyper = dict(lr=1e-3, weight_decay=5e-4, alpha=0.012, cycle_length=200)

    def pmdlamb(backend):
        return lambda: PMDLAMB(make_params(shapes, device, dtype), backend=backend, **hyper).step

    ref_hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=5e-4, alpha=0.012, cycle_length=200)
    out = {f"pmdlamb[{b}]": pmdlamb(b) for b in dispatch.AUTO_ORDER}
    out["reference loop"] = lambda: ReferenceLoop(make_params(shapes, device, dtype), **ref_hyper).step
    return out


def time_steps(step: Callable[[], None], device: torch.device, n: int) -> List[float]:
    """Milliseconds of each of n steps."""
    times = []
    if device.type == "cuda":
        for _ in range(n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def run(args) -> Dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    shapes = load_shapes(args.set, args.limit)
    numel = sum(torch.Size(s).numel() for s in shapes)
    steps, skipped = {}, {}
    for name, factory in contenders(shapes, device, dtype).items():
        backend = name[len("pmdlamb[") : -1] if name.startswith("pmdlamb[") else None
        reason = backend and dispatch.unavailable_reason(backend, device)
        if reason:
            skipped[name] = reason
            continue
        steps[name] = factory()
        time_steps(steps[name], device, args.warmup)
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):  # interleaved: every contender once per round
        for name, step in steps.items():
            times[name] += time_steps(step, device, args.steps)
    rows = {
        name: {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t), "samples": len(t)}
        for name, t in times.items()
    }
    return {
        "set": args.set, "tensors": len(shapes), "params": numel, "dtype": args.dtype, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "rows": rows, "skipped": skipped,
    }  # fmt: skip


def print_table(result: Dict) -> None:
    print(
        f"PMD-LAMB step on {result['set']} ({result['tensors']} tensors, {result['params'] / 1e6:.1f}M params, "
        f"{result['dtype']}) on {result['device_name']}, torch {result['torch']}"
    )
    ref = result["rows"].get("reference loop", {}).get("median_ms")
    print(f"{'contender':<18}{'median ms':>11}{'min ms':>10}{'max ms':>10}{'vs reference':>14}")
    for name, row in result["rows"].items():
        speedup = f"{ref / row['median_ms']:.2f}x" if ref else "-"
        print(f"{name:<18}{row['median_ms']:>11.2f}{row['min_ms']:>10.2f}{row['max_ms']:>10.2f}{speedup:>14}")
    for name, reason in result["skipped"].items():
        print(f"{name:<18} skipped: {reason}")


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sets = sorted(p.stem for p in SHAPES_DIR.glob("*.json"))
    parser.add_argument("--set", default="faster_rcnn_r50_fpn", choices=sets)
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--limit", type=int, default=None, help="only the first N tensors of the set")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per contender")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per contender per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    on_gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    args.warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    args.steps = args.steps if args.steps is not None else (50 if on_gpu else 2)
    result = run(args)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
