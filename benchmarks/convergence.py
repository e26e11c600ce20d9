"""Convergence study: does this PMD-LAMB behave as the paper says, at small scale?

    python -m benchmarks.convergence --config cpu    # the reduced sweep, CPU, under 15 minutes
    python -m benchmarks.convergence --config gpu    # the full sweep, for a GPU
    python -m benchmarks.convergence --config cpu --seed 1    # a replicate: other data, weights and order
    python -m benchmarks.convergence --config cpu --lamb-lr 0.5 --ablation-batch 8    # another η, ablation at 8

Trains the small Faster R-CNN of ``benchmarks/detection_task.py`` from fresh weights on
procedural data for a fixed number of epochs, with
- a sweep over batch sizes, smallest to 16x larger, with SGD (linear scaling rule and
  warm-up), LAMB and PMD-LAMB (paper, Table 2);
- an ablation of PMD-LAMB's T and α at one batch size (Table 3).
Batches larger than ``micro_batch`` are gradient accumulation over micro-batches on one
device: the detector uses GroupNorm, and Faster R-CNN averages its losses over a fixed
number of sampled anchors and proposals per image, so that is the large batch's gradient
(up to which anchors and proposals the samplers draw).
"LAMB" is PMD-LAMB with ξ ≡ 1 (T = ∞) and everything else equal, as in Table 3, so the
comparison isolates the periodic moment decay.

Writes ``<out>/convergence-<config>-seed<N>-<device>-<date>.json`` (every run's COCO
mAP@[.5:.95], AP50, per-step loss and last epoch's mean loss) and a ``.png`` with mAP against
batch size, the ablation and the loss curves of LAMB against PMD-LAMB (the paper's Fig. 5).
"""

import argparse
import contextlib
import dataclasses
import json
import math
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from benchmarks.detection_task import Sample, build_detector, evaluate, make_dataset
from benchmarks.step_time import RUNS_DIR, _version, run_meta, save_results
from largedet_kernels import PMDLAMB
from largedet_kernels.recipe import WarmupMultiStepLR, param_groups, scaled_lr

OPTIMIZERS = ("sgd", "lamb", "pmd-lamb")


