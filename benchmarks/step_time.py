"""The main job: one optimizer step of every contender, on the memory roofline.

    python -m benchmarks.step_time                # every set and dtype for the device found
    python -m benchmarks.step_time --device cpu --sets many_small --limit 200

Parameter sets ship as JSON in benchmarks/shapes/ (no model downloads). For each
set and dtype, all contenders share the parameters and gradients, keep their own
state, and run interleaved, round after round, so a noisy machine hurts them alike.
Reported per contender: median (min, max) step time — CUDA events after warm-up on
a GPU, perf_counter on CPU — effective bytes per element (time × the copy bandwidth
measured in the same run / N) against the one-pass floor and the two-pass design
of element_bytes (fp32: 28 and 40 B/elem; fp16/bf16 with fp32 masters: 28 and 40 too),
kernel launches per step (torch.profiler), host time per step,
peak extra memory, CUDA-graph replay time where the step is capturable, and the
speed-up over apex FusedLAMB when apex is present. Prints each set's table with the
columns that apply to the device and a legend under it (progress goes to stderr), and
writes a JSON of every number and a PNG chart to --out; --plot JSON redraws a chart.
"""

import argparse
import datetime
import itertools
import importlib.metadata
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from benchmarks.contenders import CONTENDERS, Contender

SHAPES_DIR = Path(__file__).parent / "shapes"
# The committed results, which the tables of README.md and docs/ are generated from: a run lands there only
# when copied there (docs/benchmark.md). Runs write to RUNS_DIR, which git ignores, each under a name of its own.
RESULTS_DIR = Path(__file__).parent / "results"
RUNS_DIR = Path(__file__).resolve().parent.parent / "runs"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOW_PRECISION = (torch.bfloat16, torch.float16)
GPU_SETS, CPU_SETS = ("faster_rcnn_r50_fpn", "mask_rcnn_r50_fpn", "bert_large", "many_small"), (
    "faster_rcnn_r50_fpn", "many_small")  # fmt: skip


def element_bytes(x: torch.dtype, g: torch.dtype, masters: bool, moments: torch.dtype) -> Tuple[int, int]:
    """Bytes per element of a step (NOTE [two passes] in largedet_kernels/triton_kernels.py): one pass reads x
    (its fp32 master, when kept), g, m, v and writes x, the master, m, v; two passes read x or the master, m and
    v once more.
    fp32: 28 and 40; bf16 with fp32 gradients and masters: 30 and 42."""
    size = {d: torch.empty((), dtype=d).element_size() for d in (x, g, moments, torch.float32)}
    source = size[torch.float32] if masters else size[x]
    one_pass = source + size[g] + 2 * size[moments] + size[x] + (size[torch.float32] if masters else 0)
    one_pass += 2 * size[moments]
    return one_pass, one_pass + source + 2 * size[moments]


def default_bytes(dtype: torch.dtype) -> Tuple[int, int]:
    """element_bytes of PMDLAMB's defaults for parameters and gradients of dtype (masters for fp16/bf16)."""
    return element_bytes(dtype, dtype, dtype in LOW_PRECISION, torch.float32)


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


def cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        return next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def _version(module: str) -> Optional[str]:
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_meta(device: torch.device, module: str, argv: Optional[List[str]]) -> Dict:
    """What a results JSON says of its run: date, command line, device, versions."""
    on_gpu = device.type == "cuda"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "command": f"python -m {module} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if on_gpu else cpu_name(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
        "python": platform.python_version(), "threads": torch.get_num_threads(),
    }  # fmt: skip


def file_stem(meta: Dict, prefix: str = "") -> str:
    """The results' file name without suffix: <prefix><device name>-<date>."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{prefix}{meta['device_name']}-{meta['date']}").strip("-")


def unused_stem(out: Path, stem: str) -> str:
    """``stem``, or ``stem``-2, -3, ...: the first that names no file in ``out``, so that no run overwrites
    another's results."""
    taken = {p.stem for p in out.glob(f"{stem}*")}
    candidates = itertools.chain([stem], (f"{stem}-{n}" for n in itertools.count(2)))
    return next(s for s in candidates if s not in taken)


