"""The ``cuda`` backend: the hand-written kernels of csrc/, loaded by largedet_kernels/_extensions.py.

The extension registers custom ops (csrc/binding.cpp): ``largedet::pmd_lamb_step_``
(both passes of NOTE [two passes], two launches), its halves ``pmd_lamb_moments_`` and
``pmd_lamb_update_`` for shards (NOTE [sharded norms]) and for plans that reduce between
the passes, and ``largedet::grad_sumsq``. The device tables are chunk_plan.py's, shared with
the Triton backend; the optimizer's steps pass them without tensor lists (NOTE [tensor lists
or tables] in csrc/binding.cpp). The ops' fake implementations below serve tracing tools that
call them with their tensor lists; the optimizer's step itself is not traceable on this backend
(its tables come from data_ptr()).
"""

from typing import Optional

import torch

from .. import _extensions
from . import Bucket, PendingStep, chunk_plan, tables
from .chunk_plan import ChunkPlan

NAME = "cuda"
TRACEABLE = False  # its tables come from data_ptr()

# Elements per block (a multiple of csrc/tables.h's kILP).
CHUNK = 16384

# The ahead-of-time build, the alternative to the build on first use.
_HOW = ("LARGEDET_CUDA_BUILD=1 pip install --no-build-isolation <source checkout> on a machine with nvcc and a CUDA "
        "build of torch, with setuptools, wheel and ninja installed first")  # fmt: skip

_registered = False


def _load() -> None:
    """Load the extension (built ahead of time, or on first use where nvcc and a GPU are), then give its
    ops their fake implementations."""
    global _registered
    _extensions.CUDA.module()
    if _registered:
        return

    @torch.library.register_fake("largedet::pmd_lamb_step_")
    def _pmd_lamb_step_fake(*args) -> None:
        return None

    @torch.library.register_fake("largedet::pmd_lamb_moments_")
    def _pmd_lamb_moments_fake(*args) -> None:
        return None

    @torch.library.register_fake("largedet::pmd_lamb_update_")
    def _pmd_lamb_update_fake(*args) -> None:
        return None

    @torch.library.register_fake("largedet::grad_sumsq")
    def _grad_sumsq_fake(grads, ptrs, numels, chunk_tensor, chunk_index, first_chunk, chunk_count, partials,
                         chunk_size, g_dtype) -> torch.Tensor:  # fmt: skip
        return partials.new_empty(())

    _registered = True


# The ahead-of-time extension now when built (its schemas are then there for tests/cuda_emulator); a build
# on first use waits for the first CUDA tensors.
if _extensions.CUDA.module(build=False) is not None:
    _load()


def unavailable_reason(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA devices, and these parameters are on {device}"
    try:
        _load()
    except _extensions.ExtensionUnavailable as err:
        return f"the CUDA extension is unavailable: {err}. To build it ahead of time instead: {_HOW}"
    return None


class _CudaKernels:
    """chunk_plan.Kernels for the ops of csrc/binding.cpp."""

    @staticmethod
    def takes(param_dtype: torch.dtype, grad_dtype: torch.dtype) -> bool:
        return tables.has_kernels(param_dtype, grad_dtype)

    @staticmethod
    def _args(bucket: Bucket, plan: ChunkPlan, grad_factor, found_inf, partials, first_chunk, chunk_count):
        # No tensor lists: the tables alone, and what they cannot tell the host (NOTE [tensor lists or
        # tables] in csrc/binding.cpp).
        return (
            [], [], [], [], [], [], plan.pointers(bucket), plan.numels, plan.chunk_tensor, plan.chunk_index,
            first_chunk, chunk_count, plan.hyper(bucket), grad_factor, found_inf, partials, plan.t_now, plan.chunk,
            bucket.params[0].dtype, bucket.grads[0].dtype, bucket.exp_avgs[0].dtype, bool(bucket.masters),
        )  # fmt: skip

    def step(self, bucket, plan, grad_factor, found_inf) -> None:
        if plan.sums_between_passes:  # NOTE [two passes]
            self.moments(bucket, plan, grad_factor, found_inf)
            self.update(bucket, plan, found_inf, plan.sums)
            return
        args = self._args(bucket, plan, grad_factor, found_inf, plan.partials, plan.first_chunk, plan.chunk_count)
        torch.ops.largedet.pmd_lamb_step_(*args)

    def moments(self, bucket, plan, grad_factor, found_inf) -> None:
        args = self._args(bucket, plan, grad_factor, found_inf, plan.partials, plan.first_chunk, plan.chunk_count)
        torch.ops.largedet.pmd_lamb_moments_(*args, plan.sums)

    def update(self, bucket, plan, found_inf, sums) -> None:
        # Pass 2 does not read the factor; plan.one stands in for it.
        args = self._args(bucket, plan, plan.one, found_inf, sums, plan.pair_first, plan.pair_count)
        torch.ops.largedet.pmd_lamb_update_(*args)

    def grad_sumsq(self, bucket, plan) -> torch.Tensor:
        return torch.ops.largedet.grad_sumsq(
            [], plan.pointers(bucket), plan.numels, plan.chunk_tensor, plan.chunk_index, plan.first_chunk,
            plan.chunk_count, plan.partials, plan.chunk, bucket.grads[0].dtype,
        )  # fmt: skip


_KERNELS = _CudaKernels()


def grad_sumsq(bucket: Bucket) -> torch.Tensor:
    return chunk_plan.fused_grad_sumsq(bucket, CHUNK, _KERNELS)


def step(bucket: Bucket, grad_factor: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> None:
    chunk_plan.fused_step(bucket, grad_factor, found_inf, CHUNK, _KERNELS)


def begin_step(bucket: Bucket, grad_factor: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> PendingStep:
    return chunk_plan.fused_begin_step(bucket, grad_factor, found_inf, CHUNK, _KERNELS)
