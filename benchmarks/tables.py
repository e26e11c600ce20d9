"""Every table of results in README.md and docs/, generated from the committed JSON files.

    python -m benchmarks.tables --write   # regenerate every table in place
    python -m benchmarks.tables --check   # exit 1, naming the tables, where a file and its JSON disagree

A table lives in its markdown file between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``; TABLES
says, for each name, the file that holds it, the results files it is made from, and its renderer.
tests/test_tables.py runs the check, so a number edited by hand, or a results file replaced without
regenerating, fails the tests.
"""

import argparse
import json
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from benchmarks import convergence_summary, lr_sweep, mixed_precision, step_time

ROOT = Path(__file__).resolve().parent.parent
RESULTS = "benchmarks/results"
WIDTH = 100


@dataclass(frozen=True)
class Table:
    doc: str  # the markdown file holding the table, relative to ROOT
    sources: Sequence[str]  # results files, relative to ROOT
    render: Callable[[List[Dict]], str]  # the table's markdown from the loaded sources
    pattern: Optional[str] = None  # the glob that found the sources, named instead of a long list


def _source_line(table: Table) -> str:
    files = f"`{table.pattern}` ({len(table.sources)} files)" if table.pattern else ", ".join(
        f"`{s}`" for s in table.sources)  # fmt: skip
    return f"Generated from {files} by `python -m benchmarks.tables --write`."


def step_time_table(docs: List[Dict]) -> str:
    """The main job's medians and effective bytes per element, one pair of columns per set."""
    (doc,) = docs
    meta, results = doc["meta"], doc["results"]
    names = list(dict.fromkeys(name for r in results for name in r["rows"]))
    lines = [f"Measured by `{meta['command'].strip()}` ({meta['date']}, {meta['device_name']}, {meta['threads']} "
             f"threads, torch {meta['torch']}; copy bandwidth {meta['copy_bandwidth_GBps']:.1f} GB/s in the same "
             "run): median ms per step and effective bytes per element (B/elem: time × copy bandwidth / parameters)",
             "", "| contender | " + " | ".join(f"{r['set']}, {r['dtype']} ({r['tensors']} tensors, "
                                              f"{r['params'] / 1e6:.1f}M): ms | B/elem" for r in results) + " |",
             "|---|" + "---:|---:|" * len(results)]  # fmt: skip
    for name in names:
        cells = []
        for r in results:
            row = r["rows"].get(name)
            if row is None:
                cells += ["—", "—"]
            else:
                flag = " ~" if step_time.noisy(row) else ""
                cells += [f"{row['median_ms']:.1f}{flag}", f"{row['bytes_per_elem']:.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if any(step_time.noisy(row) for r in results for row in r["rows"].values()):
        lines += ["", step_time.NOISY_LEGEND]
    return "\n".join(lines)


def cpu_threads_table(docs: List[Dict]) -> str:
    """benchmarks.cpu_threads: the median step of each CPU contender on 1 and more threads."""
    (doc,) = docs
    names = list(doc["rows"][0]["median_ms"])
    lines = [f"Measured by `{doc['command'].strip()}` ({doc['cpu']}, {doc['cores']} cores, torch {doc['torch']}, "
             f"{doc['set']} {doc['dtype']}): median ms per step; the floors are 28 and 40 B/elem at the copy "
             "bandwidth of the same run", "",
             "| threads | copy GB/s | 28 B floor | 40 B two-pass | " + " | ".join(names) + " |",
             "|---:|---:|---:|---:|" + "---:|" * len(names)]  # fmt: skip
    for row in doc["rows"]:
        lines.append(f"| {row['threads']} | {row['copy_GBps']:.1f} | {row['floor28_ms']:.1f} | "
                     f"{row['two_pass40_ms']:.1f} | " + " | ".join(f"{row['median_ms'][n]:.1f}" for n in names) + " |")
    return "\n".join(lines)


def host_overhead_table(docs: List[Dict]) -> str:
    """benchmarks.host_overhead: µs per step and the ratio to fused AdamW, per variant and tensor count."""
    (doc,) = docs
    meta, results = doc["meta"], doc["results"]
    names = list(dict.fromkeys(name for r in results for name in [*r["rows"], *r["skipped"]]))
    goals = "; ".join(f"{n} tensors: {g}" for n, g in meta["goals"].items())
    lines = [f"Measured by `{meta['command'].strip()}` ({meta['date']}, {meta['device_name']}, {meta['threads']} "
             f"thread, {meta['shapes']} tensors): µs per step (× fused AdamW's); goals: {goals}", "",
             "| backend/variant | mode | " + " | ".join(f"{r['tensors']} tensors" for r in results) + " |",
             "|---|---|" + "---:|" * len(results)]  # fmt: skip
    for name in names:
        cells, mode = [], ""
        for r in results:
            row = r["rows"].get(name)
            if row is None:
                cells.append("skipped")
                continue
            mode = row["launch_mode"]
            missed = " ✗" if row["goal"] == "fail" else ""
            cells.append(f"{row['us_per_step']:,.0f} ({row['ratio']:.2f}×){missed}")
        lines.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", "✗: the goal for that tensor count is missed."])


def _convergence(pattern: str) -> Table:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / RESULTS).glob(pattern))
    return Table("docs/convergence.md", files, convergence_summary.tables, f"{RESULTS}/{pattern}")


