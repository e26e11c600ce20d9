"""Build of largedet-kernels.

``LARGEDET_CUDA_BUILD`` governs the CUDA extension ``largedet_kernels._C``:
``auto`` (default) builds it when nvcc and a CUDA build of torch are found,
``1`` builds it or fails saying why, ``0`` skips it. Without the extension
the package installs as pure Python and runs on its other backends. Building
it needs torch at build time: ``pip install --no-build-isolation -e .``.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

MODES = ("auto", "1", "0")


def cuda_build_blocker():
    """Why the CUDA extension cannot be built here; None when it can."""
    sources = glob.glob("csrc/*.cu")
    if not sources:
        return "csrc/ holds no CUDA sources"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return "torch is not importable at build time (use pip install --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return "nvcc was not found (set CUDA_HOME to the CUDA toolkit)"
    return None


def ext_modules():
    mode = os.environ.get("LARGEDET_CUDA_BUILD", "auto")
    if mode not in MODES:
        raise SystemExit(f"LARGEDET_CUDA_BUILD must be one of {MODES}, got {mode!r}")
    if mode == "0":
        return []
    blocker = cuda_build_blocker()
    if blocker is not None:
        if mode == "1":
            raise SystemExit(f"LARGEDET_CUDA_BUILD=1 but the CUDA extension cannot be built: {blocker}")
        print(f"largedet-kernels: skipping the CUDA extension ({blocker})")
        return []
    from torch.utils.cpp_extension import CUDAExtension

    return [CUDAExtension("largedet_kernels._C", sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu")))]


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
