"""The compiled extensions: found, or built on first use, when a backend first needs them.

setup.py builds them ahead of time where torch is importable at build time
(``pip install --no-build-isolation``): ``largedet_kernels._C`` (CUDA),
``largedet_kernels._C_cpu_<isa>`` for each ISA of ``CPU_ISAS``, and ``largedet_kernels._C_step_cache`` (the step
cache's native check, NOTE [step cache] in step_cache.py). Those are taken when present. Without
them (a plain ``pip install``, whose isolated build has no torch) the kernel sources shipped in the
package are built on first use with torch.utils.cpp_extension.load and ninja, against the torch
running, so the C++ ABI always matches. torch's load compiles, links, imports, and holds a file lock in the
build directory, so ranks that start together on an empty cache build once. What is ours around it:
the directory, keyed by torch version, C++ ABI, Python, machine, ISA (GPU archs for CUDA) and a hash of
the sources and flags, because torch's default one is keyed by the Python and CUDA versions alone; and
a stamp in it once a build completed, because the next process imports from it without torch's load,
which runs ninja and a compiler check each time.

The CPU kernels are built per ISA because a binary with AVX2 in it dies of SIGILL on a CPU without.
The process takes one (``cpu_isa()``): ``LARGEDET_CPU_ISA`` or, unset, torch's own detection
(``torch.backends.cpu.get_cpu_capability()``). Only that variant is loaded: all of them register the
same CPU implementation of the op family (largedet_kernels/backends/ops.py).

Environment: ``LARGEDET_CPU_ISA`` (generic, avx2, avx512); ``LARGEDET_JIT=0`` takes only the
ahead-of-time extensions; ``LARGEDET_KERNELS_CACHE``, the cache directory (default
``$XDG_CACHE_HOME/largedet_kernels``, or ``~/.cache/largedet_kernels``).

Nothing here imports torch at module level: setup.py reads the flags and sources from this file.
"""

import contextlib
import hashlib
import importlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path
from types import ModuleType
from typing import Dict, Iterator, List, Optional, Tuple, Union

_PACKAGE = Path(__file__).resolve().parent

CPU_ISAS = ("generic", "avx2", "avx512")
# What ATen compiles its own kernels of each capability with (cmake/Codegen.cmake): CPU_CAPABILITY_*
# picks at::vec's implementation, CPU_CAPABILITY its namespace. generic is ATen's default vectors.
ISA_FLAGS = {
    "generic": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512",
               "-DCPU_CAPABILITY=AVX512"],
}  # fmt: skip
_CAPABILITY_ISA = {"AVX2": "avx2", "AVX512": "avx512"}  # torch's names, of those built here
CPU_SOURCES = ("cpu/pmd_lamb_cpu.cpp", "cpu/module.cpp")
STEP_CACHE_SOURCES = ("step_cache/step_cache.cpp",)
AOT_STEP_CACHE_MODULE = "largedet_kernels._C_step_cache"
AOT_CUDA_MODULE = "largedet_kernels._C"
# The C++ flags of the CPU kernels and of the CUDA extension's host code. -ffp-contract=off: a*b + c rounds as
# written, not fused into an FMA wherever the compiler's inlining happens to allow; otherwise one ISA's CPU kernels
# step to other bits built ahead of time (setuptools adds Python's CFLAGS, -fwrapv among them) than on first use.
CPU_CFLAGS = ["-O3", "-ffp-contract=off"]
CUDA_CFLAGS = ["-O3"]
# NDEBUG in both builds (setuptools' has it from Python's CFLAGS, torch's load not): without it pybind11 asks
# whether the GIL is held at each reference count change, which costs the check 2-3x.
STEP_CACHE_CFLAGS = ["-O3", "-DNDEBUG"]
# What each target's build reads, for the cache key: a change of one extension's sources rebuilds that one alone.
_CPU_INPUTS = ("cpu/*.cpp", "cpu/*.h", "*.h")
_STEP_CACHE_INPUTS = ("step_cache/*.cpp", "step_cache/*.h")
_CUDA_INPUTS = ("*.cpp", "*.cu", "*.cuh", "*.h")


class ExtensionUnavailable(ImportError):
    """An extension that is not built ahead of time and cannot be built here; the message says why."""


def csrc() -> Optional[Path]:
    """The kernel sources: shipped inside the installed package, or the checkout's csrc/ beside it."""
    for candidate in (_PACKAGE / "csrc", _PACKAGE.parent / "csrc"):
        if (candidate / CPU_SOURCES[0]).is_file():
            return candidate
    return None


