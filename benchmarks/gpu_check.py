"""The verdicts of benchmarks/gpu_check.sh: what each stage's log means, as rows of its summary.

    python -m benchmarks.gpu_check versions
    python -m benchmarks.gpu_check build build.log --status 0
    python -m benchmarks.gpu_check backends
    python -m benchmarks.gpu_check tests test-junit.xml test.log --status 0
    python -m benchmarks.gpu_check sanitizer memcheck aligned run.log --status 0
    python -m benchmarks.gpu_check race RESULTS --status 0
    python -m benchmarks.gpu_check ran convergence convergence.log --status 0
    python -m benchmarks.gpu_check finish ROWS RESULTS --title "gpu check part1" --kept

Each check prints what it found, then its rows, ``ROW<TAB>name<TAB>verdict<TAB>seconds<TAB>detail``
(``--since`` EPOCH: the last row's seconds count from then). A verdict is PASS or FAIL, and a
skip is never a pass: with ``--dry-run`` (the rehearsal on a machine without a GPU) what only a
GPU can make pass is SKIP, printed ``SKIP (dry run: needs a GPU): <what>``, while a log that
is missing or malformed still fails. ``finish`` adds the row of the files that come back from
$OUT (at most 8, named in letters, digits, '.', '_' and '-', at most 2 folders down), writes
summary.txt and prints the summary, 40 lines at most; it exits 1 when anything failed.
"""

import argparse
import json
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
NEEDS_GPU = "(dry run: needs a GPU)"
TIMED_OUT, NOT_FOUND = 124, 127  # exit statuses: timeout(1) stopped the command; there was no such command
SUMMARY_LINES = 40
KEPT_FILES, KEPT_FILE_BYTES, KEPT_BYTES, KEPT_DEPTH = 8, 16 << 20, 64 << 20, 2
KEPT_NAME = re.compile(r"[A-Za-z0-9._-]+")
# Skips allowed on a machine with fewer GPUs than the test needs: test name -> GPUs it needs.
ALLOWED_SKIPS = {"test_parameters_on_a_second_gpu": 2}
# The race: our fused backends against apex FusedLAMB, and torch's fused AdamW as a yardstick.
RACE_SHORT = {"pmdlamb[cuda]": "cuda", "pmdlamb[triton]": "triton", "apex FusedLAMB": "apex",
              "torch fused AdamW": "AdamW"}  # fmt: skip
APEX = "apex FusedLAMB"
SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass
class Row:
    name: str
    verdict: str
    detail: str
    seconds: str = ""

    def line(self) -> str:
        return "\t".join(("ROW", self.name, self.verdict, self.seconds, self.detail))


def needs_gpu(name: str, what: str, dry_run: bool) -> Row:
    """What only a GPU makes pass: a failure on the GPU machine, a stated skip in the rehearsal."""
    if dry_run:
        print(f"SKIP {NEEDS_GPU}: {what}")
        return Row(name, SKIP, f"{NEEDS_GPU}: {what}")
    return Row(name, FAIL, what)


def exit_text(status: int) -> str:
    known = {TIMED_OUT: "stopped at its time limit", NOT_FOUND: "was not found (exit 127)"}
    return known.get(status, f"exited {status}")


