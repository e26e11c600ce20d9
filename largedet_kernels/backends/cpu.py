"""The ``cpu`` backend: the C++ kernels of csrc/cpu/, loaded by largedet_kernels/_extensions.py.

For optimizer offload (FSDP2's CPUOffloadPolicy), where step() runs on the host over
the whole model. Two passes as on the GPU, vectorised and parallel over chunks of a
fixed size, so results do not depend on the thread count (NOTE [cpu passes] in
csrc/cpu/pmd_lamb_cpu.cpp). The hyper-parameter table is chunk_plan.py's, the same
columns the GPU kernels read.

The kernels are compiled once per CPU ISA; ``ISA`` is the one this process loads (its
extension is loaded, or built, on the backend's first use).
"""

from typing import Optional

import torch

from .. import _extensions
from . import Bucket, PendingStep, chunk_plan, tables
from .chunk_plan import ChunkPlan

NAME = "cpu"
TRACEABLE = True  # its tensor-list ops under torch.compile (NOTE [cpu pointer tables])

# The ahead-of-time build, the alternative to the build on first use.
HOW_TO_BUILD = ("pip install --no-build-isolation <source checkout>, with torch, setuptools, wheel, ninja and a C++ "
                "compiler installed first (LARGEDET_CPU_BUILD=1 fails loudly)")  # fmt: skip

# Elements per chunk of csrc/cpu/pmd_lamb_cpu.cpp's kChunk; here it only sizes the plan's tables.
CHUNK = 1 << 16

# generic, avx2 or avx512: LARGEDET_CPU_ISA, else the best this CPU runs.
ISA = _extensions.cpu_isa()

_registered = False


def _load() -> None:
    """Load (or build) the extension, then give its ops the fake implementations torch.compile traces
    the tensor-list form with (NOTE [cpu pointer tables])."""
    global _registered
    _extensions.CPU.module()
    if _registered:
        return

    @torch.library.register_fake("largedet_cpu::step_")
    def _step_fake(*args) -> None:
        return None

    @torch.library.register_fake("largedet_cpu::moments_")
    def _moments_fake(*args) -> None:
        return None

    @torch.library.register_fake("largedet_cpu::update_")
    def _update_fake(*args) -> None:
        return None

    @torch.library.register_fake("largedet_cpu::grad_sumsq")
    def _grad_sumsq_fake(grads) -> torch.Tensor:
        return grads[0].new_empty((), dtype=tables.math_dtype(grads[0].dtype))

    _registered = True


def unavailable_reason(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, and these parameters are on {device}"
    try:
        _load()
    except _extensions.ExtensionUnavailable as err:
        return f"the CPU extension is unavailable: {err}. To build it ahead of time instead: {HOW_TO_BUILD}"
    return None


class _CpuKernels:
    """chunk_plan.Kernels for the ops of csrc/cpu/pmd_lamb_cpu.cpp: their table form in eager mode,
    their tensor-list form, which declares what it writes, under torch.compile (NOTE [cpu pointer tables])."""

    @staticmethod
    def takes(param_dtype: torch.dtype, grad_dtype: torch.dtype) -> bool:
        return tables.has_kernels(param_dtype, grad_dtype)

    def step(self, bucket: Bucket, plan: ChunkPlan, grad_factor, found_inf) -> None:
        if torch.compiler.is_compiling():
            torch.ops.largedet_cpu.step_(bucket.params, bucket.grads, bucket.exp_avgs, bucket.exp_avg_sqs,
                                         bucket.steps, bucket.masters, plan.hyper(bucket), grad_factor,
                                         found_inf)  # fmt: skip
        else:
            torch.ops.largedet_cpu.table_step_(plan.pointers(bucket), plan.numels, plan.hyper(bucket),
                                               bucket.params[0].dtype, bucket.grads[0].dtype,
                                               bucket.exp_avgs[0].dtype, grad_factor, found_inf)  # fmt: skip

    def moments(self, bucket: Bucket, plan: ChunkPlan, grad_factor, found_inf) -> None:
        if torch.compiler.is_compiling():
            torch.ops.largedet_cpu.moments_(bucket.params, bucket.grads, bucket.exp_avgs, bucket.exp_avg_sqs,
                                            bucket.steps, bucket.masters, plan.hyper(bucket), grad_factor, found_inf,
                                            plan.sums)  # fmt: skip
        else:
            torch.ops.largedet_cpu.table_moments_(plan.pointers(bucket), plan.numels, plan.hyper(bucket),
                                                  bucket.params[0].dtype, bucket.grads[0].dtype,
                                                  bucket.exp_avgs[0].dtype, grad_factor, found_inf,
                                                  plan.sums)  # fmt: skip

    def update(self, bucket: Bucket, plan: ChunkPlan, found_inf, sums: torch.Tensor) -> None:
        if torch.compiler.is_compiling():
            torch.ops.largedet_cpu.update_(bucket.params, bucket.exp_avgs, bucket.exp_avg_sqs, bucket.steps,
                                           bucket.masters, plan.hyper(bucket), found_inf, sums)  # fmt: skip
        else:
            torch.ops.largedet_cpu.table_update_(plan.pointers(bucket), plan.numels, plan.hyper(bucket),
                                                 bucket.params[0].dtype, bucket.exp_avgs[0].dtype, found_inf,
                                                 sums)  # fmt: skip

    def grad_sumsq(self, bucket: Bucket, plan: ChunkPlan) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.largedet_cpu.grad_sumsq(bucket.grads)
        return torch.ops.largedet_cpu.table_grad_sumsq(plan.pointers(bucket), plan.numels, bucket.grads[0].dtype)


_KERNELS = _CpuKernels()


def grad_sumsq(bucket: Bucket) -> torch.Tensor:
    return chunk_plan.fused_grad_sumsq(bucket, CHUNK, _KERNELS)


def step(bucket: Bucket, grad_factor: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> None:
    chunk_plan.fused_step(bucket, grad_factor, found_inf, CHUNK, _KERNELS)


def begin_step(bucket: Bucket, grad_factor: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> PendingStep:
    return chunk_plan.fused_begin_step(bucket, grad_factor, found_inf, CHUNK, _KERNELS)
