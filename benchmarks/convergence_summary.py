"""The convergence study across seeds: docs/convergence.md's tables, from the JSON files.

    python -m benchmarks.convergence_summary benchmarks/results/convergence-cpu-*AMD-EPYC-2026-11-25.json

Groups the runs of several ``benchmarks.convergence`` files (replicate seeds, and studies
of one config with another η) by what was trained: optimizer, batch, T, α and η at the
smallest batch. Prints markdown tables of COCO mAP@[.5:.95] in %, every seed and the mean
(the batch-size sweep, then each T/α ablation), and writes a PNG of the sweep's mean with
the seeds' range; benchmarks.tables writes the tables into docs/convergence.md. A cell
reads "div." where the loss became non-finite, and its mAP has a "↑" where the loss
stayed finite but rose above BLOW_UP times its first value.

Training is deterministic on one machine but not across CPUs (rounding differs, and
thousands of steps amplify it), so the files must come from one machine, and the same run
found twice for one seed (SGD in two studies that differ only in LAMB's η) must agree in
its every loss and its mAP, or the summary refuses.
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from benchmarks.convergence import OPTIMIZERS, ablation_bars, in_sweep

BLOW_UP = 10.0
NAMES = {"sgd": "SGD + LSR + warm-up", "lamb": "LAMB (T = ∞)", "pmd-lamb": "PMD-LAMB"}
Key = Tuple[str, int, Optional[int], Optional[float], float]  # optimizer, batch, T, α, η at the smallest batch


def _key(config: Dict, run: Dict) -> Key:
    eta = config["sgd_lr"] if run["optimizer"] == "sgd" else config["lamb_lr"]
    return run["optimizer"], run["batch"], run["cycle_length"], run["alpha"], eta


def collect(docs: Sequence[Dict]) -> Tuple[Dict[Key, Dict[int, Dict]], Dict[Key, Dict[int, Dict]], List[int]]:
    """The sweep's and the ablation's runs, each as {key: {seed: run}}, and the seeds."""
    if not docs:
        raise ValueError("no convergence files given")
    configs = {json.dumps({k: v for k, v in d["config"].items() if k not in ("seed", "lamb_lr", "ablation_batch")},
                          sort_keys=True) for d in docs}  # fmt: skip
    if len(configs) > 1:
        raise ValueError("the files come from different configs (other than seed, lamb_lr and ablation_batch)")
    devices = {d["meta"]["device_name"] for d in docs}
    if len(devices) > 1:
        raise ValueError(f"the files come from {len(devices)} machines ({', '.join(sorted(devices))}): "
                         "another CPU rounds differently, and thousands of steps amplify it")  # fmt: skip
    sweep: Dict[Key, Dict[int, Dict]] = defaultdict(dict)
    ablation: Dict[Key, Dict[int, Dict]] = defaultdict(dict)
    for doc in docs:
        config, seed = doc["config"], doc["config"]["seed"]
        for run in doc["runs"]:
            key = _key(config, run)
            table = sweep if in_sweep(config, run) else ablation
            same = table[key].get(seed, run)
            if (same["mAP"], same["loss"]) != (run["mAP"], run["loss"]):
                raise ValueError(f"{key} seed {seed} was trained twice with different results: mAP {same['mAP']} "
                                 f"and {run['mAP']}, losses {'equal' if same['loss'] == run['loss'] else 'not'}")  # fmt: skip
            table[key][seed] = run
    seeds = sorted({d["config"]["seed"] for d in docs})
    return dict(sweep), dict(ablation), seeds


def _value(run: Dict) -> str:
    if run["diverged"]:
        return "div."
    return f"{100 * run['mAP']:.1f}" + ("↑" if max(run["loss"]) > BLOW_UP * run["loss"][0] else "")


def _cell(runs: Dict[int, Dict], seeds: Sequence[int]) -> str:
    """Every seed's mAP and, when every seed has one, the mean (a diverged run counts as 0)."""
    values = ["—" if s not in runs else _value(runs[s]) for s in seeds]
    found = [100 * runs[s]["mAP"] for s in seeds if s in runs]
    return " / ".join(values) + (f" (**{sum(found) / len(found):.1f}**)" if len(seeds) == len(found) > 1 else "")


def _row_name(optimizer: str, t: Optional[int], eta: float) -> str:
    if optimizer == "sgd":
        return f"{NAMES['sgd']}, η {eta:g}"
    name = NAMES["lamb"] if optimizer == "lamb" else f"PMD-LAMB (T = {t})"
    return f"{name}, η {eta:g}"


