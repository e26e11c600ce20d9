"""The ``cpu`` backend: the C++ kernels of csrc/cpu/, loaded by largedet_kernels/_extensions.py.

For optimizer offload (FSDP2's CPUOffloadPolicy), where step() runs on the host over
the whole model. Two passes as on the GPU, vectorised and parallel over chunks of a
fixed size, so results do not depend on the thread count (NOTE [cpu passes] in
csrc/cpu/pmd_lamb_cpu.cpp). They implement the op family of ops.py for CPU tensors.

The kernels are compiled once per CPU ISA; ``ISA`` is the one this process loads (its
extension is loaded, or built, on the backend's first use).
"""

import sys
from typing import Optional

import torch

from .. import _extensions
from . import fused

NAME = "cpu"
TRACEABLE = True  # the ops' tensor-list form under torch.compile (NOTE [tensor lists or tables] in ops.py)

# The ahead-of-time build, the alternative to the build on first use.
HOW_TO_BUILD = ("pip install --no-build-isolation <source checkout>, with torch, setuptools, wheel, ninja and a C++ "
                "compiler installed first (LARGEDET_CPU_BUILD=1 fails loudly)")  # fmt: skip

# Elements per chunk of csrc/cpu/pmd_lamb_cpu.cpp's kChunk, which the ops check.
CHUNK = 1 << 16
KERNELS = fused.OpKernels(traceable=TRACEABLE, reduces_between_passes=False)
grad_sumsq, step, begin_step = fused.entry_points(sys.modules[__name__])

# generic, avx2 or avx512: LARGEDET_CPU_ISA, else the best this CPU runs.
ISA = _extensions.cpu_isa()


def unavailable_reason(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, and these parameters are on {device}"
    try:
        _extensions.CPU.module()
    except _extensions.ExtensionUnavailable as err:
        return f"the CPU extension is unavailable: {err}. To build it ahead of time instead: {HOW_TO_BUILD}"
    return None
