"""What each mixed-precision setting costs: step time, memory per parameter, and accuracy.

    python -m benchmarks.mixed_precision                       # the cpu backend (cuda on a GPU), Faster R-CNN's set
    python -m benchmarks.mixed_precision --backend torch --limit 50 --rounds 3

Settings: fp32 parameters (the baseline), then bf16 parameters with fp32 masters (bf16 and fp32
gradients), bf16 moments beside them, bf16 parameters with stochastic rounding (with and without
bf16 moments), plain bf16 (no masters: updates round away, NOTE [master weights] in
largedet_kernels/optimizer.py), and fp32 parameters with bf16 moments.

- Speed: every setting steps the same shapes, interleaved round after round; reported as the median
  ns per element and its ratio to fp32's (the goal for masters on bf16: at most 1.2).
- Memory: bytes per parameter of the parameter, its gradient and the optimizer state, read from the
  tensors after a step; and the bytes a step moves per element (step_time.element_bytes).
- Accuracy: the bf16 scenario of tests/test_mixed_precision.py (an MLP that trains in fp32 and
  stalls in plain bf16), its loss after 20 and 200 steps at lr 0.13.

Writes mixed-precision-<device>-<date>.json beside step_time.py's results. ``--table JSON`` prints the
table of a results file instead, the one benchmarks.tables writes into docs/mixed-precision.md.
"""

import argparse
import json
import statistics
import sys
from typing import Callable, Dict, List, Optional

import torch

from benchmarks.step_time import (RUNS_DIR, element_bytes, save_results, load_shapes, make_params, run_meta,
                                  time_ms)  # fmt: skip
from largedet_kernels import PMDLAMB

BF16, FP32 = torch.bfloat16, torch.float32
# name: (parameter dtype, gradient dtype, PMDLAMB options)
SETTINGS = {
    "fp32": (FP32, FP32, {}),
    "bf16 + masters": (BF16, BF16, {}),
    "bf16 + masters, fp32 grads": (BF16, FP32, {}),
    "bf16 + masters + bf16 moments": (BF16, BF16, dict(moment_dtype=BF16)),
    "bf16 + stochastic rounding": (BF16, BF16, dict(stochastic_rounding=True)),
    "bf16 + stochastic rounding + bf16 moments": (BF16, BF16, dict(stochastic_rounding=True, moment_dtype=BF16)),
    "bf16 plain": (BF16, BF16, dict(master_weights=False)),
    "fp32 + bf16 moments": (FP32, FP32, dict(moment_dtype=BF16)),
}
SCENARIO_LR, SCENARIO_STEPS = 0.13, (20, 200)  # the steps after which the loss is reported


def _optimizer(params, backend: str, options: Dict) -> PMDLAMB:
    return PMDLAMB(params, lr=1e-3, cycle_length=200, backend=backend, **options)


def _params(shapes, device, dtype, grad_dtype) -> List[torch.nn.Parameter]:
    params = make_params(shapes, device, dtype)
    for p in params:
        if grad_dtype != dtype:
            g, p.grad = p.grad, None
            p.grad_dtype = grad_dtype
            p.grad = g.to(grad_dtype)
    return params


def memory_per_parameter(opt: PMDLAMB, params: List[torch.nn.Parameter]) -> Dict[str, float]:
    numel = sum(p.numel() for p in params)
    state = sum(t.numel() * t.element_size() for p in params for k, t in opt.state[p].items() if k != "step")
    param = sum(p.numel() * p.element_size() for p in params)
    grad = sum(p.grad.numel() * p.grad.element_size() for p in params)
    return {"param": param / numel, "grad": grad / numel, "state": state / numel,
            "total": (param + grad + state) / numel}  # fmt: skip


def speed_and_memory(shapes, device, backend: str, rounds: int, steps: int) -> Dict[str, Dict]:
    numel = sum(torch.Size(s).numel() for s in shapes)
    runs: Dict[str, Callable[[], None]] = {}
    rows: Dict[str, Dict] = {}
    for name, (dtype, grad_dtype, options) in SETTINGS.items():
        params = _params(shapes, device, dtype, grad_dtype)
        opt = _optimizer(params, backend, options)
        opt.step()  # warm-up, and the state exists
        masters = any("master" in opt.state[p] for p in params)
        moments = opt.state[params[0]]["exp_avg"].dtype
        one_pass, two_pass = element_bytes(dtype, grad_dtype, masters, moments)
        rows[name] = {"memory_bytes_per_param": memory_per_parameter(opt, params), "one_pass_bytes": one_pass,
                      "two_pass_bytes": two_pass, "samples_ms": []}  # fmt: skip
        runs[name] = opt.step
    for _ in range(rounds):
        for name, step in runs.items():
            rows[name]["samples_ms"] += time_ms(step, device, steps)
    base = statistics.median(rows["fp32"]["samples_ms"])
    for row in rows.values():
        median = statistics.median(row["samples_ms"])
        row.update(median_ms=median, ns_per_elem=median * 1e6 / numel, vs_fp32=median / base)
    return rows


