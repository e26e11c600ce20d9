"""The emulated CUDA kernels under ThreadSanitizer and AddressSanitizer (not part of CI):

    .venv/bin/python tests/cuda_emulator/sanitize.py [--all] [thread] [address] [-- pytest options]

For each sanitizer (default: both) this builds the emulator's variant for it, then runs the
emulated tests (``pytest -m emulator``) in a process that preloads the sanitizer's runtime,
with every block's threads as std::threads. It fails if a test fails or the sanitizer reports
anything (``halt_on_error``), or if it misses the planted bug of selftest.cpp run first.

Each block's 256 threads are then operating-system threads that meet at every barrier, tens
of milliseconds a block (about 100 under ThreadSanitizer) against one for fibers, so by default
it runs QUICK: the emulator's own tests, the precision tests and every kernel and dtype pair of
tests/test_gpu.py once; ``--all`` runs every emulated test."""

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = {"thread": "libtsan.so", "address": "libasan.so"}
QUICK = ("test_cuda_emulator or test_precision or paper-fp32 or paper-bf16 or clip+bias-correction-fp16 "
         "or test_float32_gradients and fp16 or test_lamb or grad_scaler or sharded_halves and fp32")  # fmt: skip
# A planted bug of selftest.cpp per sanitizer, and what it must say of it: proof that it watches.
CONTROL = {
    "thread": ("broadcast_unsynced", "ThreadSanitizer: data race"),  # thread 0 writes, the others read, no barrier
    "address": ("read_past_end", "AddressSanitizer: heap-buffer-overflow"),
}
OPTIONS = {
    "thread": ("TSAN_OPTIONS", "halt_on_error=1 second_deadlock_stack=1"),
    "address": ("ASAN_OPTIONS", "halt_on_error=1 detect_leaks=0"),  # CPython keeps its memory at exit
}


def _library(name: str) -> str:
    compiler = os.environ.get("CXX", "c++")
    return subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip


def run(sanitizer: str, everything: bool, pytest_args) -> int:
    # The C++ runtime too: the sanitizer's exception interceptors need it loaded at their start.
    preload = f"{_library(RUNTIME[sanitizer])} {_library('libstdc++.so')}"
    variable, options = OPTIONS[sanitizer]
    env = dict(os.environ, LD_PRELOAD=preload, LARGEDET_EMULATOR_SANITIZER=sanitizer, OMP_NUM_THREADS="1")
    env[variable] = options
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "emulator",
               "tests/test_gpu.py", "tests/test_cuda_emulator.py", "tests/test_precision.py",
               *([] if everything else ["-k", QUICK]), *pytest_args]  # fmt: skip
    kernel, report = CONTROL[sanitizer]
    control = ("import torch, cuda_emulator; cuda_emulator.load(); "
               f"torch.ops.largedet_emulator.selftest({kernel!r}, 1.0)")  # fmt: skip
    planted = subprocess.run([sys.executable, "-c", control], cwd=ROOT / "tests", env=env, capture_output=True,
                             text=True)  # fmt: skip
    if planted.returncode == 0 or report not in planted.stderr:
        print(planted.stderr[-3000:], f"\n{sanitizer} sanitizer missed the planted bug ({kernel}): not watching")
        return 1
    print(f"{sanitizer} sanitizer: reported the planted bug ({kernel})", flush=True)
    start = time.monotonic()
    code = subprocess.run(command, cwd=ROOT, env=env).returncode
    print(f"{sanitizer} sanitizer: exit {code} in {time.monotonic() - start:.0f} s", flush=True)
    return code


def main(argv) -> int:
    pytest_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    ours = argv[: argv.index("--")] if "--" in argv else argv
    everything = "--all" in ours
    chosen = [a for a in ours if a != "--all"] or list(RUNTIME)
    unknown = set(chosen) - set(RUNTIME)
    if unknown:
        raise SystemExit(f"sanitizers are {sorted(RUNTIME)}, got {sorted(unknown)}")
    return max(run(s, everything, pytest_args) for s in chosen)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