def aot_cpu_module(isa: str) -> str:
    return f"largedet_kernels._C_cpu_{isa}"


def x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def openmp_flags() -> List[str]:
    """-fopenmp when torch is built with OpenMP: its at::parallel_for is then an OpenMP loop in ATen's headers."""
    import torch

    return ["-fopenmp"] if torch.backends.openmp.is_available() else []


def cpu_isas_supported() -> Tuple[str, ...]:
    """The ISAs of CPU_ISAS this CPU runs, by torch's detection (cpuinfo)."""
    import torch

    if not x86():
        return ("generic",)
    return ("generic", *(("avx2",) if torch.cpu._is_avx2_supported() else ()),
            *(("avx512",) if torch.cpu._is_avx512_supported() else ()))  # fmt: skip


_ISA: Optional[str] = None


def cpu_isa() -> str:
    """The CPU kernels' ISA for this process: LARGEDET_CPU_ISA, else the best of torch's detection."""
    global _ISA
    if _ISA is None:
        import torch

        forced = os.environ.get("LARGEDET_CPU_ISA", "")
        if forced:
            if forced not in CPU_ISAS:
                raise ValueError(f"LARGEDET_CPU_ISA must be one of {CPU_ISAS}, got {forced!r}")
            supported = cpu_isas_supported()
            if forced not in supported:
                raise RuntimeError(f"LARGEDET_CPU_ISA={forced}, but this CPU lacks {forced}: it runs "
                                   f"{', '.join(supported)}; unset LARGEDET_CPU_ISA to take the best of "
                                   "those")  # fmt: skip
            _ISA = forced
        else:
            _ISA = _CAPABILITY_ISA.get(torch.backends.cpu.get_cpu_capability(), "generic")
    return _ISA


