"""Build of largedet-kernels.

``LARGEDET_CPU_BUILD`` governs the CPU extension ``largedet_kernels._C_cpu`` (the
``cpu`` backend, built with the machine's C++ compiler, no nvcc): ``auto``
(default) builds it when torch is importable at build time and lets the install
go on without it if it fails, ``1`` builds it or fails, ``0`` skips it.

``LARGEDET_CUDA_BUILD`` governs the CUDA extension ``largedet_kernels._C``:
``auto`` (default) builds it when nvcc and a CUDA build of torch are found,
``1`` builds it or fails saying why, ``0`` skips it. Without the extension
the package installs as pure Python and runs on its other backends. Building
it needs torch at build time: ``pip install --no-build-isolation -e .``.
``TORCH_CUDA_ARCH_LIST`` defaults to those of 7.0, 8.0 and 9.0 that the found
nvcc supports (CUDA 13 dropped 7.0; V100 kernels come from NVRTC instead).
"""

import glob
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


def vector_flags():
    """AVX2 vectors for at::vec::Vectorized when the building machine has them (the
    extension is built where it runs, like -march=native); ATen's generic vectors otherwise."""
    try:
        flags = set(re.findall(r"^flags\s*:(.*)$", open("/proc/cpuinfo").read(), re.M)[0].split())
    except (OSError, IndexError):
        return []
    if {"avx2", "fma", "f16c"} <= flags:  # what ATen's own AVX2 kernels are built for
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


def cpu_extension():
    mode = build_mode("LARGEDET_CPU_BUILD")
    if mode == "0":
        return []
    try:
        import torch
        from torch.utils.cpp_extension import CppExtension
    except ImportError:
        if mode == "1":
            raise SystemExit("LARGEDET_CPU_BUILD=1 but torch is not importable at build time") from None
        print("largedet-kernels: skipping the CPU extension (torch is not importable at build time)")
        return []
    # at::parallel_for is an OpenMP loop in ATen's headers when torch runs on OpenMP.
    backend = re.search(r"ATen parallel backend: (.*)", torch.__config__.parallel_info())
    openmp = ["-fopenmp"] if backend and backend.group(1).strip() == "OpenMP" else []
    return [
        CppExtension(
            "largedet_kernels._C_cpu",
            ["csrc/cpu/pmd_lamb_cpu.cpp", "csrc/cpu/step_cache.cpp"],
            extra_compile_args=["-O3", *openmp, *vector_flags()],
            extra_link_args=openmp,
            optional=mode == "auto",
        )
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
    import nvidia  # CUDA 13 torch wheels keep the toolkit headers (cusparse.h, ...) here

    from torch.utils.cpp_extension import CUDAExtension

    includes = [os.path.join(p, "cu13", "include") for p in nvidia.__path__]
    return [
        CUDAExtension(
            "largedet_kernels._C",
            sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu")),
            include_dirs=[d for d in includes if os.path.isdir(d)],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-Xptxas=-v"]},
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
    description="Fused PMD-LAMB and LAMB optimizers (CUDA, Triton, PyTorch) for large-batch detection training",
    packages=find_packages(include=["largedet_kernels", "largedet_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    ext_modules=extensions,
    cmdclass=cmdclass,
)
