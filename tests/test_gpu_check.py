"""The GPU check's own logic, without a GPU and in seconds: the verdicts of benchmarks/gpu_check.py
on canned logs (ptxas spills, junit skips, sanitizer summaries, the race's JSON, the files that
come back from $OUT, the 40-line summary), sanitize_step's choice of path, and gpu_check.sh's
arguments, deadline and summary in a rehearsal of one stage."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check, sanitize_step, step_time
from benchmarks.contenders import CONTENDERS
from benchmarks.gpu_check import FAIL, PASS, SKIP, Row
from conftest import CPU_BACKENDS

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

PTXAS = """\
  [1/2] /usr/local/cuda/bin/nvcc ... -Xptxas=-v -gencode=arch=compute_90,code=sm_90
  ptxas info    : 296 bytes gmem, 24 bytes cmem[4]
  ptxas info    : Compiling entry function '_ZN8largedet17grad_sumsq_kernelIffLb1EEEvNS_10ChunkTableEPT0_' for 'sm_90'
  ptxas info    : Function properties for _ZN8largedet17grad_sumsq_kernelIffLb1EEEvNS_10ChunkTableEPT0_
      0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
  ptxas info    : Used 27 registers, used 1 barriers, 32 bytes smem, 424 bytes cmem[0]
  ptxas info    : Compiling entry function '_ZN8largedet23pmd_lamb_moments_kernelIffLb1EEEvv' for 'sm_80'
  ptxas info    : Function properties for _ZN8largedet23pmd_lamb_moments_kernelIffLb1EEEvv
      0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
  ptxas info    : Function properties for _ZN8largedet9directionEv
      16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
