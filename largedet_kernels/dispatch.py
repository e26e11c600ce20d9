"""The dispatcher: which backend steps the tensors of a given device.

``backend="auto"`` takes the first available of ``AUTO_ORDER`` for the device's
type (fastest first; never Triton's interpreter, which runs the kernels on CPU
tensors for tests, not for speed; on CPU without the C++ extension it warns once
and takes the torch backend); an explicit backend that cannot run on the device raises
:class:`BackendUnavailableError` saying why and how to get it, never a silent
fallback. ``PMDLAMB.backends`` (and ``LAMB.backends``) reports the choice for each device of
an optimizer's parameters, ``backend_for(device)`` for any device.
"""

import functools
import importlib
import os
import sys
import warnings
from types import ModuleType
from typing import Optional

import torch

BACKEND_NAMES = ("cuda", "triton", "cpu", "torch")
BACKENDS = ("auto", *BACKEND_NAMES)
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
AUTO_ORDER_ELSEWHERE = ("torch",)

# How to get a backend whose module does not import (the cuda module always imports and
# says itself how to build the extension).
_HOW_TO_GET = {"triton": "install Triton (pip install triton) beside a CUDA build of torch"}
_MODULES = {
    "cuda": "largedet_kernels.backends.cuda",
    "triton": "largedet_kernels.backends.triton",
    "cpu": "largedet_kernels.backends.cpu",
    "torch": "largedet_kernels.backends.torch_foreach",
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here."""


def backend_module(name: str) -> ModuleType:
    """The module implementing backend ``name`` (imported on first use)."""
    return importlib.import_module(_MODULES[name])


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot step tensors on ``device``; None when it can."""
    if name == "torch":
        return None
    try:
        module = backend_module(name)
    except ImportError as err:
        return f"the {name} backend cannot be imported ({err}); {_HOW_TO_GET.get(name, 'reinstall largedet-kernels')}"
    return module.unavailable_reason(device)


def check_backend_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def resolve(requested: str, device: torch.device) -> str:
    """The backend that steps tensors of ``device``, or an error for an explicit one."""
    if requested != "auto":
        reason = unavailable_reason(requested, device)
        if reason is not None:
            raise BackendUnavailableError(f"backend={requested!r} is unavailable: {reason}")
        return requested
    order = AUTO_ORDER.get(device.type, AUTO_ORDER_ELSEWHERE)
    name = next(name for name in order if unavailable_reason(name, device) is None)
    if device.type == "cpu" and name != "cpu":
        _warn_slow_cpu_path(unavailable_reason("cpu", device))
    return name


# Frames of these directories are left out of the fallback warning's place: it names the user's line.
_NOT_THE_CALLER = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(torch.__file__) + os.sep)


@functools.lru_cache(maxsize=None)
def _warn_slow_cpu_path(reason: str) -> None:
    """Once per process: CPU tensors take the slower torch backend. The warning points at the first frame
    outside this package and torch (whose optimizer wraps step()), whichever path led here."""
    frame, stacklevel = sys._getframe(), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_NOT_THE_CALLER):
        frame, stacklevel = frame.f_back, stacklevel + 1
    warnings.warn(f"largedet_kernels: CPU tensors are stepped by the torch backend because {reason}",
                  stacklevel=stacklevel)  # fmt: skip
