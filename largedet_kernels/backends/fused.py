"""What the fused backends (cpu, cuda, triton) share on the host: a step is their kernels on the tensors they
take and the torch backend on the rest (chunk_plan.split), over the device tables of chunk_plan.ChunkPlan.
A fused backend module names its CHUNK (elements per chunk) and its KERNELS, and takes its ``grad_sumsq``,
``step`` and ``begin_step`` from ``entry_points``; the cpu and cuda backends' KERNELS are both ``OpKernels``,
over the op family of ops.py.
"""

from types import ModuleType
from typing import Callable, Optional, Protocol, Tuple

import torch

from . import Bucket, PendingStep, ops, tables, torch_foreach
from .chunk_plan import ChunkPlan, plan_for, split
from .tables import math_dtype, to_device


class Kernels(Protocol):
    """A fused backend's launches on the kernel part of a bucket and its plan. step and update write each tensor's
    record into bucket.records where it is not None (NOTE [trust-ratio records] in tables.py)."""

    def takes(self, param_dtype: torch.dtype, grad_dtype: torch.dtype) -> bool:
        """Whether the kernels step parameters of param_dtype with gradients of grad_dtype."""

    def step(self, bucket: Bucket, plan: ChunkPlan, grad_factor: torch.Tensor, found_inf: torch.Tensor) -> None:
        """Both passes, with each tensor's sums between them when plan.sums_between_passes (NOTE [two passes])."""

    def moments(self, bucket: Bucket, plan: ChunkPlan, grad_factor: torch.Tensor, found_inf: torch.Tensor) -> None:
        """Pass 1, then each tensor's local Σx², Σu² into plan.sums (NOTE [sharded norms])."""

    def update(self, bucket: Bucket, plan: ChunkPlan, found_inf: torch.Tensor, sums: torch.Tensor) -> None:
        """Pass 2 reading the norms from sums through plan.pair_chunks."""

    def grad_sumsq(self, bucket: Bucket, plan: ChunkPlan) -> torch.Tensor:
        """Σg² over the bucket."""


class OpKernels:
    """Kernels for the op family of ops.py on one device: its table form in eager mode, its tensor-list form
    while torch.compile traces a ``traceable`` backend (NOTE [tensor lists or tables] in ops.py).
    ``reduces_between_passes``: whether a plan's NOTE [two passes] split applies, as it does to blocks that
    sum their tensor's partials; the CPU's passes sum in double within one call."""

    takes = staticmethod(tables.has_kernels)

    def __init__(self, traceable: bool, reduces_between_passes: bool, namespace: str = ops.NAMESPACE) -> None:
        self.traceable, self.reduces_between_passes = traceable, reduces_between_passes
        self.ops = getattr(torch.ops, namespace)

    def _lists(self) -> bool:
        return self.traceable and torch.compiler.is_compiling()

    @staticmethod
    def _tables(bucket: Bucket, plan: ChunkPlan, chunks: torch.Tensor) -> tuple:
        dtypes = (bucket.params[0].dtype, bucket.grads[0].dtype, bucket.exp_avgs[0].dtype, bool(bucket.masters))
        return (plan.pointers(bucket), plan.numels, chunks, plan.workspace, plan.chunk, *dtypes)

    def step(self, bucket, plan, grad_factor, found_inf) -> None:
        if plan.sums_between_passes and self.reduces_between_passes:  # NOTE [two passes]
            self.moments(bucket, plan, grad_factor, found_inf)
            self.update(bucket, plan, found_inf, plan.sums)
        elif self._lists():
            self.ops.step_(bucket.params, bucket.grads, bucket.exp_avgs, bucket.exp_avg_sqs, bucket.steps,
                           bucket.masters, plan.chunks, plan.workspace, plan.chunk, plan.hyper(bucket), grad_factor,
                           found_inf, bucket.records)  # fmt: skip
        else:
            self.ops.table_step_(*self._tables(bucket, plan, plan.chunks), plan.hyper(bucket), grad_factor, found_inf,
                                 bucket.records)  # fmt: skip

    def moments(self, bucket, plan, grad_factor, found_inf) -> None:
        if self._lists():
            self.ops.moments_(bucket.params, bucket.grads, bucket.exp_avgs, bucket.exp_avg_sqs, bucket.steps,
                              bucket.masters, plan.chunks, plan.workspace, plan.chunk, plan.hyper(bucket),
                              grad_factor, found_inf, plan.sums)  # fmt: skip
        else:
            self.ops.table_moments_(*self._tables(bucket, plan, plan.chunks), plan.hyper(bucket), grad_factor,
                                    found_inf, plan.sums)  # fmt: skip

    def update(self, bucket, plan, found_inf, sums) -> None:
        if self._lists():
            self.ops.update_(bucket.params, bucket.exp_avgs, bucket.exp_avg_sqs, bucket.steps, bucket.masters,
                             plan.pair_chunks, plan.workspace, plan.chunk, plan.hyper(bucket), found_inf, sums,
                             bucket.records)  # fmt: skip
        else:
            self.ops.table_update_(*self._tables(bucket, plan, plan.pair_chunks), plan.hyper(bucket), found_inf, sums,
                                   bucket.records)  # fmt: skip

    def grad_sumsq(self, bucket, plan) -> torch.Tensor:
        if self._lists():
            return self.ops.grad_sumsq(bucket.grads, plan.chunks, plan.workspace, plan.chunk)
        return self.ops.table_grad_sumsq(plan.pointers(bucket), plan.numels, plan.chunks, plan.workspace, plan.chunk,
                                         bucket.grads[0].dtype)  # fmt: skip


