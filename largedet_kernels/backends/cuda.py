"""The ``cuda`` backend: the hand-written kernels of csrc/, built into largedet_kernels._C."""

from typing import Optional

import torch

_HOW = "LARGEDET_CUDA_BUILD=1 pip install --no-build-isolation -e . on a machine with nvcc and a CUDA build of torch"


def unavailable_reason(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA devices, and these parameters are on {device}"
    try:
        from .. import _C  # noqa: F401
    except ImportError as err:
        return f"the CUDA extension largedet_kernels._C is not built ({err}); build it with {_HOW}"
    return None
