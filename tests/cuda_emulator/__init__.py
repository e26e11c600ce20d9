"""The CUDA C++ kernels of csrc/, executed on the CPU (NOTE [emulated execution] in runtime.cpp).

``load()`` builds (once per change of a source, with the host C++ compiler and ninja) and
loads an extension made of

- a copy of ``csrc/pmd_lamb_launch.cu`` whose ``<<<>>>`` launches call the runtime instead,
- a copy of ``csrc/binding.cpp`` implementing the op family for CPU tensors under the namespace
  ``largedet_emulated`` (``largedet`` on CPU tensors is the real CPU kernels), whose schemas
  ``largedet_kernels.backends.ops`` defines,
- ``runtime.cpp`` (blocks, fibers or threads, barriers, checked accesses), ``ops.cpp`` (the
  ops that steer it) and ``selftest.cpp`` (kernels that break the rules on purpose),

all compiled against ``include/``, which stands in for the CUDA headers. The kernel sources
(``multi_tensor_apply.cuh``, ``pmd_lamb.cuh``, ``pmd_lamb_math.h``, ``tables.h``) compile
unmodified. ``largedet_kernels/backends/cuda.py`` and ``chunk_plan.py`` then drive the
emulated kernels on CPU tensors as they drive the real ones on a GPU.

``LARGEDET_EMULATOR_SANITIZER=thread|address`` builds a ThreadSanitizer or AddressSanitizer
variant and runs every block's threads as std::threads (``python -m cuda_emulator.sanitize``).
"""

import os
import re
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.utils.cpp_extension

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"
SCHEDULES = ("forward", "reverse", "random", "threads", "skip")  # skip: launches counted, no block run
SANITIZER = os.environ.get("LARGEDET_EMULATOR_SANITIZER") or None
# What the tests run the kernels under: both fiber orders, or std::threads for a sanitizer.
TEST_SCHEDULES = ("forward", "reverse") if SANITIZER is None else ("threads",)
DEFAULT_SCHEDULE = TEST_SCHEDULES[0]
SANITIZERS = ("thread", "address")
COUNTERS = ("launches", "blocks", "vector_loads", "vector_stores")

# kernel<...><<<grid, block, shared bytes, stream>>>(args);
_LAUNCH = re.compile(r"(\b\w+_kernel(?:<[^;{}]*?>)?)\s*<<<([^;]*?)>>>\s*\(([^;]*?)\);", re.S)
EXPECTED_LAUNCHES = 4  # moments, update, tensor sums, Σg²: a new launch must be seen here

# The op family's namespace for the emulated kernels.
NAMESPACE = "largedet_emulated"
# csrc/binding.cpp on CPU tensors: (text, replacement, occurrences).
_BINDING_REWRITES = (
    ("#include <ATen/cuda/CUDAContext.h>\n", '#include "torch_cuda_shim.h"\n', 1),
    ("#include <c10/cuda/CUDAGuard.h>\n", "", 1),
    ("device.is_cuda()", "device.is_cpu()", 1),
    ("TORCH_LIBRARY_IMPL(largedet, CUDA, m)", f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU, m)", 1),
)


def _rewrite(text: str, old: str, new: str, expected: int, source: str) -> str:
    found = text.count(old)
    if found != expected:
        raise RuntimeError(f"{source}: expected {expected} of {old!r}, found {found}; update tests/cuda_emulator")
    return text.replace(old, new)


def emulated_launch_source(text: str) -> str:
    """csrc/pmd_lamb_launch.cu with each launch a call of largedet_emu::launch."""

    def call(m: re.Match) -> str:
        args = m[3].strip()
        return f"::largedet_emu::launch({m[2].strip()}, &{m[1]}{', ' + args if args else ''});"

    rewritten, found = _LAUNCH.subn(call, text)
    if found != EXPECTED_LAUNCHES or "<<<" in rewritten:
        raise RuntimeError(
            f"csrc/pmd_lamb_launch.cu: expected {EXPECTED_LAUNCHES} <<<>>> launches to rewrite, rewrote {found}"
            + (" and others are left" if "<<<" in rewritten else "")
            + "; update tests/cuda_emulator"
        )
    late = '#include "pmd_lamb.cuh"\n'
    rewritten = _rewrite(rewritten, late, late + '#include "cuda_shim_late.h"\n', 1, "csrc/pmd_lamb_launch.cu")
    return '#include "cuda_shim.h"  // before anything of the kernels\n' + rewritten


def emulated_binding_source(text: str) -> str:
    """csrc/binding.cpp registering its ops for CPU tensors."""
    for old, new, expected in _BINDING_REWRITES:
        text = _rewrite(text, old, new, expected, "csrc/binding.cpp")
    return text


def _write_if_changed(path: Path, text: str) -> Path:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def _flags(sanitizer: Optional[str]) -> list:
    # -O2 keeps strict aliasing in force: the kernels must not rely on type puns (g++ miscompiles them).
    flags = ["-Wall", "-Wno-unknown-pragmas"]
    if sanitizer is None:
        return flags + ["-O2"]
    return flags + ["-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={sanitizer}"]


def build(sanitizer: Optional[str] = None, verbose: bool = False) -> Path:
    """The emulator's shared library, built under build/cuda_emulator/ when a source changed."""
    if sanitizer is not None and sanitizer not in SANITIZERS:
        raise ValueError(f"sanitizer must be one of {SANITIZERS} or None, got {sanitizer!r}")
    variant = sanitizer or "fibers"
    out = ROOT / "build" / "cuda_emulator" / variant
    generated = out / "generated"
    generated.mkdir(parents=True, exist_ok=True)
    sources = [
        _write_if_changed(generated / "pmd_lamb_launch.cpp",
                          emulated_launch_source((CSRC / "pmd_lamb_launch.cu").read_text())),
        _write_if_changed(generated / "binding.cpp", emulated_binding_source((CSRC / "binding.cpp").read_text())),
        HERE / "runtime.cpp",
        HERE / "ops.cpp",
        HERE / "selftest.cpp",
    ]  # fmt: skip
    name = f"largedet_cuda_emulator_{variant}"
    torch.utils.cpp_extension.load(
        name=name, sources=[str(s) for s in sources], extra_cflags=_flags(sanitizer),
        extra_ldflags=[f"-fsanitize={sanitizer}"] if sanitizer else [],
        extra_include_paths=[str(HERE / "include"), str(HERE), str(CSRC)], build_directory=str(out),
        is_python_module=False, verbose=verbose,
    )  # fmt: skip
    return out / f"{name}.so"


_loaded: Optional[str] = None


def load() -> None:
    """Build and load the emulator once per process; LARGEDET_EMULATOR_SANITIZER picks the variant."""
    global _loaded
    variant = SANITIZER or "fibers"
    if _loaded is not None:
        if _loaded != variant:
            raise RuntimeError(f"the {_loaded} emulator is loaded; one process takes one variant")
        return
    from largedet_kernels.backends import ops

    ops.define(NAMESPACE)
    torch.ops.load_library(str(build(SANITIZER)))
    _loaded = variant
    configure(DEFAULT_SCHEDULE)


def configure(schedule: str, seed: int = 0) -> None:
    """How the next launches run their blocks' threads (NOTE [emulated execution])."""
    torch.ops.largedet_emulator.configure(schedule, seed)


def counters() -> Dict[str, int]:
    return dict(zip(COUNTERS, torch.ops.largedet_emulator.counters()))


def reset_counters() -> None:
    torch.ops.largedet_emulator.reset_counters()