def _run(argv: Sequence[str]) -> Optional[str]:
    """A tool's output, or None when it is missing or fails."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


# --- versions, build, backends


def versions(dry_run: bool) -> List[Row]:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "missing"
    parts, problems = [], []
    if dry_run:
        print(f"SKIP {NEEDS_GPU}: nvidia-smi")
    else:
        smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                    "--format=csv,noheader"])  # fmt: skip
        print(f"nvidia-smi: {smi}")
        if smi:
            name, driver = smi.splitlines()[0].split(", ")[:2]
            parts.append(f"{name}, driver {driver}")
        else:
            problems.append("nvidia-smi gives no answer: no GPU or no driver")
    nvcc = _run(["nvcc", "--version"])
    print(nvcc or "nvcc: not found")
    release = re.search(r"release ([\d.]+), (V\S+)", nvcc or "")
    if release:
        parts.append(f"nvcc {release.group(1)} ({release.group(2)})")
    else:
        problems.append("no nvcc on PATH: the CUDA extension cannot be built")
    parts.append(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}, "
                 f"python {sys.version.split()[0]}")  # fmt: skip
    print(", ".join(parts))
    if problems:
        return [Row("versions", FAIL, "; ".join(problems))]
    if not torch.cuda.is_available():
        return [needs_gpu("versions", f"torch sees no CUDA device; {', '.join(parts)}", dry_run)]
    major, minor = torch.cuda.get_device_capability()
    print(f"torch sees {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name()}, sm_{major}{minor}")
    return [Row("versions", PASS, ", ".join(parts))]


ENTRY = re.compile(r"Compiling entry function '\S+' for 'sm_(\d+)'")
PROPERTIES = re.compile(r"Function properties for (\S+)")
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_report(log: str) -> Tuple[Counter, Dict[str, int]]:
    """Kernels ptxas compiled per target, and every function (kernels and device functions)
    that spills, with its spill bytes, from nvcc's -Xptxas=-v output."""
    kernels: Counter = Counter()
    spilling: Dict[str, int] = {}
    arch, function = "?", "?"
    for line in log.splitlines():
        entry, properties, spills = ENTRY.search(line), PROPERTIES.search(line), SPILLS.search(line)
        if entry:
            arch = f"sm_{entry.group(1)}"
            kernels[arch] += 1
        elif properties:
            function = properties.group(1)
        elif spills and int(spills.group(1)) + int(spills.group(2)):
            key = f"{function} ({arch})"
            spilling[key] = spilling.get(key, 0) + int(spills.group(1)) + int(spills.group(2))
    return kernels, spilling


def build(log: Path, status: int) -> List[Row]:
    kernels, spilling = ptxas_report(log.read_text(errors="replace") if log.exists() else "")
    per_arch = ", ".join(f"{arch}: {n}" for arch, n in sorted(kernels.items()))
    print(f"ptxas: {sum(kernels.values())} kernels ({per_arch or 'none'}); spilling: {spilling or 'none'}")
    if status != 0:
        return [Row("build", FAIL, f"pip install -v {exit_text(status)} (see build.log)")]
    if not kernels:
        return [Row("build", FAIL, "ptxas reported no kernels: its -v report did not reach the log")]
    if spilling:
        worst = ", ".join(f"{name} {n} B" for name, n in sorted(spilling.items(), key=lambda kv: -kv[1])[:2])
        return [Row("build", FAIL, f"{len(spilling)} functions spill: {worst}")]
    return [Row("build", PASS, f"{sum(kernels.values())} kernels ({per_arch}), no spills")]


def backends(dry_run: bool) -> List[Row]:
    import torch

    from largedet_kernels import dispatch

    device = torch.device("cuda")
    reasons = {name: dispatch.unavailable_reason(name, device) for name in dispatch.AUTO_ORDER["cuda"]}
    for name, reason in reasons.items():
        print(f"{name}: {reason or 'available'}")
    missing = {name: reason for name, reason in reasons.items() if reason}
    if missing:
        return [Row("backends", FAIL, "unavailable on cuda: " + "; ".join(f"{n} ({r})" for n, r in missing.items()))]
    if not torch.cuda.is_available():
        return [needs_gpu("backends", f"torch sees no CUDA device ({', '.join(reasons)} importable)", dry_run)]
    return [Row("backends", PASS, f"{', '.join(reasons)} available on {torch.cuda.get_device_name()}")]


# --- tests


def junit_outcomes(xml_text: str) -> List[Tuple[str, str, str]]:
    """(test name, passed|failed|skipped, message) of every test case in a junit XML."""
    outcomes = []
    for case in ElementTree.fromstring(xml_text).iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", child.get("message", "")
                break
            if child.tag == "skipped":
                outcome, message = "skipped", child.get("message", "")
        outcomes.append((case.get("name", "?"), outcome, message))
    return outcomes


def allowed_skip(name: str, gpus: int) -> bool:
    return gpus < ALLOWED_SKIPS.get(name.split("[")[0], 0)


