"""The device tables of the fused backends (fused.py), and which tensors they take.

NOTE [pointer tables]
    A fused step addresses a bucket's tensors through tables kept on the device:
    ``ptrs[6, n]`` (int64 addresses of x, g, m, v, step and the fp32 master of tensor i,
    0 for a bucket without masters: NOTE [master weights] in optimizer.py), ``numels[n]``
    (int64: tensors may exceed 2**31 elements), and one entry per chunk of CHUNK
    elements: ``chunk_tensor``/``chunk_index``; ``first_chunk``/``chunk_count``
    per tensor let pass 2 find a tensor's partial norms (the four packed into one
    tensor: NOTE [packed chunk tables] in tables.py). Each GPU program/block
    handles one chunk, so one launch covers any number of tensors, with no
    kernel-argument size limit and no launch batching; it tests its own tensor's
    addresses for the 128-bit path (NOTE [vector and scalar paths]).

    The chunk tables depend only on the tensors' sizes and are built once. The
    pointer table is re-uploaded when an address changes (a new gradient
    tensor), the hyper-parameter table when a value changes (an lr schedule):
    each a small copy from pinned memory that does not block the host.
"""

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch

from . import Bucket
from .tables import HYPER_DTYPE, POINTER_ROWS, TensorLrs, hyper_rows, hyper_table, math_dtype, to_device

if TYPE_CHECKING:
    from .fused import Kernels


def chunk_layout(numels: List[int], chunk: int) -> Tuple[List[int], List[int], List[int], List[int]]:
    """The parts of the chunk table, in CHUNK_TABLE_PARTS order; an empty tensor still gets one chunk."""
    counts = [max(1, math.ceil(n / chunk)) for n in numels]
    first = [0, *itertools.accumulate(counts[:-1])]
    chunk_tensor = [i for i, c in enumerate(counts) for _ in range(c)]
    chunk_index = [j for c in counts for j in range(c)]
    return chunk_tensor, chunk_index, first, counts


def _refuse_during_capture(what: str) -> None:
    """NOTE [pointer tables] under CUDA graphs: a replay runs no Python, so the tables hold
    what they held at capture; an upload captured from a temporary host buffer would
    replay from freed memory."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"{what} changed while a CUDA graph was being captured: take one eager step after the "
            "change, then capture; a captured step replays with the hyper-parameters and tensors of its capture"
        )


class ChunkPlan:
    """The device tables of one bucket's parameter set (NOTE [pointer tables])."""

    # Each block of pass 2 sums every partial of its tensor, n² reads for a tensor of n chunks:
    # up to this n they cost less than the launch of tensor_sums_kernel that would make pass 2
    # read one pair per tensor (NOTE [two passes]). Faster R-CNN's largest tensor has 784 chunks.
    MAX_CHUNKS_SUMMED_IN_PASS_2 = 1024

    def __init__(self, bucket: Bucket, chunk: int, math_dtype: torch.dtype) -> None:
        device = bucket.device
        self.chunk, self.math_dtype = chunk, math_dtype
        self.numel_key = tuple(p.numel() for p in bucket.params)
        chunk_tensor, chunk_index, first, counts = chunk_layout(list(self.numel_key), chunk)
        self.n_tensors, self.n_chunks = len(counts), len(chunk_tensor)
        self.numels = to_device(list(self.numel_key), torch.int64, device)
        # NOTE [packed chunk tables] in tables.py; the parts are views for the Triton kernels.
        self.chunks = to_device(chunk_tensor + chunk_index + first + counts, torch.int32, device)
        self.chunk_tensor, self.chunk_index, self.first_chunk, self.chunk_count = self.chunks.split(
            [self.n_chunks, self.n_chunks, self.n_tensors, self.n_tensors])
        self.workspace = torch.empty(2 * self.n_chunks + self.n_tensors, dtype=math_dtype, device=device)
        self.partials, self.t_now = self.workspace.split([2 * self.n_chunks, self.n_tensors])
        self.one = torch.ones((), dtype=math_dtype, device=device)
        self.zero = torch.zeros((), dtype=torch.float32, device=device)
        # NOTE [sharded norms]: each tensor's local Σx², Σu², and the chunk table under which pass 2 reads
        # one reduced pair per tensor instead of partials.
        self.sums = torch.empty(2 * self.n_tensors, dtype=math_dtype, device=device)
        self.pair_chunks = to_device(chunk_tensor + chunk_index + list(range(self.n_tensors)) + [1] * self.n_tensors,
                                     torch.int32, device)  # fmt: skip
        self.pair_first, self.pair_count = self.pair_chunks[2 * self.n_chunks:].split(self.n_tensors)
        # NOTE [two passes]: a step then reduces each tensor into sums between its passes.
        self.sums_between_passes = max(counts) > self.MAX_CHUNKS_SUMMED_IN_PASS_2
        # What the pointer and hyper tables were built from (NOTE [step cache] in step_cache.py).
        self.address_key: Tuple[int, ...] = ()
        self.hyper_key: Tuple[float, ...] = ()
        self.lrs: Optional[TensorLrs] = None
        self.address_version: Optional[int] = None
        self.hyper_version: Optional[int] = None

    def fits(self, bucket: Bucket, chunk: int, math_dtype: torch.dtype) -> bool:
        key = tuple(p.numel() for p in bucket.params)
        return key == self.numel_key and chunk == self.chunk and math_dtype == self.math_dtype

    def pointers(self, bucket: Bucket) -> torch.Tensor:
        if bucket.address_version is not None and bucket.address_version == self.address_version:
            return self.ptrs
        self.address_version = bucket.address_version
        rows = dict(x=bucket.params, g=bucket.grads, m=bucket.exp_avgs, v=bucket.exp_avg_sqs, step=bucket.steps,
                    master=bucket.masters)  # fmt: skip
        key = tuple(t.data_ptr() for row in POINTER_ROWS for t in rows[row])
        if not bucket.masters:  # the master row holds 0 (NOTE [master weights] in optimizer.py)
            key += (0,) * len(bucket.params)
        if key != self.address_key:
            _refuse_during_capture("a tensor's address (a new gradient tensor?)")
            self.address_key = key
            self.ptrs = to_device(list(key), torch.int64, bucket.device)
        return self.ptrs

    def hyper(self, bucket: Bucket) -> torch.Tensor:
        if bucket.hyper_version is None or bucket.hyper_version != self.hyper_version:
            self.hyper_version = bucket.hyper_version
            rows, which = hyper_rows(bucket.groups)
            self.lrs = TensorLrs.of(bucket.groups, bucket.device, HYPER_DTYPE)
            key = (*(float(v) for row in rows for v in row), *which)
            if key != self.hyper_key:
                _refuse_during_capture("a hyper-parameter (lr?)")
                self.hyper_key = key
                self.table = hyper_table(rows, which, HYPER_DTYPE, bucket.device)
        return self.table if self.lrs is None else self.lrs.applied(self.table)  # NOTE [tensor lr]