def cache_root() -> Path:
    if os.environ.get("LARGEDET_KERNELS_CACHE"):
        return Path(os.environ["LARGEDET_KERNELS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "largedet_kernels"


def _torch_key() -> str:
    """What a built extension's ABI depends on besides its own sources and flags."""
    import torch

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # The machine too: a cache on a home directory shared by x86 and Arm nodes holds builds of both.
    return (f"torch-{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}"
            f"-cxx11abi{abi}")


def _digest(root: Path, patterns, *args) -> str:
    h = hashlib.sha256()
    for path in sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()}):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(repr(args).encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _quiet_cpp_extension() -> Iterator[None]:
    """torch.utils.cpp_extension logs warnings on import (no CUDA runtime) and builds (compiler checks):
    the first use prints one line of ours instead."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """The ninja of the ninja package on PATH during a build: it sits beside the venv's python, which
    is not on PATH when that python is run by its path."""
    if shutil.which("ninja") is not None:
        yield
        return
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), *_ninja_package_bin(), path])
    try:
        yield
    finally:
        os.environ["PATH"] = path


def _ninja_package_bin() -> List[str]:
    try:
        import ninja
    except ImportError:
        return []
    return [ninja.BIN_DIR] if hasattr(ninja, "BIN_DIR") else []


def _compiler_blocker() -> Optional[str]:
    """Why torch's JIT cannot compile C++ here; None when it can."""
    with _quiet_cpp_extension():
        from torch.utils.cpp_extension import get_cxx_compiler, is_ninja_available

    compiler = get_cxx_compiler()  # the one torch's load runs: CXX, else c++
    if shutil.which(compiler) is None:
        return (f"no C++ compiler was found to build it on first use ({compiler!r} is not on PATH): install one "
                "(e.g. apt install g++, or dnf install gcc-c++) and it builds on the next run, or set CXX to the one "
                "to use")  # fmt: skip
    include = sysconfig.get_path("include", scheme="posix_prefix")
    if not (include and os.path.isfile(os.path.join(include, "Python.h"))):
        return (f"the Python headers to build it on first use are missing (no Python.h in {include}): install "
                f"them (e.g. apt install python{sys.version_info[0]}.{sys.version_info[1]}-dev) and it builds on the "
                "next run")  # fmt: skip
    with _ninja_on_path():
        if not is_ninja_available():
            return "ninja, which builds it on first use, is not installed: pip install ninja, and it builds next run"
    return None


class _Extension:
    """One of the extensions: its ahead-of-time module, or its build on first use. A subclass says
    aot_name() and jit_name() (the module's names), blocker() (why it cannot be built here, or None; by
    default what any C++ build needs), spec() (torch.utils.cpp_extension.load's sources and flags),
    label() and duration() (for the line printed while it builds) and directory() (its build directory
    in the cache)."""

    # Whether module(build=False) looks in the cache (the CUDA key asks the GPUs their archs).
    CACHE_WITHOUT_BUILD = True

    def __init__(self) -> None:
        # The module once loaded, or why there is none once a build was refused or failed.
        self._found: Optional[Union[ModuleType, str]] = None
        # Whether module(build=False) found nothing: the next such look is not made again (it hashes csrc/).
        self._missed = False

    def module(self, build: bool = True) -> Optional[ModuleType]:
        """The loaded extension; with ``build`` built first if need be, or ExtensionUnavailable saying why
        not. Without ``build``, None when it is neither built ahead of time nor in the cache."""
        if isinstance(self._found, ModuleType):
            return self._found
        if isinstance(self._found, str):
            if build:
                raise ExtensionUnavailable(self._found)
            return None
        if self._missed and not build:
            return None
        module = self._ahead_of_time()
        if module is None:
            module = self._cached() if build or self.CACHE_WITHOUT_BUILD else None
        if module is None and build:
            try:
                module = self._build()
            except ExtensionUnavailable as err:
                self._found = str(err)
                raise
        if module is not None:
            self._found = module
        self._missed = module is None
        return module

    def blocker(self) -> Optional[str]:
        return _compiler_blocker()

    def _ahead_of_time(self) -> Optional[ModuleType]:
        """The module built ahead of time beside this package's own files. One that an import hook finds
        elsewhere (another installation's editable finder, say) was built from other sources: not taken."""
        try:
            spec = importlib.util.find_spec(self.aot_name())
        except ImportError:
            return None
        if spec is None or spec.origin is None or Path(spec.origin).resolve().parent != _PACKAGE:
            return None
        try:
            return importlib.import_module(self.aot_name())
        except ImportError as err:  # built against another torch, say: said, then the cache or a build
            warnings.warn(f"largedet-kernels: {spec.origin} does not load ({err}); it is rebuilt in the cache",
                          stacklevel=2)  # fmt: skip
            return None

    def _jit_off(self) -> bool:
        return os.environ.get("LARGEDET_JIT", "1") == "0"

    def _cached(self) -> Optional[ModuleType]:
        """The module from the cache when a build there completed (its stamp exists)."""
        if self._jit_off() or csrc() is None:
            return None
        stamp = self.directory() / "built"
        library = stamp.read_text().strip() if stamp.is_file() else ""
        if not (library and os.path.isfile(library)):
            return None
        spec = importlib.util.spec_from_file_location(self.jit_name(), library)
        try:
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except (ImportError, OSError):  # a partial or foreign file: built again over it
            return None
        return module

    def _build(self) -> ModuleType:
        if self._jit_off():
            raise ExtensionUnavailable("it is not built ahead of time, and LARGEDET_JIT=0 switches off its build on "
                                       "first use: unset LARGEDET_JIT to build it")  # fmt: skip
        if csrc() is None:
            raise ExtensionUnavailable("it is not built ahead of time, and the package holds no kernel sources to "
                                       "build it from (reinstall largedet-kernels)")  # fmt: skip
        blocker = self.blocker()
        if blocker is not None:
            raise ExtensionUnavailable(f"it is not built ahead of time, and {blocker}")
        directory = self.directory()
        directory.mkdir(parents=True, exist_ok=True)
        print(f"largedet-kernels: building {self.label()} once, {self.duration()}, into {directory}", file=sys.stderr,
              flush=True)  # fmt: skip
        with _quiet_cpp_extension(), _ninja_on_path():
            import torch.utils.cpp_extension

            try:
                module = torch.utils.cpp_extension.load(name=self.jit_name(), build_directory=str(directory),
                                                        verbose=False, **self.spec())  # fmt: skip
            except Exception as err:  # the compiler's or the loader's error, whichever it is
                log = directory / "build.log"
                log.write_text(str(err))
                lines = [line for line in str(err).splitlines() if line.strip()]
                first = next((line for line in lines if "error:" in line.lower()), lines[-1] if lines else "")
                raise ExtensionUnavailable(f"building it on first use failed ({first.strip()[:300]}); the whole "
                                           f"output is in {log}") from err  # fmt: skip
        # The stamp that lets the next process import it without torch's load (which runs ninja and the
        # compiler's version check), written whole: another process may be reading it.
        handle, partial = tempfile.mkstemp(dir=directory, prefix="built.")  # unique across the nodes of a cache
        with os.fdopen(handle, "w") as f:
            f.write(f"{module.__file__}\n")
        os.replace(partial, directory / "built")
        return module


class _CpuExtension(_Extension):
    def aot_name(self) -> str:
        return aot_cpu_module(cpu_isa())

    def jit_name(self) -> str:
        return f"largedet_kernels_cpu_{cpu_isa()}"

    def spec(self) -> Dict:
        root = csrc()
        openmp = openmp_flags()
        return dict(sources=[str(root / s) for s in CPU_SOURCES], extra_cflags=CPU_CFLAGS + openmp +
                    ISA_FLAGS[cpu_isa()], extra_ldflags=openmp)  # fmt: skip

    def label(self) -> str:
        return f"the CPU kernels ({cpu_isa()})"

    def duration(self) -> str:
        return "~40 s"

    def directory(self) -> Path:
        spec = self.spec()
        digest = _digest(csrc(), _CPU_INPUTS, spec["extra_cflags"], spec["extra_ldflags"])
        return cache_root() / _torch_key() / f"cpu-{cpu_isa()}-{digest}"


class _StepCacheExtension(_Extension):
    def aot_name(self) -> str:
        return AOT_STEP_CACHE_MODULE

    def jit_name(self) -> str:
        return "largedet_kernels_step_cache"

    def spec(self) -> Dict:
        return dict(sources=[str(csrc() / s) for s in STEP_CACHE_SOURCES], extra_cflags=STEP_CACHE_CFLAGS)

    def label(self) -> str:
        return "the step cache's native check"

    def duration(self) -> str:
        return "~10 s"

    def directory(self) -> Path:
        return cache_root() / _torch_key() / f"step-cache-{_digest(csrc(), _STEP_CACHE_INPUTS, STEP_CACHE_CFLAGS)}"


def cuda_include_dirs() -> List[str]:
    """CUDA 13 torch wheels keep the toolkit's headers (cusparse.h, ...) in the nvidia packages."""
    try:
        import nvidia
    except ImportError:
        return []
    return [d for d in (os.path.join(p, "cu13", "include") for p in nvidia.__path__) if os.path.isdir(d)]


class _CudaExtension(_Extension):
    CACHE_WITHOUT_BUILD = False
    def aot_name(self) -> str:
        return AOT_CUDA_MODULE

    def jit_name(self) -> str:
        return "largedet_kernels_cuda"

    def blocker(self) -> Optional[str]:
        import torch

        if torch.version.cuda is None:
            return f"torch {torch.__version__} is not a CUDA build"
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible to build it for"
        with _quiet_cpp_extension():
            from torch.utils.cpp_extension import CUDA_HOME
        if CUDA_HOME is None or not os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc")):
            return "nvcc, which builds it on first use, was not found: put it on PATH or set CUDA_HOME"
        return _compiler_blocker()

    def archs(self) -> str:
        """What torch's JIT compiles for: TORCH_CUDA_ARCH_LIST, else the visible GPUs' archs."""
        import torch

        if os.environ.get("TORCH_CUDA_ARCH_LIST"):
            return os.environ["TORCH_CUDA_ARCH_LIST"]
        capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{major}.{minor}" for major, minor in sorted(capabilities))

    def spec(self) -> Dict:
        root = csrc()
        sources = sorted(str(p) for pattern in ("*.cpp", "*.cu") for p in root.glob(pattern))
        return dict(sources=sources, extra_cflags=CPU_CFLAGS, extra_cuda_cflags=CUDA_CFLAGS,
                    extra_include_paths=cuda_include_dirs())  # fmt: skip

    def label(self) -> str:
        return f"the CUDA kernels (archs {self.archs()})"

    def duration(self) -> str:
        return "a few minutes"

    def directory(self) -> Path:
        import torch

        archs = self.archs()
        digest = _digest(csrc(), _CUDA_INPUTS, CPU_CFLAGS, CUDA_CFLAGS, archs, torch.version.cuda)
        return cache_root() / _torch_key() / f"cuda-{archs.replace(';', '_').replace('.', '')}-{digest}"


CPU = _CpuExtension()
CUDA = _CudaExtension()
STEP_CACHE = _StepCacheExtension()