@dataclasses.dataclass(frozen=True)
class Config:
    image_size: int
    train_images: int
    val_images: int
    epochs: int
    batch_sizes: Sequence[int]  # the first is the small-batch baseline the learning rates refer to
    micro_batch: int  # images per forward/backward; larger batches accumulate
    ablation_batch: int
    sgd_lr: float  # SGD's lr at batch_sizes[0]; the linear scaling rule scales it
    lamb_lr: float  # LAMB's and PMD-LAMB's η at batch_sizes[0], scaled the same way; see NOTE [LAMB's η ...]
    alpha: float = 0.012
    cycle_length: int = 200
    ablation_cycle_lengths: Sequence[Optional[int]] = ()  # None is T = ∞ (LAMB)
    ablation_alphas: Sequence[float] = ()
    warmup_epochs: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("sgd_lr", "lamb_lr", "micro_batch", "ablation_batch", "epochs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for batch in (*self.batch_sizes, self.ablation_batch):  # refused before the sweep, not at its end
            if not 0 < batch <= self.train_images or batch % min(batch, self.micro_batch):
                raise ValueError(f"batch {batch} must be a multiple of the micro-batch {self.micro_batch} (or below "
                                 f"it) and at most the {self.train_images} training images")  # fmt: skip
        for t in (self.cycle_length, *self.ablation_cycle_lengths):
            if t is not None and t < 2:
                raise ValueError(f"cycle length T = {t}: T = 1 makes ξ ≡ 1, which is LAMB (T = ∞); use T ≥ 2")


# NOTE [LAMB's η on a short schedule]: the trust ratio moves every layer by ηα‖x‖ per step,
# so over a schedule a layer's norm can change at most by a factor exp(Σ ηα). The paper's
# schedule (90k steps at η = 0.02, ×0.1 at 60k and 80k; LSR keeps the sum at larger batches)
# gives Σ ηα ≈ 15. With SGD's η, our schedules (240 to 3840 steps on cpu, 60 to 3840 on gpu,
# with warm-up and the same two decays) would give Σ ηα ≈ 0.3, so LAMB's η here is its own.
# The configs take η = 0.1 at the smallest batch (Σ ηα ≈ 3 at every batch size);
# `--lamb-lr 0.5` gives the paper's Σ ηα ≈ 15, but in fewer, larger steps than the paper's
# (ηα = 2.4% of a layer's norm per step at batch 8 and 9.6% at batch 32, against the paper's
# 1.6% at batch 1056). docs/convergence.md compares both. The update depends on η and α only
# through ηα, so η also sets where the α ablation is centred.
CONFIGS: Dict[str, Config] = {
    # Seconds: checks the pipeline end to end (CI).
    "smoke": Config(image_size=48, train_images=8, val_images=4, epochs=1, batch_sizes=(2, 4), micro_batch=2,
                    ablation_batch=4, sgd_lr=0.01, lamb_lr=0.01, cycle_length=2,
                    ablation_cycle_lengths=(3,), ablation_alphas=(0.02,)),
    "cpu": Config(image_size=64, train_images=640, val_images=256, epochs=12, batch_sizes=(2, 8, 32),
                  micro_batch=32, ablation_batch=32, sgd_lr=0.01, lamb_lr=0.1, cycle_length=30,
                  ablation_cycle_lengths=(5, 100), ablation_alphas=(0.008, 0.018)),
    "gpu": Config(image_size=128, train_images=1280, val_images=256, epochs=12, batch_sizes=(4, 16, 64, 256),
                  micro_batch=64, ablation_batch=64, sgd_lr=0.01, lamb_lr=0.1, cycle_length=30,
                  ablation_cycle_lengths=(5, 15, 60, None), ablation_alphas=(0.008, 0.01, 0.015, 0.018)),
}  # fmt: skip


def plan(config: Config) -> List[Dict]:
    """Every run of the study: the batch-size sweep, then the ablation runs it lacks (with
    T = cycle_length and T = ∞, its references, when the ablation's batch is not in the sweep)."""
    runs = [dict(optimizer=o, batch=b, alpha=config.alpha, cycle_length=config.cycle_length)
            for b in config.batch_sizes for o in OPTIMIZERS]  # fmt: skip
    runs += [dict(optimizer="pmd-lamb", batch=config.ablation_batch, alpha=config.alpha, cycle_length=t)
             for t in (config.cycle_length, None, *config.ablation_cycle_lengths)]  # fmt: skip
    runs += [dict(optimizer="pmd-lamb", batch=config.ablation_batch, alpha=a, cycle_length=config.cycle_length)
             for a in config.ablation_alphas]  # fmt: skip
    unique: List[Dict] = []
    for run in runs:
        if run["optimizer"] == "sgd":
            run.update(alpha=None, cycle_length=None)
        elif run["cycle_length"] is None or run["optimizer"] == "lamb":
            run.update(optimizer="lamb", cycle_length=None)
        if run not in unique:
            unique.append(run)
    return unique


def in_sweep(config: Dict, run: Dict) -> bool:
    """Whether a run is a point of the batch-size sweep (the rest is ablation)."""
    return run["batch"] in config["batch_sizes"] and (
        run["optimizer"] == "sgd"
        or (run["alpha"] == config["alpha"] and run["cycle_length"] in (None, config["cycle_length"]))
    )


def ablation_bars(config: Dict, runs: Iterable[Dict]) -> List[Tuple[str, Dict]]:
    """The T/α ablation at ``config["ablation_batch"]`` as shown: T ascending (∞ last) at the
    config's α, then α ascending at the config's T, each with its name."""
    at = [r for r in runs if r["optimizer"] != "sgd" and r["batch"] == config["ablation_batch"]]
    by_t = sorted((r for r in at if r["alpha"] == config["alpha"]), key=lambda r: r["cycle_length"] or math.inf)
    by_a = sorted((r for r in at if r["cycle_length"] == config["cycle_length"]), key=lambda r: r["alpha"])
    return [(f"T = {r['cycle_length'] or '∞'}", r) for r in by_t] + [(f"α = {r['alpha']}", r) for r in by_a]


def make_optimizer(model: torch.nn.Module, run: Dict, lr: float, telemetry: bool = False) -> torch.optim.Optimizer:
    if run["optimizer"] == "sgd":  # maskrcnn-benchmark's defaults, as the paper's SGD baseline
        return torch.optim.SGD(param_groups(model, weight_decay=1e-4), lr=lr, momentum=0.9)
    return PMDLAMB(param_groups(model, weight_decay=5e-4), lr=lr, alpha=run["alpha"], cycle_length=run["cycle_length"],
                   telemetry=telemetry)  # fmt: skip


# Called after each optimizer step with the step's number (from 1), the model and the optimizer.
OnStep = Callable[[int, torch.nn.Module, torch.optim.Optimizer], None]


def train(config: Config, run: Dict, train_data, val_data, device: torch.device, telemetry: bool = False,
          on_step: Optional[OnStep] = None) -> Dict:  # fmt: skip
    """One run: fixed epochs, LSR lr with linear warm-up and the paper's ×0.1 steps at 2/3
    and 8/9 of training; stops at the first non-finite loss (reported as diverged, ``loss``
    holds the finite ones before it). ``telemetry`` and ``on_step`` are for benchmarks/trust_ratios.py."""
    batch, micro = run["batch"], min(run["batch"], config.micro_batch)  # Config checked that micro divides batch
    accumulation = batch // micro
    base = config.sgd_lr if run["optimizer"] == "sgd" else config.lamb_lr
    lr = scaled_lr(base, config.batch_sizes[0], batch)
    steps_per_epoch = len(train_data) // batch
    if steps_per_epoch == 0:
        raise ValueError(f"batch {batch} is larger than the {len(train_data)} training images")
    steps = config.epochs * steps_per_epoch
    model = build_detector(config.image_size, config.seed).to(device)
    optimizer = make_optimizer(model, run, lr, telemetry)
    scheduler = WarmupMultiStepLR(optimizer, [steps * 2 // 3, steps * 8 // 9], warmup_factor=0.1,
                                  warmup_iters=round(config.warmup_epochs * steps_per_epoch))  # fmt: skip
    order = torch.Generator().manual_seed(config.seed)  # every run sees the images in the same order
    losses: List[float] = []
    start = time.perf_counter()
    model.train()
    diverged = False
    for _ in range(config.epochs):
        perm = torch.randperm(len(train_data), generator=order).tolist()
        for step in range(steps_per_epoch):
            optimizer.zero_grad()
            total = torch.zeros((), device=device)
            for k in range(accumulation):
                chunk = [train_data[i] for i in perm[step * batch + k * micro : step * batch + (k + 1) * micro]]
                loss = sum(model([x for x, _ in chunk], [t for _, t in chunk]).values()) / accumulation
                loss.backward()
                total += loss.detach()
            if not math.isfinite(float(total)):
                diverged = True
                break
            losses.append(float(total))
            optimizer.step()
            if on_step is not None:
                on_step(len(losses), model, optimizer)
            scheduler.step()
        if diverged:
            break
    metrics = {"mAP": 0.0, "AP50": 0.0} if diverged else evaluate(model, val_data)
    # The last epoch's mean, not the last step's loss, which is one noisy batch.
    last_epoch_loss = None if diverged else sum(losses[-steps_per_epoch:]) / steps_per_epoch
    return dict(run, micro_batch=micro, accumulation=accumulation, lr=lr, steps=steps, diverged=diverged,
                seconds=time.perf_counter() - start, **metrics, last_epoch_loss=last_epoch_loss,
                loss=losses)  # fmt: skip


def datasets(config: Config, device: torch.device) -> Tuple[List[Sample], List[Sample]]:
    """The training split (on ``device``, read every step) and the validation split; seeds
    2s and 2s + 1, so no two replicates share an image."""
    train_data = [(x.to(device), {k: v.to(device) for k, v in t.items()})
                  for x, t in make_dataset(config.train_images, config.image_size, seed=2 * config.seed)]  # fmt: skip
    return train_data, make_dataset(config.val_images, config.image_size, seed=2 * config.seed + 1)


_WORKER: Dict = {}  # a --jobs worker process's config, device and data


def _start_worker(config: Config, device: str, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(config=config, device=torch.device(device), data=datasets(config, torch.device(device)))


def _train_in_worker(run: Dict) -> Dict:
    return train(_WORKER["config"], run, *_WORKER["data"], _WORKER["device"])


def label(run: Dict) -> str:
    if run["optimizer"] == "sgd":
        return f"SGD       batch {run['batch']:4d}"
    t = "∞" if run["cycle_length"] is None else run["cycle_length"]
    return (
        f"{'PMD-LAMB' if run['optimizer'] == 'pmd-lamb' else 'LAMB':9s} batch {run['batch']:4d} T={t} α={run['alpha']}"
    )


def smoothed(values: Sequence[float], window: int) -> List[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot(doc: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    config, runs = doc["config"], doc["runs"]
    fig, (ax_batch, ax_ablation, ax_loss) = plt.subplots(1, 3, figsize=(16, 4.5))
    names = {
        "sgd": "SGD + LSR + warm-up",
        "lamb": "LAMB (T = ∞)",
        "pmd-lamb": f"PMD-LAMB (T = {config['cycle_length']})",
    }
    for optimizer, marker in zip(OPTIMIZERS, "osD"):
        sweep = [r for r in runs if r["optimizer"] == optimizer and in_sweep(config, r)]
        ax_batch.plot(
            [r["batch"] for r in sweep], [100 * r["mAP"] for r in sweep], marker=marker, label=names[optimizer]
        )
        for r in sweep:
            if r["diverged"]:
                ax_batch.annotate("diverged", (r["batch"], 0), xytext=(-12, 8), textcoords="offset points", fontsize=8)
    ax_batch.set(xscale="log", xlabel="batch size (images per step)", ylabel="COCO mAP@[.5:.95] (%)",
                 title=f"Fixed budget: {config['epochs']} epochs")  # fmt: skip
    ax_batch.minorticks_off()
    ax_batch.set_xticks(config["batch_sizes"], [str(b) for b in config["batch_sizes"]])
    ax_batch.legend()

    bars = ablation_bars(config, runs)
    drawn = ax_ablation.bar(range(len(bars)), [100 * r["mAP"] for _, r in bars],
                            color=["C2" if name.startswith("T") else "C4" for name, _ in bars])  # fmt: skip
    ax_ablation.bar_label(drawn, fmt="%.1f", fontsize=8)  # a 0.0 bar is otherwise invisible
    ax_ablation.set_xticks(range(len(bars)), [name for name, _ in bars], rotation=30)
    ax_ablation.set(ylabel="COCO mAP@[.5:.95] (%)", title=f"PMD-LAMB ablation, batch {config['ablation_batch']} "
                    f"(α={config['alpha']} | T={config['cycle_length']})")  # fmt: skip

    largest = max(config["batch_sizes"])
    for r in runs:
        if (
            r["batch"] == largest
            and r["alpha"] == config["alpha"]
            and r["optimizer"] != "sgd"
            and (r["optimizer"] == "lamb" or r["cycle_length"] == config["cycle_length"])
        ):
            window = max(1, len(r["loss"]) // 20)
            ax_loss.plot(range(1, len(r["loss"]) + 1), smoothed(r["loss"], window), label=names[r["optimizer"]])
    # Log scale: a run that blows up and comes back (a finite spike of 1e11) would flatten every curve.
    ax_loss.set(xlabel="step", ylabel="training loss (moving average)", yscale="log",
                title=f"Loss, batch {largest} (the paper's Fig. 5)")  # fmt: skip
    for axis in (ax_loss.yaxis.set_major_formatter, ax_loss.yaxis.set_minor_formatter):
        axis(matplotlib.ticker.FormatStrFormatter("%g"))  # 1.2, 1e+10, not 1.2 × 10⁰
    ax_loss.legend()
    meta = doc["meta"]
    fig.suptitle(
        f"Convergence, config {meta['config']}, seed {config['seed']}, LAMB's η {config['lamb_lr']} and SGD's "
        f"{config['sgd_lr']} at batch {config['batch_sizes'][0]}, on {meta['device_name']}, torch {meta['torch']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of every study of one config: this one's and benchmarks.trust_ratios'."""
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, ...")
    parser.add_argument("--out", type=Path, default=RUNS_DIR, help="where the JSON and PNG go")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data, the fresh weights and the image order")


def study_device(args: argparse.Namespace) -> torch.device:
    return torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def study_meta(module: str, argv: Optional[Sequence[str]], args: argparse.Namespace, device: torch.device) -> Dict:
    """What a study's JSON says of its run: the benchmark's run_meta, the config and torchvision's version."""
    return dict(run_meta(device, module, argv), config=args.config, torchvision=_version("torchvision"))


def write_study(doc: Dict, out: Path, prefix: str, plot: Callable[[Dict, Path], None]) -> Path:
    """Writes ``doc`` as step_time.save_results does (NaN refused: a diverged run is recorded as such), and its
    plot beside it as .png, and says so."""
    path = save_results(doc, out, prefix, allow_nan=False)
    plot(doc, path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.png')}")
    return path


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_arguments(parser)
    parser.add_argument("--no-files", action="store_true", help="print the results only")
    parser.add_argument(
        "--lamb-lr", type=float, help="LAMB's and PMD-LAMB's η at the smallest batch (default: the config's lamb_lr)"
    )
    parser.add_argument("--ablation-batch", type=int, help="the T/α ablation's batch size (default: the config's)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, in processes sharing the cores (and the GPU: the small "
                             "detector leaves most of a GPU idle, so several runs share one well)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    device = study_device(args)
    # Overrides are named in the file names, so two studies of one config never overwrite each other.
    overrides = {k: v for k, v in (("lamb_lr", args.lamb_lr), ("ablation_batch", args.ablation_batch)) if v is not None}
    try:
        config = dataclasses.replace(CONFIGS[args.config], seed=args.seed, **overrides)
    except ValueError as error:
        parser.error(str(error))
    meta = dict(study_meta("benchmarks.convergence", argv, args, device), pycocotools=_version("pycocotools"),
                jobs=args.jobs, threads=max(1, torch.get_num_threads() // args.jobs))  # threads: per run
    start = time.perf_counter()
    runs = []
    with contextlib.ExitStack() as stack:
        if args.jobs == 1:
            data = datasets(config, device)
            results = (train(config, run, *data, device) for run in plan(config))
        else:
            pool = stack.enter_context(ProcessPoolExecutor(
                args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                initargs=(config, str(device), meta["threads"])))  # fmt: skip
            results = pool.map(_train_in_worker, plan(config))
        for result in results:
            runs.append(result)
            print(f"{label(result):40s} lr {result['lr']:<7.4g} {result['steps']:5d} steps  "
                  f"mAP {100 * result['mAP']:5.1f}  AP50 {100 * result['AP50']:5.1f}  "
                  + (f"DIVERGED at step {len(result['loss']) + 1}" if result["diverged"]
                     else f"last epoch's loss {result['last_epoch_loss']:.3f}")
                  + f"  {result['seconds']:.0f} s", flush=True)  # fmt: skip
    meta["seconds"] = time.perf_counter() - start
    print(f"{len(runs)} runs in {meta['seconds']:.0f} s")
    doc = {"meta": meta, "config": dataclasses.asdict(config), "runs": runs}
    if not args.no_files:
        prefix = f"convergence-{args.config}{''.join(f'-{k}{v}' for k, v in overrides.items())}-seed{config.seed}-"
        write_study(doc, args.out, prefix, plot)
    return doc


if __name__ == "__main__":
    main(sys.argv[1:])