def save_results(doc: Dict, out, prefix: str = "", allow_nan: bool = True) -> Path:
    """Writes ``doc`` to <out>/<file_stem>[-N].json, a name no earlier run took, and says so."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{unused_stem(out, file_stem(doc['meta'], prefix))}.json"
    path.write_text(json.dumps(doc, indent=1, allow_nan=allow_nan) + "\n")
    print(f"wrote {path}")
    return path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], None], device: torch.device, n: int) -> List[float]:
    """Milliseconds of each of n calls: CUDA events on a GPU, perf_counter on CPU."""
    times = []
    for _ in range(n):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


# A contender's rounds disagree beyond these when the machine was busy while it ran: its median then says less.
NOISY_MEDIAN_OVER_MIN, NOISY_MAX_OVER_MIN = 1.25, 2.0
# The copy bandwidth measured before and after the rounds disagreeing by more than this: the machine was busy.
BUSY_BANDWIDTH_CHANGE = 0.2


# The legend of the ~ mark, under every table that shows it (here and benchmarks/tables.py).
NOISY_LEGEND = (f"~: noisy, its rounds disagree (median/min above {NOISY_MEDIAN_OVER_MIN} or max/min above "
                f"{NOISY_MAX_OVER_MIN}): the machine was busy while it ran")


def noisy(row: Dict) -> bool:
    """Whether a row's step times spread beyond NOISY_MEDIAN_OVER_MIN (median/min) or NOISY_MAX_OVER_MIN (max/min)."""
    low = row["min_ms"]
    return row["median_ms"] > NOISY_MEDIAN_OVER_MIN * low or row["max_ms"] > NOISY_MAX_OVER_MIN * low


def busy_line(meta: Dict) -> Optional[str]:
    """One line when the copy bandwidth before and after the rounds disagree, else None."""
    before, after = meta["copy_bandwidth_GBps"], meta.get("copy_bandwidth_after_GBps")
    if after is None or abs(after - before) <= BUSY_BANDWIDTH_CHANGE * before:
        return None
    return (f"the machine looked busy: copy bandwidth {before:.1f} GB/s before the rounds, {after:.1f} after; "
            "rerun on a quiet machine before comparing with another run")  # fmt: skip