TABLES: Dict[str, Table] = {
    "lr-sweep": Table("README.md", [f"{RESULTS}/lr-sweep-AMD-EPYC-2026-12-01.json"],
                      lambda docs: lr_sweep.markdown_table(docs[0])),
    "step-time-cpu": Table("README.md", [f"{RESULTS}/AMD-EPYC-2026-12-01.json"], step_time_table),
    "step-time-xeon": Table("docs/benchmark.md", [f"{RESULTS}/Intel-R-Xeon-R-Processor-2026-11-24.json"],
                            step_time_table),
    "mixed-precision": Table("docs/mixed-precision.md", [f"{RESULTS}/mixed-precision-AMD-EPYC-2026-12-01.json"],
                             lambda docs: mixed_precision.markdown_table(docs[0])),
    "host-overhead": Table("docs/backends.md", [f"{RESULTS}/host-overhead-Intel-R-Xeon-R-Processor-2026-12-01.json"],
                           host_overhead_table),
    "cpu-threads": Table("docs/backends.md", [f"{RESULTS}/IntelR-XeonR-Processor-2026-11-24-threads.json"],
                         cpu_threads_table),
    "convergence-epyc": _convergence("convergence-cpu-*seed*-AMD-EPYC-2026-11-25.json"),
    "convergence-xeon": _convergence("convergence-cpu-seed*-Intel-R-Xeon-R-Processor-2026-11-25.json"),
}  # fmt: skip


def _wrap(text: str) -> str:
    """Prose wrapped at WIDTH (markdown joins the lines again); table rows as they are."""
    return "\n".join(line if line.startswith("|") else textwrap.fill(line, WIDTH, break_long_words=False,
                                                                     break_on_hyphens=False)
                     for line in text.split("\n"))  # fmt: skip


def render(name: str, root: Path = ROOT) -> str:
    """The block between the markers: the table and the line naming its sources."""
    table = TABLES[name]
    docs = [json.loads((root / s).read_text()) for s in table.sources]
    return _wrap(f"{table.render(docs)}\n\n{_source_line(table)}")


def _block(name: str) -> "re.Pattern[str]":
    return re.compile(rf"<!-- table:{re.escape(name)} -->\n(.*?)\n?<!-- /table:{re.escape(name)} -->", re.S)


def stale(root: Path = ROOT, names: Optional[Sequence[str]] = None) -> List[str]:
    """The tables whose markdown differs from what their JSON renders, or whose markers are missing or doubled."""
    found = []
    for name in names or TABLES:
        blocks = _block(name).findall((root / TABLES[name].doc).read_text())
        if len(blocks) != 1 or blocks[0] != render(name, root):
            found.append(name)
    return found


def write(root: Path = ROOT) -> List[str]:
    """Regenerates every table in place; the names of those that changed."""
    changed = []
    for name, table in TABLES.items():
        path = root / table.doc
        text = path.read_text()
        block = f"<!-- table:{name} -->\n{render(name, root)}\n<!-- /table:{name} -->"
        new, count = _block(name).subn(lambda _: block, text)
        if count != 1:
            raise ValueError(f"{table.doc} must hold the markers of table {name} once, not {count} times")
        if new != text:
            path.write_text(new)
            changed.append(name)
    return changed


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate every table in place")
    mode.add_argument("--check", action="store_true", help="fail where a table and its JSON disagree")
    args = parser.parse_args(argv)
    if args.write:
        print("regenerated: " + (", ".join(write()) or "nothing (all up to date)"))
        return 0
    bad = stale()
    for name in bad:
        print(f"{TABLES[name].doc}: table {name} is not what its JSON renders: run python -m benchmarks.tables --write",
              file=sys.stderr)  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
