"""The ``cuda`` backend: the hand-written kernels of csrc/, loaded by largedet_kernels/_extensions.py.

csrc/binding.cpp implements the op family of ops.py for CUDA tensors: a step is both passes
of NOTE [two passes] (two launches), its halves for shards (NOTE [sharded norms]) and for
plans that reduce between the passes, and Σg². The device tables are chunk_plan.py's,
shared with the Triton backend.
"""

import sys
from typing import Optional

import torch

from .. import _extensions
from . import fused

NAME = "cuda"
# The table form's tables come from data_ptr(); the tensor-list form uploads a pointer table at each call,
# which a captured graph would replay from freed host memory.
TRACEABLE = False

# Elements per block (a multiple of csrc/tables.h's kILP).
CHUNK = 16384
KERNELS = fused.OpKernels(traceable=TRACEABLE, reduces_between_passes=True)
grad_sumsq, step, begin_step = fused.entry_points(sys.modules[__name__])

# The ahead-of-time build, the alternative to the build on first use.
_HOW = ("LARGEDET_CUDA_BUILD=1 pip install --no-build-isolation <source checkout> on a machine with nvcc and a CUDA "
        "build of torch, with setuptools, wheel and ninja installed first")  # fmt: skip


def unavailable_reason(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA devices, and these parameters are on {device}"
    try:
        _extensions.CUDA.module()
    except _extensions.ExtensionUnavailable as err:
        return f"the CUDA extension is unavailable: {err}. To build it ahead of time instead: {_HOW}"
    return None