def copy_bandwidth(device: torch.device, numel: int, repeats: int = 10) -> float:
    """Bytes per second of a device-to-device copy (bytes read plus written)."""
    src = torch.empty(numel, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    time_ms(lambda: dst.copy_(src), device, 2)
    ms = statistics.median(time_ms(lambda: dst.copy_(src), device, repeats))
    return 2 * 4 * numel / (ms / 1e3)


def launches_per_step(step: Callable[[], None], device: torch.device) -> Optional[int]:
    """GPU kernels and memsets one step enqueues (torch.profiler); None off the GPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        _sync(device)
    kinds = ("kernel", "gpu_memset", "gpu_memcpy")
    return sum(1 for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
               and any(k in str(getattr(e, "cuda_kernel_type", "kernel")).lower() for k in kinds))  # fmt: skip


def host_times_ms(step: Callable[[], None], device: torch.device, n: int) -> List[float]:
    """Milliseconds for each of n calls of step() to return, the device idle at each call: the host's
    cost alone, as the launches are only enqueued (benchmarks/host_overhead.py times with this too)."""
    times = []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    _sync(device)
    return times


def host_ms(step: Callable[[], None], device: torch.device, n: int) -> float:
    """Median time for step() to return, the device idle at each call."""
    return statistics.median(host_times_ms(step, device, n))


def peak_extra_bytes(step: Callable[[], None], device: torch.device) -> Optional[int]:
    """Memory a step allocates beyond what is already held; None off the GPU."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def graph_replay_ms(step: Callable[[], None], device: torch.device, n: int) -> Optional[float]:
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    time_ms(graph.replay, device, 3)
    return statistics.median(time_ms(graph.replay, device, n))


def bench_set(name: str, dtype_name: str, device: torch.device, contenders: List[Contender], args,
              bandwidth: float) -> Dict:  # fmt: skip
    shapes = load_shapes(name, args.limit)
    numel = sum(torch.Size(s).numel() for s in shapes)
    floor_bytes, two_pass_bytes = default_bytes(DTYPES[dtype_name])
    params = make_params(shapes, device, DTYPES[dtype_name])
    steps: Dict[str, Callable[[], None]] = {}
    skipped: Dict[str, str] = {}
    # One unit per contender for its warm-up, each round and its extra measures; stderr, so the table stays clean.
    bar = tqdm(total=len(contenders) * (args.rounds + 2), desc=f"{name} {dtype_name}", unit="stage", leave=False,
               file=sys.stderr, disable=args.quiet)  # fmt: skip
    for c in contenders:
        bar.set_postfix_str(f"{c.name}: warm-up")
        reason = c.unavailable(device) or c.refuses(DTYPES[dtype_name])
        if reason is None:
            try:
                steps[c.name] = c.make(params)
                time_ms(steps[c.name], device, args.warmup)
            except Exception as err:  # a peer that breaks is reported, not fatal
                steps.pop(c.name, None)
                reason = f"failed: {type(err).__name__}: {err}"
        if reason is not None:
            skipped[c.name] = reason
        bar.update(1 if reason is None else args.rounds + 2)
    times: Dict[str, List[float]] = {n: [] for n in steps}
    for round_ in range(args.rounds):
        for n, step in steps.items():
            bar.set_postfix_str(f"{n}: round {round_ + 1}/{args.rounds}")
            times[n] += time_ms(step, device, args.steps)
            bar.update(1)
    by_name = {c.name: c for c in contenders}
    rows = {}
    for n, step in steps.items():
        bar.set_postfix_str(f"{n}: launches, host time, memory")
        median = statistics.median(times[n])
        row = {
            "median_ms": median, "min_ms": min(times[n]), "max_ms": max(times[n]), "samples": len(times[n]),
            "bytes_per_elem": median / 1e3 * bandwidth / numel,
            "two_pass_roofline": two_pass_bytes * numel / bandwidth * 1e3 / median,
            "launches": launches_per_step(step, device), "host_ms": host_ms(step, device, args.steps),
            "peak_extra_mib": None, "graph_replay_ms": None,
        }  # fmt: skip
        row["noisy"] = noisy(row)
        extra = peak_extra_bytes(step, device)
        row["peak_extra_mib"] = None if extra is None else extra / 2**20
        if device.type == "cuda" and by_name[n].capturable:
            try:
                row["graph_replay_ms"] = graph_replay_ms(step, device, args.steps)
            except Exception as err:
                row["graph_replay_error"] = f"{type(err).__name__}: {err}"
        rows[n] = row
        bar.update(1)
    bar.close()
    apex = rows.get("apex FusedLAMB", {}).get("median_ms")
    for row in rows.values():
        row["speedup_vs_apex"] = apex / row["median_ms"] if apex else None
    del steps, params
    return {"set": name, "dtype": dtype_name, "tensors": len(shapes), "params": numel, "rows": rows,
            "skipped": skipped, "floor_bytes": floor_bytes, "two_pass_bytes": two_pass_bytes}  # fmt: skip


# Heading (two lines, each read without the legend), row key, format, shown off the GPU. A column shows where it
# applies to the device and a row has a value.
COLUMNS = (
    (("median", "ms"), "median_ms", ".3f", True), (("min", ""), "min_ms", ".3f", True),
    (("max", ""), "max_ms", ".3f", True), (("bytes per", "element"), "bytes_per_elem", ".1f", True),
    (("% of {two_pass_bytes}B", "roofline"), "two_pass_roofline", ".0%", True),
    (("launches", ""), "launches", "d", False), (("host", "ms"), "host_ms", ".3f", False),
    (("extra", "MiB"), "peak_extra_mib", ".1f", False), (("graph", "ms"), "graph_replay_ms", ".3f", False),
    (("vs", "apex"), "speedup_vs_apex", ".2f", False),
)  # fmt: skip
CPU_ROOFLINE = ("above 100% on CPU: a copy's stores first read their lines (12 B moved per 8 counted), the step's "
                "do not, and one-chunk tensors take pass 2 from cache")


def columns(result: Dict, device_type: str) -> List[Tuple[Tuple[str, str], str, str]]:
    """The table's columns (heading lines, key, format) for a device type: those that apply and have a value."""
    return [(tuple(line.format(**result) for line in head), key, spec) for head, key, spec, off_gpu in COLUMNS
            if (off_gpu or device_type == "cuda") and any(r[key] is not None for r in result["rows"].values())]


def legend(result: Dict, meta: Dict) -> List[str]:
    """One line per column shown, saying what it is."""
    on_gpu = meta["device"].startswith("cuda")
    clock = "CUDA events" if on_gpu else "perf_counter"
    two, one = result["two_pass_bytes"], result["floor_bytes"]
    text = {
        "median_ms": f"median ms, min, max: step time ({clock}), over every timed step of every round",
        "bytes_per_elem": f"bytes per element: median × copy bandwidth ({meta['copy_bandwidth_GBps']:.0f} GB/s) / "
                          f"parameters; {one} is the one-pass floor, {two} the two-pass design",
        "two_pass_roofline": f"% of {two}B roofline: the time {two} B/elem takes at copy bandwidth / median "
                             "(100%: on that roofline)",
        "launches": "launches: kernels, memsets and copies one step enqueues (torch.profiler)",
        "host_ms": "host ms: time for step() to return, the GPU idle at each call",
        "peak_extra_mib": "extra MiB: memory a step allocates beyond what is held",
        "graph_replay_ms": "graph ms: median replay of the step captured in a CUDA graph",
        "speedup_vs_apex": "vs apex: apex FusedLAMB's median / this median",
    }  # fmt: skip
    keys = [key for _, key, _ in columns(result, "cuda" if on_gpu else "cpu") if key not in ("min_ms", "max_ms")]
    lines = [text[key] for key in keys]
    return lines if on_gpu else lines + [CPU_ROOFLINE]


def print_table(result: Dict, meta: Dict, out=None) -> None:
    """The set's table, its legend under it, then the contenders skipped and why."""
    out = out or sys.stdout
    cols = columns(result, "cuda" if meta["device"].startswith("cuda") else "cpu")
    print(f"\n{result['set']} ({result['tensors']} tensors, {result['params'] / 1e6:.1f}M params, {result['dtype']}) "
          f"on {meta['device_name']}; copy bandwidth {meta['copy_bandwidth_GBps']:.0f} GB/s", file=out)  # fmt: skip
    for line in range(2):
        print(f"{'contender' if line == 0 else '':<21}" + "".join(f"{head[line]:>11}" for head, _, _ in cols),
              file=out)  # fmt: skip
    for name, r in result["rows"].items():
        cells = ["-" if r[key] is None else format(r[key], spec) for _, key, spec in cols]
        print(f"{name + (' ~' if noisy(r) else ''):<21}" + "".join(f"{c:>11}" for c in cells), file=out)
    for line in legend(result, meta):
        print(f"  {line}", file=out)
    if any(noisy(r) for r in result["rows"].values()):
        print(f"  {NOISY_LEGEND}", file=out)
    for name, reason in result["skipped"].items():
        print(f"{name:<21}skipped: {reason}", file=out)


def plot(results: List[Dict], meta: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, axes = plt.subplots(len(results), 2, figsize=(13, 3.4 * len(results)), squeeze=False)
    for (ax_t, ax_b), res in zip(axes, results):
        names = list(res["rows"])
        ms = [res["rows"][n]["median_ms"] for n in names]
        bpe = [res["rows"][n]["bytes_per_elem"] for n in names]
        colors = ["tab:green" if n.startswith("pmdlamb") else "tab:gray" for n in names]
        spread = [[m - res["rows"][n]["min_ms"] for n, m in zip(names, ms)],
                  [res["rows"][n]["max_ms"] - m for n, m in zip(names, ms)]]  # fmt: skip
        labels = [n + (" ~" if noisy(res["rows"][n]) else "") for n in names]
        bars = ax_t.barh(labels, ms, color=colors, xerr=spread, error_kw=dict(ecolor="k", lw=0.8, capsize=2))
        ax_t.bar_label(bars, fmt="%.1f", padding=3, fontsize=8)
        ax_t.set_xlabel("median step time, ms, whiskers min to max (lower is better; ~: noisy)")
        skipped = f"\nskipped (table: why): {', '.join(res['skipped'])}" if res["skipped"] else ""
        ax_t.set_title(f"{res['set']}, {res['dtype']}: {res['tensors']} tensors, {res['params'] / 1e6:.1f}M params"
                       + skipped, fontsize=9)  # fmt: skip
        floor_bytes, two_pass_bytes = res["floor_bytes"], res["two_pass_bytes"]
        # Each bar and line says what it is: no legend to look up.
        roofline = [res["rows"][n]["two_pass_roofline"] for n in names]
        bars = ax_b.barh(labels, bpe, color=colors)
        ax_b.bar_label(bars, labels=[f"{b:.1f} ({r:.0%})" for b, r in zip(bpe, roofline)], padding=3, fontsize=8,
                       bbox=dict(facecolor="white", edgecolor="none", pad=0.5))  # over the lines, not struck through
        for at, style, what, side in ((floor_bytes, ":", "one-pass floor ", "right"),
                                      (two_pass_bytes, "--", " two-pass design", "left")):  # fmt: skip
            ax_b.axvline(at, ls=style, color="k", lw=1)
            label = f"{what}{at} B" if side == "right" else f"{at} B{what}"
            ax_b.text(at, 1.01, label, transform=ax_b.get_xaxis_transform(), ha=side, va="bottom", fontsize=7)
        ax_b.set_title(f"bytes per element (in brackets: speed as % of the {two_pass_bytes} B roofline)", fontsize=9,
                       pad=14)  # fmt: skip
        ax_b.set_xlabel("median × copy bandwidth / parameters, B (lower is better)")
        whiskers = [res["rows"][n][key] for n in names for key in ("min_ms", "max_ms")]
        for ax, values, room in ((ax_t, whiskers, 2), (ax_b, bpe + [floor_bytes, two_pass_bytes], 3)):
            ax.invert_yaxis()
            ax.set_xscale("log")
            # Room right of the longest bar for its label; plain tick labels at 1, 2 and 5 of each decade.
            ax.set_xlim(min(values) / 1.5, max(values) * room)
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
    title = (f"PMD-LAMB step on {meta['device_name']}, {meta.get('threads', '?')} threads, copy bandwidth "
             f"{meta['copy_bandwidth_GBps']:.1f} GB/s ({meta['date']}, torch {meta['torch']})")
    fig.suptitle(title + ("\n" + busy_line(meta) if busy_line(meta) else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sets = sorted(p.stem for p in SHAPES_DIR.glob("*.json"))
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--sets", nargs="+", choices=sets, help=f"default: {GPU_SETS} on a GPU, {CPU_SETS} on CPU")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default: float32 bfloat16 on a GPU")
    parser.add_argument("--contenders", nargs="+", help="only these (default: all)")
    parser.add_argument("--skip", nargs="+", default=[], help="contenders to leave out (reported as skipped)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N tensors of each set")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per contender")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per contender per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RUNS_DIR, help="where the JSON and PNG go (default: runs/)")
    parser.add_argument("--no-files", action="store_true", help="print the table only")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--plot", type=Path, metavar="JSON", help="draw the PNG of a results file beside it, and stop")
    args = parser.parse_args(argv)
    if args.plot:
        doc = json.loads(args.plot.read_text())
        plot(doc["results"], doc["meta"], args.plot.with_suffix(".png"))
        return doc
    unknown = sorted((set(args.contenders or []) | set(args.skip)) - {c.name for c in CONTENDERS})
    if unknown:
        parser.error(f"no contenders named {unknown}; benchmarks/contenders.py has {[c.name for c in CONTENDERS]}")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    args.sets = args.sets or list(GPU_SETS if on_gpu else CPU_SETS)
    args.dtypes = args.dtypes or (["float32", "bfloat16"] if on_gpu else ["float32"])
    args.warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    args.steps = args.steps if args.steps is not None else (30 if on_gpu else 2)
    chosen = [c for c in CONTENDERS if not args.contenders or c.name in args.contenders]

    meta = run_meta(device, "benchmarks.step_time", argv)
    if not args.quiet:
        print(f"{' '.join(args.sets)} ({' '.join(args.dtypes)}) on {meta['device_name']}: {len(chosen)} contenders; "
              "measuring the copy bandwidth", file=sys.stderr)  # fmt: skip
    numel = max(sum(torch.Size(s).numel() for s in load_shapes(n, args.limit)) for n in args.sets)
    meta["copy_bandwidth_GBps"] = copy_bandwidth(device, max(numel, 1 << 20)) / 1e9
    results = []
    for name in args.sets:
        for dtype_name in args.dtypes:
            skip = {c.name: "left out with --skip" for c in chosen if c.name in args.skip}
            result = bench_set(name, dtype_name, device, [c for c in chosen if c.name not in skip], args,
                               meta["copy_bandwidth_GBps"] * 1e9)  # fmt: skip
            result["skipped"].update(skip)
            print_table(result, meta)
            results.append(result)
    meta["copy_bandwidth_after_GBps"] = copy_bandwidth(device, max(numel, 1 << 20)) / 1e9
    if busy_line(meta):
        print(f"\n{busy_line(meta)}")
    doc = {"meta": meta, "results": results}
    if not args.no_files:
        path = save_results(doc, args.out)
        plot(results, meta, path.with_suffix(".png"))
        print(f"and {path.with_suffix('.png')}; to commit them as the README's: docs/benchmark.md")
    return doc


if __name__ == "__main__":
    main(sys.argv[1:])