def tests(xml: Path, log: Path, status: int, dry_run: bool, gpus: Optional[int] = None) -> List[Row]:
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    if not xml.exists():
        return [Row("test", FAIL, f"no junit XML: pytest {exit_text(status)} (see test.log)")]
    outcomes = junit_outcomes(xml.read_text())
    counts = Counter(outcome for _, outcome, _ in outcomes)
    deselected = re.findall(r"(\d+) deselected", log.read_text(errors="replace")) if log.exists() else []
    tally = f"{counts['passed']} passed, {counts['skipped']} skipped, {counts['failed']} failed" + (
        f", {deselected[-1]} deselected (emulator)" if deselected else "")  # fmt: skip
    print(f"junit: {tally}")
    failed = [name for name, outcome, _ in outcomes if outcome == "failed"]
    skipped = [(name, message) for name, outcome, message in outcomes if outcome == "skipped"]
    refused = [(name, message) for name, message in skipped if not allowed_skip(name, gpus)]
    for name, message in skipped:
        print(f"skipped{'' if (name, message) in refused else f' (allowed on {gpus} GPU)'}: {name}: {message}")
    if failed:
        return [Row("test", FAIL, f"{tally}: {', '.join(failed[:3])}{' ...' if len(failed) > 3 else ''}")]
    if not outcomes:
        return [Row("test", FAIL, f"no test ran: pytest {exit_text(status)}")]
    if refused:
        return [needs_gpu("test", f"{tally}; a skip is no pass: {refused[0][0]} ({refused[0][1]})", dry_run)]
    if status != 0:
        return [Row("test", FAIL, f"{tally}, but pytest {exit_text(status)}")]
    allowed = f" (allowed on {gpus} GPU: {', '.join(n for n, _ in skipped)})" if skipped else ""
    return [Row("test", PASS, tally + allowed)]


# --- sanitizer


# What each tool prints last: memcheck counts errors, racecheck hazards (errors and warnings).
SANITIZER_SUMMARY = {
    "memcheck": re.compile(r"ERROR SUMMARY: (\d+) errors?"),
    "racecheck": re.compile(r"RACECHECK SUMMARY: (\d+) hazards? displayed \(\d+ errors?, \d+ warnings?\)"),
}


def sanitizer(tool: str, bucket: str, log: Path, status: int, dry_run: bool) -> List[Row]:
    """A compute-sanitizer run of sanitize_step: its summary must be there and clean, and the
    steps must have finished on the path the bucket names (a summary alone says nothing of a
    target that died)."""
    name = f"{tool} {bucket}"
    text = log.read_text(errors="replace") if log.exists() else ""
    done = re.search(rf"^sanitize_step: {bucket} bucket, (\w+) path: (.*)$", text, re.M)
    failures = re.findall(r"^sanitize_step: FAILED: (.*)$", text, re.M)
    if failures:
        return [Row(name, FAIL, failures[0])]
    if done is None:
        return [Row(name, FAIL, f"sanitize_step did not finish: it {exit_text(status)}")]
    stepped = f"{done.group(2)}: {done.group(1)} path"
    if dry_run:
        if status != 0:
            return [Row(name, FAIL, f"{stepped}, but it {exit_text(status)}")]
        return [needs_gpu(name, f"compute-sanitizer --tool {tool} did not run; on CPU {stepped}", dry_run)]
    summary = SANITIZER_SUMMARY[tool].findall(text)
    if not summary:
        return [Row(name, FAIL, f"{stepped}; no {tool} summary: it {exit_text(status)}")]
    found = f"{summary[-1]} {'errors' if tool == 'memcheck' else 'hazards'}"
    api = len(re.findall(r"Program hit .* on CUDA API call", text))
    found += f" ({api} in CUDA API calls)" if api else ""
    if status != 0 or int(summary[-1]):
        return [Row(name, FAIL, f"{stepped}; {found}; it {exit_text(status)}")]
    return [Row(name, PASS, f"{stepped}; {found}")]


# --- race