"""


def _junit(cases):
    """A junit XML as pytest writes it: (name, None | 'skipped' | 'failure', message)."""
    body = []
    for name, outcome, message in cases:
        inner = f'<{outcome} type="pytest.{outcome}" message="{message}">{message}</{outcome}>' if outcome else ""
        body.append(f'<testcase classname="tests.test_gpu" name="{name}" time="0.1">{inner}</testcase>')
    return f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{"".join(body)}</testsuite></testsuites>'


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_ptxas_report_counts_kernels_per_target_and_every_spilling_function():
    kernels, spilling = gpu_check.ptxas_report(PTXAS)
    assert kernels == {"sm_90": 1, "sm_80": 1}
    assert spilling == {"_ZN8largedet9directionEv (sm_80)": 12}  # a device function, not a kernel


def test_build_fails_on_spills_on_no_kernels_and_on_pip(tmp_path):
    clean = _write(tmp_path, "clean.log", PTXAS.rsplit("  ptxas info    : Function properties for _ZN8largedet9", 1)[0])
    assert gpu_check.build(clean, 0) == [Row("build", PASS, "2 kernels (sm_80: 1, sm_90: 1), no spills")]
    (spilled,) = gpu_check.build(_write(tmp_path, "spill.log", PTXAS), 0)
    assert spilled.verdict == FAIL and "1 functions spill: _ZN8largedet9directionEv (sm_80) 12 B" in spilled.detail
    (silent,) = gpu_check.build(_write(tmp_path, "quiet.log", "Successfully installed largedet-kernels\n"), 0)
    assert silent.verdict == FAIL and "no kernels" in silent.detail
    assert gpu_check.build(clean, 1)[0].verdict == FAIL
    assert "time limit" in gpu_check.build(tmp_path / "missing.log", gpu_check.TIMED_OUT)[0].detail


def test_a_skip_fails_the_tests_but_the_two_gpu_test_on_one_gpu(tmp_path):
    log = _write(tmp_path, "test.log", "57 passed, 2 skipped, 4 deselected in 80.1s\n")
    allowed = [("test_lamb_on_the_gpu[cuda]", None, ""),
               ("test_parameters_on_a_second_gpu[cuda]", "skipped", "needs two GPUs")]  # fmt: skip
    xml = _write(tmp_path, "ok.xml", _junit(allowed))
    (row,) = gpu_check.tests(xml, log, 0, dry_run=False, gpus=1)
    assert row.verdict == PASS, row
    assert row.detail.startswith("1 passed, 1 skipped, 0 failed, 4 deselected (emulator) (allowed on 1 GPU")
    # On two GPUs the same skip is a failure, as is any other skip; the rehearsal states it instead.
    assert gpu_check.tests(xml, log, 0, dry_run=False, gpus=2)[0].verdict == FAIL
    other = _write(tmp_path, "skip.xml", _junit([("test_lamb_on_the_gpu[triton]", "skipped", "needs a CUDA GPU")]))
    (row,) = gpu_check.tests(other, log, 0, dry_run=False, gpus=1)
    assert row.verdict == FAIL and "a skip is no pass: test_lamb_on_the_gpu[triton] (needs a CUDA GPU)" in row.detail
    assert gpu_check.tests(other, log, 0, dry_run=True, gpus=0)[0].verdict == SKIP
    # A failure, no test, or no XML at all fail even in the rehearsal.
    failed = _write(tmp_path, "fail.xml", _junit([("test_x", "failure", "assert 1 == 2")] + allowed))
    assert gpu_check.tests(failed, log, 1, dry_run=True, gpus=1)[0].verdict == FAIL
    assert gpu_check.tests(_write(tmp_path, "none.xml", _junit([])), log, 5, dry_run=True, gpus=1)[0].verdict == FAIL
    assert "no junit XML" in gpu_check.tests(tmp_path / "missing.xml", log, 4, dry_run=False, gpus=1)[0].detail


MEMCHECK = """\
========= COMPUTE-SANITIZER
cuda float32: vector path, 3 steps with clipping and one in halves
sanitize_step: aligned bucket, vector path: cuda float32, cuda bfloat16, triton float32, triton bfloat16
========= ERROR SUMMARY: {} errors
"""


def test_sanitizer_needs_its_summary_clean_and_the_steps_finished(tmp_path):
    (row,) = gpu_check.sanitizer("memcheck", "aligned", _write(tmp_path, "m.log", MEMCHECK.format(0)), 0, False)
    assert row == Row("memcheck aligned", PASS, "cuda float32, cuda bfloat16, triton float32, triton bfloat16: "
                                                "vector path; 0 errors")  # fmt: skip
    assert gpu_check.sanitizer("memcheck", "aligned", _write(tmp_path, "e.log", MEMCHECK.format(2)), 1,
                               False)[0].verdict == FAIL  # fmt: skip
    # The right summary for the tool: racecheck counts hazards and prints no ERROR SUMMARY.
    summary = "RACECHECK SUMMARY: {} hazards displayed (0 errors, {} warnings)"
    race = MEMCHECK.format(0).replace("ERROR SUMMARY: 0 errors", summary)
    assert gpu_check.sanitizer("racecheck", "aligned", _write(tmp_path, "r.log", race.format(0, 0)), 0,
                               False)[0].verdict == PASS  # fmt: skip
    assert gpu_check.sanitizer("racecheck", "aligned", _write(tmp_path, "w.log", race.format(1, 1)), 0,
                               False)[0].verdict == FAIL  # fmt: skip
    assert gpu_check.sanitizer("racecheck", "aligned", _write(tmp_path, "x.log", MEMCHECK.format(0)), 0,
                               False)[0].verdict == FAIL  # fmt: skip
    # A clean summary of a target that died, or stepped the other path, is no pass.
    died = "========= ERROR SUMMARY: 0 errors\n"
    assert "did not finish" in gpu_check.sanitizer("memcheck", "aligned", _write(tmp_path, "d.log", died), 139,
                                                   False)[0].detail  # fmt: skip
    other = MEMCHECK.format(0).replace("aligned bucket, vector", "misaligned bucket, scalar")
    assert gpu_check.sanitizer("memcheck", "aligned", _write(tmp_path, "o.log", other), 0, False)[0].verdict == FAIL
    refused = "sanitize_step: FAILED: the cuda backend cannot run on cuda: not built\n" + MEMCHECK.format(0)
    assert "not built" in gpu_check.sanitizer("memcheck", "aligned", _write(tmp_path, "u.log", refused), 1,
                                              False)[0].detail  # fmt: skip
    # The rehearsal: the steps ran on CPU, the sanitizer is a stated skip.
    cpu = "sanitize_step: misaligned bucket, scalar path: triton float32, triton bfloat16\n"
    (row,) = gpu_check.sanitizer("memcheck", "misaligned", _write(tmp_path, "c.log", cpu), 0, True)
    assert row.verdict == SKIP and row.detail.startswith("(dry run: needs a GPU): compute-sanitizer --tool memcheck")


def _race_doc(tmp_path, apex_reason=None):
    results = []
    for dtype in ("float32", "bfloat16"):
        rows = {n: {"median_ms": ms} for n, ms in (("pmdlamb[cuda]", 1.0), ("pmdlamb[triton]", 1.25),
                                                   ("torch fused AdamW", 0.9))}  # fmt: skip
        skipped = {}
        if apex_reason:
            skipped["apex FusedLAMB"] = apex_reason
        elif dtype == "float32":
            rows["apex FusedLAMB"] = {"median_ms": 2.5}
        else:
            skipped["apex FusedLAMB"] = "apex FusedLAMB takes float32 and float16 parameters only"
        results.append({"set": "faster_rcnn_r50_fpn", "dtype": dtype, "rows": rows, "skipped": skipped})
    doc = {"meta": {"device_name": "NVIDIA H200", "copy_bandwidth_GBps": 4300.0}, "results": results}
    tmp_path.mkdir()
    _write(tmp_path, "NVIDIA-H200-2026-12-01.json", json.dumps(doc))
    return tmp_path


def test_race_states_apex_refusing_bf16_and_fails_loudly_without_apex(tmp_path, capsys):
    rows = gpu_check.race(_race_doc(tmp_path / "with"), 0, dry_run=False)
    assert [r.verdict for r in rows] == [PASS] * 3
    times = "cuda 1.000 | triton 1.250 | AdamW 0.900 | apex 2.500 ms"
    assert rows[0] == Row("race faster_rcnn fp32", PASS, f"{times}; over apex: cuda 2.50x, triton 2.00x")
    assert rows[1].detail.endswith("; apex: no bf16")
    missing = "apex.optimizers is not importable (ModuleNotFoundError: No module named 'apex')"
    rows = gpu_check.race(_race_doc(tmp_path / "without", missing), 0, dry_run=False)
    assert [r.verdict for r in rows] == [FAIL] * 3
    assert rows[-1].detail == f"!!! apex FusedLAMB MISSING ({missing})"
    assert f"!!! apex FusedLAMB MISSING from the race: {missing}" in capsys.readouterr().out
    assert gpu_check.race(_race_doc(tmp_path / "rehearsed", missing), 0, dry_run=True)[-1].verdict == SKIP
    assert gpu_check.race(tmp_path / "empty", 1, dry_run=False) == [
        Row("race", FAIL, f"no benchmark JSON in {tmp_path / 'empty'}: step_time exited 1")]


def test_the_race_names_contenders_that_exist():
    script = SCRIPT.read_text()
    names = {c.name for c in CONTENDERS}
    assert set(gpu_check.RACE_SHORT) <= names
    assert all(f'"{name}"' in script for name in gpu_check.RACE_SHORT)
    with pytest.raises(SystemExit):
        step_time.main(["--device", "cpu", "--contenders", "pmdlamb[cuda]", "apex FusedLamb", "--no-files"])
    (apex,) = [c for c in CONTENDERS if c.name == "apex FusedLAMB"]
    assert apex.refuses(torch.float32) is None and "float32 and float16" in apex.refuses(torch.bfloat16)


def test_files_that_would_not_come_back_fail(tmp_path):
    for i in range(7):
        _write(tmp_path, f"stage{i}.log", "x")
    assert gpu_check.files_row(tmp_path, kept=True).verdict == PASS  # 7 and summary.txt: 8
    _write(tmp_path, "one-too-many.log", "x")
    assert "9 files, only 8 come back" in gpu_check.files_row(tmp_path, kept=True).detail
    assert gpu_check.files_row(tmp_path, kept=False).verdict == PASS  # a local folder has no limit
    for name in ("stage1.log", "stage2.log", "one-too-many.log"):
        (tmp_path / name).unlink()
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    _write(tmp_path / "a" / "b" / "c", "deep.log", "x")
    _write(tmp_path, "odd name.log", "x")
    detail = gpu_check.files_row(tmp_path, kept=True).detail
    assert "a/b/c/deep.log: more than 2 folders down" in detail and "odd name.log: a name outside" in detail


def test_summary_fits_40_lines_and_a_skip_passes_only_a_rehearsal(tmp_path):
    rows = [Row(f"check {i}", PASS, "fine", "1") for i in range(60)]
    lines = gpu_check.summary_lines("gpu check", rows, 100, dry_run=False, limit=gpu_check.SUMMARY_LINES)
    assert len(lines) == 40 and lines[-2].startswith("... ") and lines[-1] == "== PASS (60 checks, 100 s)"
    assert len(gpu_check.summary_lines("gpu check", rows, 100, dry_run=False)) == 63  # summary.txt has them all
    skipped = [Row("test", SKIP, "(dry run: needs a GPU): 59 skipped")]
    assert gpu_check.overall(skipped, dry_run=False) == (False, "FAIL: test")
    assert gpu_check.overall(skipped, dry_run=True)[0]
    assert gpu_check.overall([*skipped, Row("build", FAIL, "spills")], dry_run=True) == (False, "FAIL: build")
    rows_file = _write(tmp_path, "rows.tsv", "build\tPASS\t40\t60 kernels\ntest\tFAIL\t90\t1 failed: test_x\n")
    results = tmp_path / "out"
    results.mkdir()
    assert gpu_check.finish(rows_file, results, "gpu check part1", 130, kept=True, dry_run=False) == 1
    summary = (results / "summary.txt").read_text().splitlines()
    assert summary[-1] == "== FAIL: test (3 checks, 130 s)" and summary[-2].startswith("files ")


def test_sanitize_step_fails_when_a_backend_cannot_run(capsys):
    assert sanitize_step.main(["--bucket", "aligned", "--device", "cpu", "--backends", "cuda"]) == 1
    out = capsys.readouterr().out
    assert "sanitize_step: FAILED: the cuda backend cannot run on cpu" in out and "skipped" not in out


def test_sanitize_step_buckets_take_the_path_they_name():
    # The misaligned bucket holds one tensor that takes the scalar path; the aligned bucket holds none.
    for bucket, vector in sanitize_step.VECTOR_PATH.items():
        params = sanitize_step.make_params(bucket, torch.device("cpu"), torch.float32)
        assert all(p.data_ptr() % 16 == 0 for p in params) == vector
    if "triton" not in CPU_BACKENDS:
        pytest.skip("needs Triton and TRITON_INTERPRET=1")
    # The plans the steps used (the optimizer's and the halves') say which path the kernels took.
    assert sanitize_step.step_bucket("triton", torch.float32, "misaligned", torch.device("cpu")) == [False, False]


def _script(*args, env=None):
    # As on a GPU machine: Triton's interpreter (which the tests switch on) off.
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_script_arguments():
    usage = _script("--help")
    assert usage.returncode == 0 and "part1 = versions build test memcheck" in usage.stdout
    bad = _script("part3")
    assert bad.returncode == 2 and "unknown stage 'part3'" in bad.stderr
    assert _script().returncode == 2


def test_script_rehearses_a_stage_and_stops_at_its_deadline(tmp_path):
    env = {"OUT": str(tmp_path), "LARGEDET_GPU_CHECK_DEADLINE_S": "1"}
    proc = _script("--dry-run", "versions", "build", env=env)
    lines = proc.stdout.splitlines()
    summary = lines[next(i for i, line in enumerate(lines) if line.startswith("== gpu check --dry-run versions")):]
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the build never ran: a failure, not a skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build.log", "summary.txt", "versions.log"]
    assert (tmp_path / "summary.txt").read_text().splitlines() == summary
    # versions and backends depend on this machine's nvcc and build; the build never ran.
    rows = {line.split()[0]: line.split()[1] for line in summary[2:-1]}
    assert list(rows) == ["versions", "build", "backends", "files"]
    assert rows["build"] == FAIL and rows["files"] == PASS and "pip install -v stopped at its time limit" in summary[3]
    assert summary[-1].startswith("== FAIL: ") and "build" in summary[-1] and "(4 checks, " in summary[-1]
    assert "not run: the deadline has passed" in (tmp_path / "build.log").read_text()
