"""The ``triton`` backend: host side of the kernels in largedet_kernels/triton_kernels.py.

The device tables are chunk_plan.py's (NOTE [pointer tables]). Every per-step
scalar (step, ξ, bias corrections, 1/scale × clip, found_inf) is read by the
kernels from device memory, so a step is two launches (three for a plan that reduces
between its passes: NOTE [two passes]) and never waits on the host.

On CPU tensors the kernels run under Triton's interpreter (TRITON_INTERPRET=1),
which is how CI tests them.
"""

import contextlib
import os
import sys
from typing import Any, Dict, Optional

import torch
import triton  # noqa: F401  (ImportError here tells the dispatcher Triton is missing)
import triton.language as tl

from .. import triton_kernels as k
from . import Bucket, fused
from .chunk_plan import ChunkPlan

NAME = "triton"
TRACEABLE = False  # its tables come from data_ptr()

# Elements per program and per loop iteration. 16 KiB-element chunks keep the
# grid in the thousands for a detection model; 1024-element tiles give each of
# 128 threads 8 elements: two 128-bit loads of fp32, one of bf16/fp16.
CHUNK = 16384
BLOCK = 1024
REDUCE_BLOCK = 64
NUM_WARPS = 4

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
              torch.float64: tl.float64}  # fmt: skip


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(device: torch.device) -> Optional[str]:
    if device.type == "cuda" and not interpreted():
        return None
    if device.type == "cpu" and interpreted():
        return None
    return (
        f"the triton backend runs on CUDA devices (and on CPU tensors under TRITON_INTERPRET=1), "
        f"and these parameters are on {device}"
    )


def _on(device: torch.device):
    """Triton launches on the current device and stream: make them the bucket's."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _stored_dtypes(bucket: Bucket, plan: ChunkPlan) -> Dict[str, Any]:
    """What both passes specialise on beside the gradient dtype: how x and the moments are stored, the math, and
    whether x is an fp32 master (NOTE [master weights] in largedet_kernels/optimizer.py)."""
    return dict(X_DTYPE=_TL_DTYPES[bucket.params[0].dtype], M_DTYPE=_TL_DTYPES[bucket.exp_avgs[0].dtype],
                MATH=_TL_DTYPES[plan.math_dtype], HAS_MASTER=bool(bucket.masters))  # fmt: skip


class _TritonKernels:
    """fused.Kernels for the kernels of triton_kernels.py."""

    @staticmethod
    def takes(param_dtype: torch.dtype, grad_dtype: torch.dtype) -> bool:
        return True  # Triton compiles every pair

    def _moments(self, bucket, plan, grad_factor, found_inf) -> None:
        k.pmd_lamb_moments_kernel[(plan.n_chunks,)](
            plan.pointers(bucket), plan.numels, plan.chunk_tensor, plan.chunk_index, plan.hyper(bucket), grad_factor,
            found_inf, plan.partials, plan.t_now, plan.n_tensors, G_DTYPE=_TL_DTYPES[bucket.grads[0].dtype],
            CHUNK=plan.chunk, BLOCK=BLOCK, num_warps=NUM_WARPS, **_stored_dtypes(bucket, plan),
        )  # fmt: skip

    def _update(self, bucket, plan, found_inf, partials, first_chunk, chunk_count) -> None:
        k.pmd_lamb_update_kernel[(plan.n_chunks,)](
            plan.pointers(bucket), plan.numels, plan.chunk_tensor, plan.chunk_index, first_chunk, chunk_count,
            plan.hyper(bucket), found_inf, partials, plan.t_now, bucket.records, plan.n_tensors, CHUNK=plan.chunk,
            BLOCK=BLOCK, REDUCE_BLOCK=REDUCE_BLOCK, RECORD=bucket.records is not None, num_warps=NUM_WARPS,
            **_stored_dtypes(bucket, plan),
        )  # fmt: skip

    def step(self, bucket, plan, grad_factor, found_inf) -> None:
        if plan.sums_between_passes:  # NOTE [two passes]
            self.moments(bucket, plan, grad_factor, found_inf)
            self.update(bucket, plan, found_inf, plan.sums)
            return
        with _on(bucket.device):
            self._moments(bucket, plan, grad_factor, found_inf)
            self._update(bucket, plan, found_inf, plan.partials, plan.first_chunk, plan.chunk_count)

    def moments(self, bucket, plan, grad_factor, found_inf) -> None:
        with _on(bucket.device):
            self._moments(bucket, plan, grad_factor, found_inf)
            # As many warps as pass 2, whose inline sum of the partials must reduce in this order.
            k.tensor_sums_kernel[(plan.n_tensors,)](
                plan.partials, plan.first_chunk, plan.chunk_count, plan.sums, MATH=_TL_DTYPES[plan.math_dtype],
                REDUCE_BLOCK=REDUCE_BLOCK, num_warps=NUM_WARPS,
            )  # fmt: skip

    def update(self, bucket, plan, found_inf, sums) -> None:
        with _on(bucket.device):
            self._update(bucket, plan, found_inf, sums, plan.pair_first, plan.pair_count)

    def grad_sumsq(self, bucket, plan) -> torch.Tensor:
        partials = plan.partials[: plan.n_chunks]
        with _on(bucket.device):
            k.grad_sumsq_kernel[(plan.n_chunks,)](
                plan.pointers(bucket), plan.numels, plan.chunk_tensor, plan.chunk_index, partials, plan.n_tensors,
                G_DTYPE=_TL_DTYPES[bucket.grads[0].dtype], MATH=_TL_DTYPES[plan.math_dtype], CHUNK=plan.chunk,
                BLOCK=BLOCK, num_warps=NUM_WARPS,
            )  # fmt: skip
        return partials.sum()


KERNELS = _TritonKernels()
grad_sumsq, step, begin_step = fused.entry_points(sys.modules[__name__])
