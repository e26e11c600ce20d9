"""The ``triton`` backend: host side of the kernels in largedet_kernels/triton_kernels.py.

Per bucket it keeps a plan on the device (NOTE [pointer tables] there): the
chunk table, built once per parameter set; the pointer table, re-uploaded only
when an address changes (a new gradient tensor, say); the hyper-parameter
table, re-uploaded only when a value changes (an lr schedule changes it every
step: one small host-to-device copy from pinned memory). Every per-step scalar
(step, ξ, bias corrections, 1/scale × clip, found_inf) is read by the kernels
from device memory, so a step is two launches and never waits on the host.

On CPU tensors the kernels run under Triton's interpreter (TRITON_INTERPRET=1),
which is how CI tests them.
"""

import math
import os
from typing import Optional, Tuple

import torch
import triton  # noqa: F401  (ImportError here tells the dispatcher Triton is missing)
import triton.language as tl

from .. import triton_kernels as k
from . import Bucket, torch_foreach

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


def _kernel_friendly(p: torch.Tensor, others: Tuple[torch.Tensor, ...]) -> bool:
    """x, g, m, v dense with equal strides: element i is at offset i in all four."""
    dense = p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last))
    return dense and all(t.stride() == p.stride() for t in others)


def _to_device(rows, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.tensor(rows, dtype=dtype)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


class _Plan:
    """Device-side tables for one bucket's parameter set (NOTE [pointer tables])."""

    def __init__(self, bucket: Bucket, math_dtype: torch.dtype) -> None:
        device = bucket.device
        self.numel_key = tuple(p.numel() for p in bucket.params)
        self.chunk = CHUNK
        counts = [max(1, math.ceil(n / CHUNK)) for n in self.numel_key]
        first = [0]
        for c in counts[:-1]:
            first.append(first[-1] + c)
        self.n_chunks = sum(counts)
        self.numels = _to_device(list(self.numel_key), torch.int64, device)
        self.chunk_tensor = _to_device([i for i, c in enumerate(counts) for _ in range(c)], torch.int32, device)
        self.chunk_index = _to_device([j for c in counts for j in range(c)], torch.int32, device)
        self.first_chunk = _to_device(first, torch.int32, device)
        self.chunk_count = _to_device(counts, torch.int32, device)
        self.partials = torch.empty(2 * self.n_chunks, dtype=math_dtype, device=device)
        self.t_now = torch.empty(len(counts), dtype=math_dtype, device=device)
        self.one = torch.ones((), dtype=torch.float32, device=device)
        self.zero = torch.zeros((), dtype=torch.float32, device=device)
        self.address_key: Tuple[int, ...] = ()
        self.hyper_key: Tuple[float, ...] = ()

    def pointers(self, bucket: Bucket) -> torch.Tensor:
        lists = (bucket.params, bucket.grads, bucket.exp_avgs, bucket.exp_avg_sqs, bucket.steps)
        key = tuple(t.data_ptr() for ts in lists for t in ts)
        if key != self.address_key:
            self.address_key = key
            self.ptrs = _to_device(list(key), torch.int64, bucket.device)
            self.aligned = all(a % 16 == 0 for a in key[: 4 * len(bucket.params)])
        return self.ptrs

    def hyper(self, bucket: Bucket, math_dtype: torch.dtype) -> torch.Tensor:
        rows = [
            [
                g["lr"] * g["alpha"], g["betas"][0], g["betas"][1], g["eps"], g["weight_decay"],
                g["cycle_length"] or 0, g["bias_correction"], g["eps_inside_sqrt"], g["grad_averaging"],
                g["adam_w_mode"], g["use_nvlamb"] or g["weight_decay"] != 0,
            ]  # fmt: skip
            for g in bucket.groups
        ]
        key = tuple(float(v) for row in rows for v in row)
        if key != self.hyper_key:
            self.hyper_key = key
            self.table = _to_device(rows, math_dtype, bucket.device)
        return self.table


def _split(bucket: Bucket) -> Tuple[Bucket, Optional[Bucket]]:
    """The bucket's kernel-friendly tensors, and the rest (stepped by the torch backend)."""
    friendly = [
        _kernel_friendly(p, (g, m, v))
        for p, g, m, v in zip(bucket.params, bucket.grads, bucket.exp_avgs, bucket.exp_avg_sqs)
    ]
    if all(friendly):
        return bucket, None
    parts = (Bucket(bucket.device, cache=bucket.cache), Bucket(bucket.device))
    for i, ok in enumerate(friendly):
        part = parts[0] if ok else parts[1]
        for name in ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps", "groups"):
            getattr(part, name).append(getattr(bucket, name)[i])
    return parts[0], parts[1]


def _plan(bucket: Bucket) -> Tuple[_Plan, torch.dtype]:
    math_dtype = torch_foreach.compute_dtype(bucket.params[0].dtype)
    key = tuple(p.numel() for p in bucket.params)
    plan = bucket.cache.get("triton_plan")
    if plan is None or plan.numel_key != key or plan.chunk != CHUNK or plan.partials.dtype != math_dtype:
        plan = bucket.cache["triton_plan"] = _Plan(bucket, math_dtype)
    return plan, math_dtype


def grad_sumsq(bucket: Bucket) -> torch.Tensor:
    kernel_part, rest = _split(bucket)
    total = torch.zeros((), dtype=torch_foreach.compute_dtype(bucket.grads[0].dtype), device=bucket.device)
    if kernel_part.params:
        plan, math_dtype = _plan(kernel_part)
        ptrs = plan.pointers(kernel_part)
        partials = plan.partials[: plan.n_chunks]
        k.grad_sumsq_kernel[(plan.n_chunks,)](
            ptrs, plan.numels, plan.chunk_tensor, plan.chunk_index, partials, len(kernel_part.params),
            G_DTYPE=_TL_DTYPES[kernel_part.grads[0].dtype], MATH=_TL_DTYPES[math_dtype], ALIGNED=plan.aligned,
            CHUNK=CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS,
        )  # fmt: skip
        total = partials.sum()
    if rest is not None:
        total = total + torch_foreach.grad_sumsq(rest)
    return total


def step(bucket: Bucket, grad_factor: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> None:
    kernel_part, rest = _split(bucket)
    if rest is not None:
        torch_foreach.step(rest, grad_factor, found_inf)
    if not kernel_part.params:
        return
    plan, math_dtype = _plan(kernel_part)
    ptrs, hyper = plan.pointers(kernel_part), plan.hyper(kernel_part, math_dtype)
    n = len(kernel_part.params)
    dtypes = dict(
        X_DTYPE=_TL_DTYPES[kernel_part.params[0].dtype], G_DTYPE=_TL_DTYPES[kernel_part.grads[0].dtype],
        MATH=_TL_DTYPES[math_dtype], ALIGNED=plan.aligned, CHUNK=CHUNK, BLOCK=BLOCK,
    )  # fmt: skip
    found_inf = plan.zero if found_inf is None else found_inf
    k.pmd_lamb_moments_kernel[(plan.n_chunks,)](
        ptrs, plan.numels, plan.chunk_tensor, plan.chunk_index, hyper,
        plan.one if grad_factor is None else grad_factor, found_inf, plan.partials, plan.t_now, n,
        **dtypes, num_warps=NUM_WARPS,
    )  # fmt: skip
    k.pmd_lamb_update_kernel[(plan.n_chunks,)](
        ptrs, plan.numels, plan.chunk_tensor, plan.chunk_index, plan.first_chunk, plan.chunk_count, hyper,
        found_inf, plan.partials, plan.t_now, n, **dtypes, REDUCE_BLOCK=REDUCE_BLOCK, num_warps=NUM_WARPS,
    )  # fmt: skip