def race_json(results: Path) -> Optional[Dict]:
    """The newest benchmark JSON (benchmarks.step_time) in a results folder."""
    for path in sorted(results.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and {"meta", "results"} <= set(doc):
            return doc
    return None


def race(results: Path, status: int, dry_run: bool) -> List[Row]:
    from benchmarks.contenders import CONTENDERS
    from benchmarks.step_time import DTYPES

    doc = race_json(results)
    if doc is None:
        return [Row("race", FAIL, f"no benchmark JSON in {results}: step_time {exit_text(status)}")]
    by_name = {c.name: c for c in CONTENDERS}
    rows, missing, apex_missing = [], [], None
    for result in doc["results"]:
        label = f"race {'_'.join(result['set'].split('_')[:2])} {SHORT_DTYPES[result['dtype']]}"
        times = [f"{RACE_SHORT.get(n, n)} {r['median_ms']:.3f}" for n, r in result["rows"].items()]
        detail = " | ".join(times) + " ms" if times else "no times"
        apex_ms = result["rows"].get(APEX, {}).get("median_ms")
        faster = [f"{RACE_SHORT[n]} {apex_ms / result['rows'][n]['median_ms']:.2f}x"
                  for n in ("pmdlamb[cuda]", "pmdlamb[triton]") if apex_ms and n in result["rows"]]  # fmt: skip
        detail += f"; over apex: {', '.join(faster)}" if faster else ""
        dtype = DTYPES[result["dtype"]]
        lost = {n: why for n, why in result["skipped"].items() if by_name[n].refuses(dtype) != why}
        stated = [RACE_SHORT.get(n, n) for n in result["skipped"] if n not in lost]
        detail += f"; {', '.join(stated)}: no {SHORT_DTYPES[result['dtype']]}" if stated else ""
        if not lost:
            rows.append(Row(label, PASS, detail))
            continue
        rows.append(needs_gpu(label, f"{detail}; skipped: {', '.join(RACE_SHORT.get(n, n) for n in lost)}", dry_run))
        missing += [n for n in lost if n != APEX and n not in missing]
        apex_missing = apex_missing or lost.get(APEX)
    meta = doc["meta"]
    bandwidth = f"copy {meta['copy_bandwidth_GBps']:.0f} GB/s"
    setting = f"{len(doc['results'])} set-dtype pairs on {meta['device_name']}, {bandwidth}"
    if apex_missing:
        print(f"!!! {APEX} MISSING from the race: {apex_missing}")
    if apex_missing or missing:
        what = [f"!!! {APEX} MISSING ({apex_missing})"] if apex_missing else []
        if missing:
            what.append(f"skipped: {', '.join(missing)}")
        return rows + [needs_gpu("race", "; ".join(what), dry_run)]
    if status != 0:
        return rows + [Row("race", FAIL, f"{setting}, but step_time {exit_text(status)}")]
    return rows + [Row("race", PASS, setting)]


def ran(name: str, log: Path, status: int) -> List[Row]:
    """A stage judged by its exit status alone."""
    last = (log.read_text(errors="replace").strip().splitlines() or [""])[-1] if log.exists() else ""
    return [Row(name, PASS if status == 0 else FAIL, f"{exit_text(status)}: {last[:100]}")]


# --- finish


def kept_files(results: Path, adding: str = "summary.txt") -> Tuple[List[str], List[str]]:
    """The files under results as they come back (with ``adding``), and what would not come back."""
    names = sorted({str(p.relative_to(results)) for p in results.rglob("*") if p.is_file()} | {adding})
    problems = []
    if len(names) > KEPT_FILES:
        problems.append(f"{len(names)} files, only {KEPT_FILES} come back")
    total = 0
    for name in names:
        parts = name.split("/")
        if len(parts) - 1 > KEPT_DEPTH:
            problems.append(f"{name}: more than {KEPT_DEPTH} folders down")
        if not all(KEPT_NAME.fullmatch(part) for part in parts):
            problems.append(f"{name}: a name outside letters, digits, '.', '_', '-'")
        size = (results / name).stat().st_size if (results / name).exists() else 0
        total += size
        if size > KEPT_FILE_BYTES:
            problems.append(f"{name}: {size >> 20} MiB, over {KEPT_FILE_BYTES >> 20} MiB")
    if total > KEPT_BYTES:
        problems.append(f"{total >> 20} MiB in all, over {KEPT_BYTES >> 20} MiB")
    return names, problems


def read_rows(path: Path) -> List[Row]:
    rows = []
    for line in path.read_text().splitlines():
        name, verdict, seconds, detail = (line.split("\t", 3) + ["", "", ""])[:4]
        rows.append(Row(name, verdict, detail, seconds))
    return rows


def overall(rows: List[Row], dry_run: bool) -> Tuple[bool, str]:
    """Whether the check passed, and its verdict: any failure fails it, and so does a skip
    outside a rehearsal."""
    failed = [r.name for r in rows if r.verdict == FAIL or (r.verdict == SKIP and not dry_run)]
    if failed:
        return False, f"FAIL: {', '.join(failed)}"
    if dry_run:
        return True, f"REHEARSED (dry run): nothing failed, {sum(r.verdict == SKIP for r in rows)} checks need a GPU"
    return True, "PASS"


def summary_lines(title: str, rows: List[Row], seconds: int, dry_run: bool, limit: Optional[int] = None) -> List[str]:
    """A header, a line per row, the overall verdict; at most ``limit`` lines."""
    width = max(len(r.name) for r in [*rows, Row("stage", "", "")])
    body = [f"{'stage':<{width}}  {'':4}  {'s':>4}  key numbers"]
    body += [f"{r.name:<{width}}  {r.verdict:<4}  {r.seconds or '-':>4}  {r.detail}" for r in rows]
    if limit is not None and len(body) > limit - 2:
        body = body[: limit - 3] + [f"... {len(body) - limit + 3} more rows in summary.txt"]
    return [f"== {title}", *body, f"== {overall(rows, dry_run)[1]} ({len(rows)} checks, {seconds} s)"]


def files_row(results: Path, kept: bool) -> Row:
    names, problems = kept_files(results)
    if not kept:
        return Row("files", PASS, f"{len(names)} files in {results}")
    if problems:
        return Row("files", FAIL, "; ".join(problems))
    return Row("files", PASS, f"{len(names)} of at most {KEPT_FILES} files: {' '.join(names)}")


def finish(rows_path: Path, results: Path, title: str, seconds: int, kept: bool, dry_run: bool) -> int:
    rows = [*read_rows(rows_path), files_row(results, kept)]
    (results / "summary.txt").write_text("\n".join(summary_lines(title, rows, seconds, dry_run)) + "\n")
    print("\n".join(summary_lines(title, rows, seconds, dry_run, SUMMARY_LINES)))
    return 0 if overall(rows, dry_run)[0] else 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="a rehearsal on CPU: what needs a GPU is a SKIP")
    parser.add_argument("--since", type=float, help="epoch seconds when the stage began")
    sub = parser.add_subparsers(dest="check", required=True)
    sub.add_parser("versions")
    sub.add_parser("backends")
    for name, positional in (("build", ["log"]), ("tests", ["xml", "log"]), ("sanitizer", ["tool", "bucket", "log"]),
                             ("race", ["results"]), ("ran", ["name", "log"])):  # fmt: skip
        p = sub.add_parser(name)
        for arg in positional:
            p.add_argument(arg, **({"choices": sorted(SANITIZER_SUMMARY)} if arg == "tool" else {}))
        p.add_argument("--status", type=int, required=True, help="the exit status of the stage's command")
    p = sub.add_parser("finish")
    p.add_argument("rows")
    p.add_argument("results")
    p.add_argument("--title", required=True)
    p.add_argument("--seconds", type=int, required=True, help="how long the whole check took")
    p.add_argument("--kept", action="store_true", help="results is $OUT: check what comes back")
    args = parser.parse_args(argv)
    if args.check == "finish":
        return finish(Path(args.rows), Path(args.results), args.title, args.seconds, args.kept, args.dry_run)
    checks = {
        "versions": lambda: versions(args.dry_run),
        "build": lambda: build(Path(args.log), args.status),
        "backends": lambda: backends(args.dry_run),
        "tests": lambda: tests(Path(args.xml), Path(args.log), args.status, args.dry_run),
        "sanitizer": lambda: sanitizer(args.tool, args.bucket, Path(args.log), args.status, args.dry_run),
        "race": lambda: race(Path(args.results), args.status, args.dry_run),
        "ran": lambda: ran(args.name, Path(args.log), args.status),
    }
    rows = checks[args.check]()
    if args.since is not None:
        rows[-1].seconds = str(round(time.time() - args.since))
    for row in rows:
        print(row.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