def kernel_friendly(p: torch.Tensor, others: Tuple[torch.Tensor, ...]) -> bool:
    """x, g, m, v (and the master) dense with equal strides: element i is at offset i in all of them."""
    dense = p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last))
    return dense and all(t.stride() == p.stride() for t in others)


@dataclass
class Split:
    """A bucket's tensors that its fused kernels take, and the rest, with their positions in the bucket."""

    kernel_part: Bucket
    rest: Optional[Bucket]
    kernel_idx: List[int]
    rest_idx: List[int]
    # Bucket positions of the kernel part's tensors, then of the rest's: a device index, made on first use.
    order: Optional[torch.Tensor] = None


def split(bucket: Bucket, kernels: "Kernels") -> Tuple[Bucket, Optional[Bucket]]:
    """The bucket's tensors that the kernels take, and the rest, which the torch backend steps. This is the one
    place that decides it: by the dtypes the kernels instantiate (``kernels.takes``), and by layout
    (kernel_friendly).

    Worked out once per optimizer-built bucket, whose layouts the optimizer watches; each call
    only hands the parts this step's gradients and versions.
    """
    parts = bucket.split if bucket.address_version is not None else None
    if parts is None:
        if not kernels.takes(bucket.params[0].dtype, bucket.grads[0].dtype):
            friendly = [False] * len(bucket.params)
        else:
            masters = bucket.masters or [None] * len(bucket.params)
            friendly = [
                kernel_friendly(p, (g, m, v) if master is None else (g, m, v, master))
                for p, g, m, v, master in zip(bucket.params, bucket.grads, bucket.exp_avgs, bucket.exp_avg_sqs,
                                              masters)  # fmt: skip
            ]
        if all(friendly):
            parts = Split(bucket, None, [], [])
        else:
            kernel_idx = [i for i, ok in enumerate(friendly) if ok]
            rest_idx = [i for i, ok in enumerate(friendly) if not ok]
            kernel_part, rest = Bucket(bucket.device, kept=bucket.kept), Bucket(bucket.device)
            for part, idx in ((kernel_part, kernel_idx), (rest, rest_idx)):
                for name in ("params", "exp_avgs", "exp_avg_sqs", "steps", "groups", "masters"):
                    setattr(part, name, [getattr(bucket, name)[i] for i in idx] if getattr(bucket, name) else [])
                if bucket.records is not None:  # each part records its own; telemetry.py puts them in bucket order
                    part.records = bucket.records.new_zeros(len(idx), bucket.records.shape[1])
            parts = Split(kernel_part, rest, kernel_idx, rest_idx)
        bucket.split = parts
    if parts.rest is None:
        return bucket, None
    for part, idx in ((parts.kernel_part, parts.kernel_idx), (parts.rest, parts.rest_idx)):
        part.grads = [bucket.grads[i] for i in idx]
        part.address_version, part.hyper_version = bucket.address_version, bucket.hyper_version
    return parts.kernel_part, parts.rest


def plan_for(bucket: Bucket, chunk: int) -> ChunkPlan:
    """The bucket's device tables: its own while it lives, else those kept for its key when they fit."""
    plan = bucket.plan if bucket.address_version is not None else None
    if plan is not None:
        return plan
    dtype = math_dtype(bucket.params[0].dtype)
    plan = bucket.kept.plan
    if plan is None or not plan.fits(bucket, chunk, dtype):
        plan = bucket.kept.plan = ChunkPlan(bucket, chunk, dtype)
    bucket.plan = plan
    return plan