def _rows(sweep: Dict[Key, Dict[int, Dict]]) -> List[Tuple[str, Optional[int], Optional[float], float]]:
    """The sweep's lines: (optimizer, T, α, η), in OPTIMIZERS' order, then by η."""
    return sorted({(k[0], k[2], k[3], k[4]) for k in sweep}, key=lambda r: (OPTIMIZERS.index(r[0]), r[3]))


def tables(docs: Sequence[Dict]) -> str:
    sweep, ablation, seeds = collect(docs)
    config = docs[0]["config"]
    steps = {k[1]: run["steps"] for k, runs in sweep.items() for run in runs.values()}  # one epoch budget: per batch
    batches = sorted(steps)
    rows, base = _rows(sweep), config["batch_sizes"][0]  # η is given at the config's smallest batch
    lines = [f"mAP@[.5:.95] in %, seeds {' / '.join(map(str, seeds))} (**mean**); η at batch {base}; "
             f"div.: non-finite loss; ↑: loss above {BLOW_UP:g}× its first value at some step",
             "", "| | " + " | ".join(f"batch {b} ({steps[b]} steps)" for b in batches) + " |",
             "|---" * (len(batches) + 1) + "|"]  # fmt: skip
    for optimizer, t, a, eta in rows:
        cells = [_cell(sweep.get((optimizer, b, t, a, eta), {}), seeds) for b in batches]
        lines.append(f"| {_row_name(optimizer, t, eta)} | " + " | ".join(cells) + " |")
    # The ablation beside its references from the sweep: T = config's and T = ∞ at the ablation's batch.
    studies = sorted({(k[1], k[4]) for k in ablation})
    every = {**sweep, **ablation}
    for batch, eta in studies:
        # One run of each key stands for its seeds in the choice and order of the bars.
        runs = [dict(next(iter(v.values())), key=k) for k, v in every.items() if k[4] == eta]
        lines += ["", f"Ablation at batch {batch}, η {eta:g} (α = {config['alpha']} | T = {config['cycle_length']})",
                  "", "| | mAP |", "|---|---|"]  # fmt: skip
        lines += [f"| {name} | {_cell(every[r['key']], seeds)} |"
                  for name, r in ablation_bars(dict(config, ablation_batch=batch), runs)]  # fmt: skip
    return "\n".join(lines)


def plot(docs: Sequence[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep, _, seeds = collect(docs)
    config = docs[0]["config"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = _rows(sweep)
    etas = sorted({r[3] for r in rows if r[0] != "sgd"})  # one line style per η of LAMB and PMD-LAMB
    for optimizer, t, a, eta in rows:
        points = sorted((k[1], [100 * r["mAP"] for r in runs.values()]) for k, runs in sweep.items()
                        if (k[0], k[2], k[3], k[4]) == (optimizer, t, a, eta))  # fmt: skip
        batches = [b for b, _ in points]
        mean = [sum(v) / len(v) for _, v in points]
        low = [m - min(v) for m, (_, v) in zip(mean, points)]
        high = [max(v) - m for m, (_, v) in zip(mean, points)]
        style = "-" if optimizer == "sgd" else ["-", "--", ":", "-."][etas.index(eta) % 4]
        index = OPTIMIZERS.index(optimizer)
        ax.errorbar(batches, mean, yerr=[low, high], capsize=3, marker="osD"[index], color=f"C{index}",
                    linestyle=style, label=_row_name(optimizer, t, eta))  # fmt: skip
    devices = sorted({d["meta"]["device_name"] for d in docs})
    ax.set(xscale="log", xlabel="batch size (images per step)", ylabel="COCO mAP@[.5:.95] (%)",
           title=f"{config['epochs']} epochs, seeds {', '.join(map(str, seeds))}: mean and range"
                 + "".join(f", on {d}" for d in devices))  # fmt: skip
    ax.minorticks_off()
    ax.set_xticks(config["batch_sizes"], [str(b) for b in config["batch_sizes"]])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="JSON files of benchmarks.convergence")
    parser.add_argument("--png", type=Path, help="where the plot goes (default: no plot)")
    args = parser.parse_args(argv)
    docs = [json.loads(f.read_text()) for f in args.files]
    try:
        text = tables(docs)
    except ValueError as error:
        parser.error(str(error))
    print(text)
    if args.png:
        plot(docs, args.png)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
