"""Build of largedet-kernels.

A plain ``pip install`` builds the package without its compiled extensions (the isolated build
has no torch): largedet_kernels/_extensions.py then builds them on first use from the sources
shipped in the package (csrc/ installed as largedet_kernels/csrc). With torch importable at
build time (``pip install --no-build-isolation``, torch, setuptools, wheel and ninja installed
first) they are built here, ahead of time, and taken in preference:

``LARGEDET_CPU_BUILD`` governs the CPU extensions ``largedet_kernels._C_cpu_<isa>`` (the ``cpu``
backend, one per ISA of _extensions.CPU_ISAS, the process loading the one its CPU runs; built with
the machine's C++ compiler, no nvcc): ``auto`` (default) builds them when torch is importable at
build time and lets the install go on without them if they fail, ``1`` builds them or fails,
``0`` skips them.

``LARGEDET_CUDA_BUILD`` governs the CUDA extension ``largedet_kernels._C``:
``auto`` (default) builds it when nvcc and a CUDA build of torch are found,
``1`` builds it or fails saying why, ``0`` skips it.
``TORCH_CUDA_ARCH_LIST`` defaults to those of 7.0, 8.0 and 9.0 that the found
nvcc supports (CUDA 13 dropped 7.0; V100 kernels come from NVRTC instead).
"""

import glob
import importlib.util
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup

MODES = ("auto", "1", "0")
ARCHS = ("7.0", "8.0", "9.0")


def find_cuda_home():
    """CUDA_HOME, or the toolkit behind the nvcc on PATH (which may be a wrapper script)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if shutil.which("nvcc") is None:
        return None
    dry = subprocess.run(["nvcc", "--dryrun", "x.cu"], capture_output=True, text=True).stderr
    top = re.search(r"TOP=(\S+)", dry)
    return os.path.normpath(top.group(1).rstrip("/").removesuffix("/bin/..")) if top else None


def default_arch_list(cuda_home):
    listed = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"], capture_output=True,
                            text=True).stdout  # fmt: skip
    return ";".join(a for a in ARCHS if f"compute_{a.replace('.', '')}" in listed)


def cuda_build_blocker():
    """Why the CUDA extension cannot be built here; None when it can."""
    if not glob.glob("csrc/*.cu"):
        return "csrc/ holds no CUDA sources"
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return "nvcc was not found (put it on PATH or set CUDA_HOME to the CUDA toolkit)"
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    try:
        import torch
    except ImportError:
        return "torch is not importable at build time (use pip install --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    return None


def build_mode(variable):
    mode = os.environ.get(variable, "auto")
    if mode not in MODES:
        raise SystemExit(f"{variable} must be one of {MODES}, got {mode!r}")
    return mode


def build_flags():
    """largedet_kernels/_extensions.py, read without importing the package (nor torch)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "largedet_kernels", "_extensions.py")
    spec = importlib.util.spec_from_file_location("largedet_extensions", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_extension():
    mode = build_mode("LARGEDET_CPU_BUILD")
    if mode == "0":
        return []
    try:
        from torch.utils.cpp_extension import CppExtension
    except ImportError:
        if mode == "1":
            raise SystemExit("LARGEDET_CPU_BUILD=1 but torch is not importable at build time") from None
        print("largedet-kernels: not building the CPU extensions ahead of time (torch is not importable at build "
              "time); they are built on first use instead")  # fmt: skip
        return []
    flags = build_flags()
    openmp = flags.openmp_flags()
    # Every ISA, not the building machine's: the process picks the one its CPU runs.
    isas = flags.CPU_ISAS if flags.x86() else ("generic",)
    return [
        CppExtension(
            flags.aot_cpu_module(isa),
            [os.path.join("csrc", s) for s in flags.CPU_SOURCES],
            extra_compile_args=[*flags.CPU_CFLAGS, *openmp, *flags.ISA_FLAGS[isa]],
            extra_link_args=openmp,
            optional=mode == "auto",
        )
        for isa in isas
    ]


def ext_modules():
    return cuda_extension() + cpu_extension()


def cuda_extension():
    mode = build_mode("LARGEDET_CUDA_BUILD")
    if mode == "0":
        return []
    blocker = cuda_build_blocker()
    if blocker is not None:
        if mode == "1":
            raise SystemExit(f"LARGEDET_CUDA_BUILD=1 but the CUDA extension cannot be built: {blocker}")
        print(f"largedet-kernels: skipping the CUDA extension ({blocker})")
        return []
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_arch_list(os.environ["CUDA_HOME"]))
    from torch.utils.cpp_extension import CUDAExtension

    flags = build_flags()
    return [
        CUDAExtension(
            "largedet_kernels._C",
            sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu")),
            include_dirs=flags.cuda_include_dirs(),
            extra_compile_args={"cxx": flags.CPU_CFLAGS, "nvcc": [*flags.CUDA_CFLAGS, "-Xptxas=-v"]},
        )
    ]


extensions = ext_modules()
cmdclass = {}
if extensions:
    from torch.utils.cpp_extension import BuildExtension

    cmdclass["build_ext"] = BuildExtension

setup(
    name="largedet-kernels",
    version="0.1.0",
    description="Fused PMD-LAMB and LAMB optimizers (CUDA, Triton, C++ CPU, PyTorch) for large-batch detection "
                "training",
    # csrc/ goes into the package as largedet_kernels/csrc: the sources of the build on first use.
    packages=[*find_packages(include=["largedet_kernels", "largedet_kernels.*"]), "largedet_kernels.csrc",
              "largedet_kernels.csrc.cpu"],
    package_dir={"largedet_kernels.csrc": "csrc"},
    package_data={"largedet_kernels.csrc": ["*.h", "*.cuh", "*.cu", "*.cpp"],
                  "largedet_kernels.csrc.cpu": ["*.cpp", "*.h"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "ninja"],
    ext_modules=extensions,
    cmdclass=cmdclass,
)
