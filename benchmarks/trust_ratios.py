"""The LargeDet paper's Fig. 3 at the convergence study's scale: each layer's ratio of weight norm to gradient
norm in a Faster R-CNN late in training, beside the trust ratio PMD-LAMB applies.

    python -m benchmarks.trust_ratios --config cpu --seed 0    # one PMD-LAMB run at batch 8: ~1 minute on 2 cores

Trains one run of the convergence study (benchmarks/convergence.py: the config's PMD-LAMB at the ablation's batch)
with ``telemetry=True`` and, at the last step before the first lr drop (or ``--at``), takes per tensor ‖x‖, ‖u‖ and
the applied ratio from the optimizer's records (docs/telemetry.md) and ‖g‖ from the gradients. Writes
``<out>/trust-ratios-<config>-seed<N>-<device>-<date>.json`` and a ``.png``: ‖x‖/‖g‖ (the paper's ratio) and
‖x‖/‖u‖ of every weight tensor, in the model's order, coloured by module, on a log scale.
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from benchmarks.convergence import CONFIGS, add_study_arguments, datasets, study_device, study_meta, train, write_study

# A tensor's module in the figure: its name's first components, as torchvision's Faster R-CNN names them.
MODULES = ("backbone.body", "backbone.fpn", "rpn", "roi_heads")


def module_of(name: str) -> str:
    return next((m for m in MODULES if name.startswith(m + ".")), name.split(".")[0])


def spread(values: List[float]) -> Dict[str, float]:
    """min, median, max and max/min of positive finite values."""
    t = torch.tensor([v for v in values if v > 0 and v < float("inf")], dtype=torch.float64)
    low, high = t.min().item(), t.max().item()
    return dict(min=low, median=t.median().item(), max=high, max_over_min=high / low)


def capture(at: int, layers: List[Dict]):
    """An on_step callback of convergence.train that fills ``layers`` at step ``at``."""

    def on_step(step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if step != at:
            return
        records = optimizer.trust_ratios().with_names(model.named_parameters()).records
        for name, p in model.named_parameters():
            if name in records and p.dim() > 1:  # weights: a bias or norm scale has a norm of another kind
                r = records[name]
                g_norm = p.grad.norm().item()
                layers.append(dict(name=name, module=module_of(name), shape=list(p.shape), x_norm=r.x_norm,
                                   g_norm=g_norm, u_norm=r.u_norm, ratio=r.ratio, step=r.step,
                                   x_over_g=r.x_norm / g_norm if g_norm > 0 else None,
                                   x_over_u=r.x_norm / r.u_norm if r.u_norm > 0 else None))  # fmt: skip

    return on_step


def plot(doc: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = doc["layers"]
    modules = list(dict.fromkeys(layer["module"] for layer in layers))
    colours = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(modules)}
    fig, axes = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for ax, key, title in ((axes[0], "x_over_g", "‖x‖/‖g‖ (the paper's weight-norm to gradient-norm ratio)"),
                           (axes[1], "x_over_u", "‖x‖/‖u‖ (PMD-LAMB's trust ratio, u = r + λx)")):  # fmt: skip
        for i, layer in enumerate(layers):
            if layer[key]:
                ax.bar(i, layer[key], color=colours[layer["module"]], width=0.8)
        s = doc["summary"][key]
        ax.set_yscale("log")
        ax.set_title(f"{title}: {s['min']:.3g} to {s['max']:.3g} ({s['max_over_min']:.0f}×), median {s['median']:.3g}",
                     fontsize=10)  # fmt: skip
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xlabel("weight tensor, in the model's order")
    axes[0].legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[m]) for m in modules], labels=modules,
                   fontsize=8, loc="upper right")  # fmt: skip
    meta, run = doc["meta"], doc["run"]
    fig.suptitle(f"Per-layer ratios of the study's Faster R-CNN at step {doc['step']} of {run['steps']} "
                 f"(PMD-LAMB, batch {run['batch']}, η {run['lr']:.3g}, α {run['alpha']}, T {run['cycle_length']}; "
                 f"{meta['device_name']})", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_arguments(parser)
    parser.add_argument("--batch", type=int, help="the run's batch (default: the config's ablation batch)")
    parser.add_argument("--lamb-lr", type=float, help="η at the config's smallest batch (default: its lamb_lr)")
    parser.add_argument("--at", type=int, help="the step to record (default: the last before the first lr drop)")
    args = parser.parse_args(argv)
    device = study_device(args)
    overrides = {} if args.lamb_lr is None else {"lamb_lr": args.lamb_lr}
    config = dataclasses.replace(CONFIGS[args.config], seed=args.seed, **overrides)
    batch = args.batch or config.ablation_batch
    steps = config.epochs * (config.train_images // batch)
    at = args.at or steps * 2 // 3
    if not 1 <= at <= steps:
        parser.error(f"--at must be a step of the run's {steps}, got {at}")
    run = dict(optimizer="pmd-lamb", batch=batch, alpha=config.alpha, cycle_length=config.cycle_length)
    meta = study_meta("benchmarks.trust_ratios", argv, args, device)
    layers: List[Dict] = []
    start = time.perf_counter()
    result = train(config, run, *datasets(config, device), device, telemetry=True, on_step=capture(at, layers))
    meta["seconds"] = time.perf_counter() - start
    if result["diverged"] or not layers:
        raise SystemExit(f"the run diverged before step {at}: nothing recorded")
    result.pop("loss")
    summary = {key: spread([layer[key] for layer in layers if layer[key]]) for key in ("x_over_g", "x_over_u")}
    doc = {"meta": meta, "config": dataclasses.asdict(config), "run": result, "step": at, "summary": summary,
           "layers": layers}  # fmt: skip
    for key, s in summary.items():
        print(f"{key}: {s['min']:.3g} .. {s['max']:.3g} ({s['max_over_min']:.0f}x), median {s['median']:.3g}")
    print(f"mAP {100 * result['mAP']:.1f} after {result['steps']} steps, {meta['seconds']:.0f} s")
    write_study(doc, args.out, f"trust-ratios-{args.config}-seed{config.seed}-", plot)
    return doc


if __name__ == "__main__":
    main(sys.argv[1:])
