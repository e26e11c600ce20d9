"""CPU step time from 1 thread to all cores: the cpu backend against timm's Lamb and the
copy bandwidth measured at the same thread count, interleaved, round after round.

    python -m benchmarks.cpu_threads                      # Faster R-CNN R50-FPN, fp32
    python -m benchmarks.cpu_threads --rounds 7 --out benchmarks/results

The floor of NOTE [cpu passes] is 28 B/elem (x, g, m, v read; x, m, v written); the
two-pass design, 40 B/elem, is what tensors larger than one chunk cost.
"""

import argparse
import datetime
import json
import os
import statistics
from pathlib import Path

import torch

from benchmarks.contenders import CONTENDERS
from benchmarks.step_time import copy_bandwidth, cpu_name, load_shapes, make_params, time_ms

NAMES = ("pmdlamb[cpu]", "pmdlamb[torch]", "timm Lamb", "timm Lamb foreach")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="faster_rcnn_r50_fpn")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per contender per round")
    ap.add_argument("--out", default=None, help="folder for the JSON (none: print only)")
    args = ap.parse_args(argv)

    device = torch.device("cpu")
    shapes = load_shapes(args.set)
    numel = sum(torch.Size(s).numel() for s in shapes)
    contenders = [c for c in CONTENDERS if c.name in NAMES]
    threads_all = torch.get_num_threads()
    rows = []
    for threads in range(1, threads_all + 1):
        torch.set_num_threads(threads)
        steps = {}
        for c in contenders:
            reason = c.unavailable(device)
            if reason is None:
                steps[c.name] = c.make(make_params(shapes, device, torch.float32))
                steps[c.name]()  # warm-up
        times = {name: [] for name in steps}
        bandwidth = []
        for _ in range(args.rounds):
            bandwidth.append(copy_bandwidth(device, numel, repeats=3))
            for name, step in steps.items():
                times[name] += time_ms(step, device, args.steps)
        bw = statistics.median(bandwidth)
        row = {"threads": threads, "copy_GBps": bw / 1e9, "floor28_ms": 28 * numel / bw * 1e3,
               "two_pass40_ms": 40 * numel / bw * 1e3,
               "median_ms": {name: statistics.median(t) for name, t in times.items()},
               "min_ms": {name: min(t) for name, t in times.items()}}  # fmt: skip
        rows.append(row)
        cells = "  ".join(f"{n} {row['median_ms'][n]:7.1f}" for n in times)
        print(f"threads {threads}: copy {row['copy_GBps']:.1f} GB/s, 28 B floor {row['floor28_ms']:.1f} ms, "
              f"40 B {row['two_pass40_ms']:.1f} ms | {cells}  (median ms)", flush=True)  # fmt: skip
    torch.set_num_threads(threads_all)
    result = {"set": args.set, "numel": numel, "dtype": "float32", "cpu": cpu_name(), "cores": os.cpu_count(),
              "torch": torch.__version__, "rounds": args.rounds, "steps_per_round": args.steps, "rows": rows,
              "command": "python -m benchmarks.cpu_threads " + " ".join(argv or [])}  # fmt: skip
    if args.out:
        name = f"{cpu_name().replace(' ', '-').replace('(', '').replace(')', '')}-{datetime.date.today()}-threads.json"
        path = Path(args.out) / name
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