def _scalars(plan: ChunkPlan, grad_factor, found_inf) -> Tuple[torch.Tensor, torch.Tensor]:
    # The factor in the math dtype: a float64 bucket must not be scaled by a rounded one.
    factor = plan.one if grad_factor is None else grad_factor.to(plan.math_dtype)
    return factor, plan.zero if found_inf is None else found_inf


def _step(bucket: Bucket, grad_factor, found_inf, chunk: int, kernels: Kernels) -> None:
    kernel_part, rest = split(bucket, kernels)
    if rest is not None:
        torch_foreach.step(rest, grad_factor, found_inf)
    if kernel_part.params:
        plan = plan_for(kernel_part, chunk)
        kernels.step(kernel_part, plan, *_scalars(plan, grad_factor, found_inf))


def _begin_step(bucket: Bucket, grad_factor, found_inf, chunk: int, kernels: Kernels) -> PendingStep:
    """Pass 1 and the per-tensor sums, pass 2 left to ``finish``."""
    kernel_part, rest = split(bucket, kernels)
    pending_rest = None if rest is None else torch_foreach.begin_step(rest, grad_factor, found_inf)
    if not kernel_part.params:
        return pending_rest
    plan = plan_for(kernel_part, chunk)
    factor, found_inf = _scalars(plan, grad_factor, found_inf)
    kernels.moments(kernel_part, plan, factor, found_inf)
    kernel_sums = plan.sums.view(-1, 2)

    def finish_kernel_part(sums: torch.Tensor) -> None:
        kernels.update(kernel_part, plan, found_inf, sums.to(plan.math_dtype).contiguous())

    if pending_rest is None:
        return PendingStep(kernel_sums, finish_kernel_part)
    # Sums in bucket order whichever tensors the kernels took: ranks must agree on the layout.
    order = _split_order(bucket)
    n_kernel = len(kernel_part.params)

    def finish(sums: torch.Tensor) -> None:
        in_split_order = sums[order]
        finish_kernel_part(in_split_order[:n_kernel])
        pending_rest.finish(in_split_order[n_kernel:])

    split_sums = torch.cat([kernel_sums, pending_rest.sums.to(kernel_sums.dtype)])
    return PendingStep(torch.empty_like(split_sums).index_copy_(0, order, split_sums), finish)


def _split_order(bucket: Bucket) -> torch.Tensor:
    """Bucket positions of the kernel part's tensors, then of the rest's, as split() made them (a device
    index, kept with the split)."""
    parts = bucket.split
    if parts.order is None:
        parts.order = to_device(parts.kernel_idx + parts.rest_idx, torch.int64, bucket.device)
    return parts.order


def _grad_sumsq(bucket: Bucket, chunk: int, kernels: Kernels) -> torch.Tensor:
    kernel_part, rest = split(bucket, kernels)
    total = torch.zeros((), dtype=math_dtype(bucket.grads[0].dtype), device=bucket.device)
    if kernel_part.params:
        total = kernels.grad_sumsq(kernel_part, plan_for(kernel_part, chunk))
    if rest is not None:
        total = total + torch_foreach.grad_sumsq(rest)
    return total


def entry_points(backend: ModuleType) -> Tuple[Callable, Callable, Callable]:
    """A fused backend module's ``grad_sumsq``, ``step`` and ``begin_step`` (the contract in __init__.py), with
    its CHUNK and KERNELS read at each call."""

    def grad_sumsq(bucket: Bucket) -> torch.Tensor:
        return _grad_sumsq(bucket, backend.CHUNK, backend.KERNELS)

    def step(bucket: Bucket, grad_factor: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> None:
        _step(bucket, grad_factor, found_inf, backend.CHUNK, backend.KERNELS)

    def begin_step(bucket: Bucket, grad_factor: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]):
        return _begin_step(bucket, grad_factor, found_inf, backend.CHUNK, backend.KERNELS)

    return grad_sumsq, step, begin_step
