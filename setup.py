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

``largedet_kernels._C_step_cache`` (the step cache's native check, which every backend but torch
builds on first use otherwise) is built whenever torch is importable at build time, whatever
``LARGEDET_CPU_BUILD`` says: a GPU machine without the CPU kernels uses it too. If its build fails,
the install goes on without it.

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
import subprocess

from setuptools import find_packages, setup

MODES = ("auto", "1", "0")
ARCHS = ("7.0", "8.0", "9.0")


def find_cuda_home():
    """torch.utils.cpp_extension.CUDA_HOME (the CUDA_HOME variable, else the folder above the nvcc on PATH)."""
    with build_flags()._quiet_cpp_extension():  # torch warns at import of the CUDA_HOME corrected below
        import torch.utils.cpp_extension

    cuda_home = torch.utils.cpp_extension.CUDA_HOME
    nvcc = os.path.join(cuda_home or "", "bin", "nvcc")
    if (cuda_home is None or os.environ.get("CUDA_HOME") or not os.path.isfile(nvcc)
            or os.path.isfile(os.path.join(cuda_home, "include", "cuda_runtime.h"))):  # fmt: skip
        return cuda_home
    # A wrapper script (torch takes /usr/local for /usr/local/bin/nvcc, no toolkit): nvcc --dryrun says the one it runs.
    top = re.search(r"TOP=(\S+)", subprocess.run([nvcc, "--dryrun", "x.cu"], capture_output=True, text=True).stderr)
    if top:
        cuda_home = os.path.normpath(top.group(1).rstrip("/").removesuffix("/bin/.."))
        torch.utils.cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = cuda_home
    return cuda_home


def default_arch_list(cuda_home):
    listed = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"], capture_output=True,
                            text=True).stdout  # fmt: skip
    return ";".join(a for a in ARCHS if f"compute_{a.replace('.', '')}" in listed)


def cuda_build_blocker():
    """Why the CUDA extension cannot be built here; None when it can."""
    if not glob.glob("csrc/*.cu"):
        return "csrc/ holds no CUDA sources"
    try:
        import torch
    except ImportError:
        return "torch is not importable at build time (use pip install --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    cuda_home = find_cuda_home()
    if cuda_home is None or not os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
        return "nvcc was not found (put it on PATH or set CUDA_HOME to the CUDA toolkit)"
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
    # Every ISA, not the building machine's: the process picks the one its CPU runs. LARGEDET_CPU_ISAS=native
    # builds this machine's alone (make bench).
    isas = flags.CPU_ISAS if flags.x86() else ("generic",)
    if os.environ.get("LARGEDET_CPU_ISAS") == "native":
        isas = (flags.cpu_isa(),)
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


def step_cache_extension():
    try:
        from torch.utils.cpp_extension import CppExtension
    except ImportError:  # built on first use instead
        return []
    flags = build_flags()
    return [CppExtension(flags.AOT_STEP_CACHE_MODULE, [os.path.join("csrc", s) for s in flags.STEP_CACHE_SOURCES],
                         extra_compile_args=flags.STEP_CACHE_CFLAGS, optional=True)]  # fmt: skip


def ext_modules():
    return cuda_extension() + cpu_extension() + step_cache_extension()


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
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_arch_list(CUDA_HOME))

    flags = build_flags()
    return [
        CUDAExtension(
            flags.AOT_CUDA_MODULE,
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
              "largedet_kernels.csrc.cpu", "largedet_kernels.csrc.step_cache"],
    package_dir={"largedet_kernels.csrc": "csrc"},
    package_data={"largedet_kernels.csrc": ["*.h", "*.cuh", "*.cu", "*.cpp"],
                  "largedet_kernels.csrc.cpu": ["*.cpp", "*.h"], "largedet_kernels.csrc.step_cache": ["*.cpp", "*.h"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "ninja"],
    ext_modules=extensions,
    cmdclass=cmdclass,
)
