"""How far PMD-LAMB trains in a few steps at each η: the README's table on choosing lr.

    python -m benchmarks.lr_sweep                      # resnet18, 30 steps at each lr, the cpu backend
    python -m benchmarks.lr_sweep --lrs 0.1 --steps 5  # a quick look

Each step moves every tensor by η·α of its norm (the trust ratio), so with α = 0.012 an η of 1e-3 moves
weights by 1.2e-5 of themselves per step and barely trains. The sweep fits torchvision's resnet18 (fresh
weights, 10 classes) to one fixed random batch, the same weights and batch for every lr, and records the
training loss after every step. Writes lr-sweep-<device>-<date>.json beside step_time.py's results;
``benchmarks.tables`` renders its table.
"""

import argparse
import sys
import time
from typing import Dict, List, Optional

import torch

from benchmarks.step_time import RUNS_DIR, save_results, run_meta
from largedet_kernels import PMDLAMB

LRS = (1e-3, 1e-2, 0.1, 0.5)


def train(lr: float, steps: int, batch: int, image_size: int, backend: str, seed: int) -> List[float]:
    """The loss before the first step and after each step."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    gen = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(batch, 3, image_size, image_size, generator=gen)
    labels = torch.randint(0, 10, (batch,), generator=gen)
    opt = PMDLAMB(model.parameters(), lr=lr, backend=backend)
    losses = []
    for _ in range(steps + 1):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        losses.append(loss.item())
        if len(losses) <= steps:
            opt.zero_grad()
            loss.backward()
            opt.step()
    return losses


def markdown_table(doc: Dict) -> str:
    """The README's table of one results file."""
    meta, config = doc["meta"], doc["config"]
    after = sorted({min(10, config["steps"]), config["steps"]})
    lines = [f"Measured by `{meta['command'].strip()}` ({meta['date']}, {meta['device_name']}, the {config['backend']} "
             f"backend; resnet18 on one fixed random batch of {config['batch']} images of {config['image_size']}², "
             f"10 classes, seed {config['seed']}; PMDLAMB's defaults but lr):",
             "", "| lr (η) | η·α per step | loss at start | " + " | ".join(f"after {k} steps" for k in after)
             + " |",
             "|---:|---:|---:|" + "---:|" * len(after)]  # fmt: skip
    for run in doc["runs"]:
        losses = " | ".join(f"{run['loss'][k]:.3g}" for k in after)
        lines.append(f"| {run['lr']:g} | {run['lr'] * run['alpha']:.1e} | {run['loss'][0]:.3g} | {losses} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RUNS_DIR))
    parser.add_argument("--no-files", action="store_true")
    args = parser.parse_args(argv)
    meta = run_meta(torch.device("cpu"), "benchmarks.lr_sweep", argv)
    config = {k: getattr(args, k) for k in ("steps", "batch", "image_size", "backend", "seed")}
    alpha = PMDLAMB([torch.nn.Parameter(torch.zeros(1))]).defaults["alpha"]
    runs = []
    for lr in args.lrs:
        t0 = time.perf_counter()
        loss = train(lr, args.steps, args.batch, args.image_size, args.backend, args.seed)
        runs.append({"lr": lr, "alpha": alpha, "loss": loss, "seconds": time.perf_counter() - t0})
        print(f"lr {lr:g}: loss {loss[0]:.4f} -> {loss[-1]:.4f} in {args.steps} steps", file=sys.stderr)
    doc = {"meta": meta, "config": config, "runs": runs}
    print(markdown_table(doc))
    if not args.no_files:
        save_results(doc, args.out, "lr-sweep-")
    return doc


if __name__ == "__main__":
    main(sys.argv[1:])