def scenario(backend: str, dtype: torch.dtype, options: Dict, device, steps: List[int]) -> Dict[str, float]:
    """tests/test_mixed_precision.py's bf16 scenario, longer: the loss after each of ``steps``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    ).to(device, dtype)
    gen = torch.Generator().manual_seed(1)
    inputs = 8 * torch.randn(256, 64, generator=gen)
    labels = (inputs @ torch.randn(64, 10, generator=gen)).argmax(1).to(device)
    inputs = inputs.to(device, dtype)

    def loss():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return torch.nn.functional.cross_entropy(model(inputs), labels)

    opt = PMDLAMB(model.parameters(), lr=SCENARIO_LR, backend=backend, **options)
    out = {"start": loss().item()}
    for step in range(1, max(steps) + 1):
        loss().backward()
        opt.step()
        opt.zero_grad()
        if step in steps:
            out[f"after_{step}"] = loss().item()
    return out


def markdown_table(doc: Dict) -> str:
    """The table of one results file (docs/mixed-precision.md's, through benchmarks.tables)."""
    meta, steps = doc["meta"], doc["scenario"]["steps"]
    lines = [
        f"Measured by `{meta['command']}` ({meta['date']}, {meta['device_name']}, {meta['threads']} threads, the "
        f"{meta['backend']} backend, {meta['set']}: {meta['tensors']} tensors, {meta['params'] / 1e6:.1f}M "
        f"parameters; the loss is the bf16 scenario's at lr {doc['scenario']['lr']}):",
        "",
        "| setting | bytes per parameter (x + g + state) | bytes moved per element and step | step time vs fp32 | "
        + " | ".join(f"loss after {n} steps" for n in steps) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(steps),
    ]
    for name, r in doc["rows"].items():
        mem = r["memory_bytes_per_param"]
        parts = f"{mem['total']:.0f} ({mem['param']:.0f} + {mem['grad']:.0f} + {mem['state']:.0f})"
        losses = " | ".join(f"{r['scenario_loss'][f'after_{n}']:.4f}" for n in steps)
        lines.append(f"| {name} | {parts} | {r['two_pass_bytes']} | {r['vs_fp32']:.2f}× | {losses} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda")
    parser.add_argument("--backend", default=None, help="default: cuda on a GPU, cpu on CPU")
    parser.add_argument("--set", default="faster_rcnn_r50_fpn", help="a parameter set of benchmarks/shapes/")
    parser.add_argument("--limit", type=int, default=None, help="only the first N tensors of the set")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per setting per round")
    parser.add_argument("--scenario-steps", type=int, nargs="+", default=list(SCENARIO_STEPS))
    parser.add_argument("--out", default=str(RUNS_DIR))
    parser.add_argument("--no-files", action="store_true")
    parser.add_argument("--table", metavar="JSON", help="print the table of a results file, and stop")
    args = parser.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            doc = json.load(f)
        print(markdown_table(doc))
        return doc
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = args.backend or ("cuda" if device.type == "cuda" else "cpu")
    shapes = load_shapes(args.set, args.limit)
    meta = run_meta(device, "benchmarks.mixed_precision", argv)
    meta.update(backend=backend, set=args.set, tensors=len(shapes), params=sum(torch.Size(s).numel() for s in shapes))
    rows = speed_and_memory(shapes, device, backend, args.rounds, args.steps)
    for name, (dtype, _, options) in SETTINGS.items():
        rows[name]["scenario_loss"] = scenario(backend, dtype, options, device, args.scenario_steps)
    print(f"{args.set}: {meta['tensors']} tensors, {meta['params'] / 1e6:.1f}M params, backend {backend} on "
          f"{meta['device_name']}, {meta['threads']} threads")  # fmt: skip
    losses = tuple(f"loss@{n}" for n in args.scenario_steps)
    head = ("setting", "ns/elem", "vs fp32", "B/param", "state B", "B/step", *losses)
    print(f"{head[0]:<44}" + "".join(f"{h:>10}" for h in head[1:]))
    for name, r in rows.items():
        mem, loss = r["memory_bytes_per_param"], r["scenario_loss"]
        cells = (f"{r['ns_per_elem']:.2f}", f"{r['vs_fp32']:.2f}", f"{mem['total']:.0f}", f"{mem['state']:.0f}",
                 f"{r['two_pass_bytes']}", *(f"{loss[f'after_{n}']:.4f}" for n in args.scenario_steps))  # fmt: skip
        print(f"{name:<44}" + "".join(f"{c:>10}" for c in cells))
    doc = {"meta": meta, "scenario": {"lr": SCENARIO_LR, "steps": args.scenario_steps}, "rows": rows}
    if not args.no_files:
        save_results(doc, args.out, "mixed-precision-")
    return doc


if __name__ == "__main__":
    main(sys.argv[1:])
