"""The contract between the optimizer and its backends.

The optimizer sorts the parameters that have gradients into buckets, one per
(device, parameter dtype, gradient dtype), across all param groups (detectron2
builds one group per parameter, so grouping by param group would mean one launch
per tensor). A backend module provides:

``grad_sumsq(bucket) -> Tensor``
    Σ g² over the bucket's gradients as a 0-d float tensor on their device
    (float64 for float64 gradients, else float32), for global-norm clipping.

``step(bucket, grad_factor, found_inf) -> None``
    One step for every tensor of the bucket: advance each ``steps`` entry by 1,
    update ``exp_avgs``/``exp_avg_sqs``/``params`` in place, never write ``grads``.
    With ``masters`` the update reads and writes them, and ``params`` gets them rounded
    to nearest; without, a bf16 parameter of a group with ``stochastic_rounding`` is
    rounded stochastically (NOTE [stochastic rounding] in largedet_kernels/rounding.py).
    The moments are stored in their own dtype (float32, or bfloat16 rounded to
    nearest; float64 for float64 parameters), and r is formed from the stored values.
    ``grad_factor`` (0-d tensor or None) multiplies every gradient first (it holds
    the GradScaler's 1/scale and the clipping factor). When ``found_inf`` (0-d
    tensor or None) is non-zero, nothing changes: not params, moments nor steps.
``begin_step(bucket, grad_factor, found_inf) -> PendingStep``
    The same step split around a collective, for tensors that are shards of larger
    ones (NOTE [sharded norms] in largedet_kernels/sharding.py): pass 1 (steps,
    moments) now, and each tensor's local Σx², Σu²; ``finish(sums)`` later runs
    pass 2 with those sums taken over every shard.

    Where ``bucket.records`` is not None, ``step`` and ``finish`` write each tensor's record of a step that is
    not skipped into it (NOTE [trust-ratio records] in largedet_kernels/backends/tables.py).

    No call may synchronise with the host.

A bucket built by the optimizer lives as long as its parameter set (NOTE [step cache] in
largedet_kernels/step_cache.py): only ``grads`` is replaced each step, and the two versions say
what else changed since the last step. What a backend derives from the bucket has a typed field
of its own, dropped with the bucket; device tables worth keeping across rebuilds go in ``kept``.
A bucket built elsewhere (versions None) is checked afresh on every call.

A backend module also names itself (``NAME``, as the dispatcher knows it) and says whether
torch.compile can trace its step (``TRACEABLE``).
"""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch

if TYPE_CHECKING:
    from .chunk_plan import ChunkPlan, Split


@dataclass
class KeptTables:
    """The device tables of one bucket key, kept by the step cache across rebuilds of its buckets."""

    plan: Optional["ChunkPlan"] = None


@dataclass
class Bucket:
    """Tensors of one (device, param dtype, grad dtype) with their param groups."""

    device: torch.device
    params: List[torch.Tensor] = field(default_factory=list)
    grads: List[torch.Tensor] = field(default_factory=list)
    exp_avgs: List[torch.Tensor] = field(default_factory=list)
    exp_avg_sqs: List[torch.Tensor] = field(default_factory=list)
    steps: List[torch.Tensor] = field(default_factory=list)
    # The fp32 master weights of params, or empty: the kernels step them and write params rounded
    # (NOTE [master weights] in largedet_kernels/optimizer.py).
    masters: List[torch.Tensor] = field(default_factory=list)
    # groups[i] is the param group of params[i]: per-tensor hyper-parameters.
    groups: List[Dict[str, Any]] = field(default_factory=list)
    # [n_tensors, len(RECORD_FIELDS)] in the math dtype where the optimizer keeps telemetry, else None: the step
    # writes each tensor's trust-ratio record there (NOTE [trust-ratio records] in tables.py).
    records: Optional[torch.Tensor] = None
    # Lives as long as the optimizer: device tables worth keeping when the bucket is rebuilt.
    kept: KeptTables = field(default_factory=KeptTables)
    # Bumped by the optimizer when an address of the bucket's tensors, or a hyper-parameter
    # of its groups, changed; None when nobody keeps count.
    address_version: Optional[int] = None
    hyper_version: Optional[int] = None
    # Derived from the bucket by the backends, living as long as it: the fused backends' split into
    # kernel and torch parts and the device tables of the kernel part (chunk_plan.py), the torch
    # backend's slices and its hyper-parameters as (hyper_version, device columns, host columns, tensor lrs).
    split: Optional["Split"] = None
    plan: Optional["ChunkPlan"] = None
    slices: Optional[List[Tuple[int, int]]] = None
    constants: Optional[Tuple[Optional[int], Dict[str, torch.Tensor], Dict[str, list], Any]] = None

    def hyper(self, name: str) -> List[Any]:
        """One hyper-parameter for every tensor of the bucket, in order."""
        return [g[name] for g in self.groups]

    def release(self) -> None:
        """Drop this step's gradients, here and in the parts of the split, so that a kept bucket does not keep
        them alive until the next step."""
        self.grads = []
        if self.split is not None and self.split.rest is not None:
            self.split.kernel_part.release()
            self.split.rest.release()


@dataclass
class PendingStep:
    """A step between its passes: local norms known, parameters not yet written."""

    # [n_tensors, 2] in the math dtype, tensors in bucket order: Σx², Σu² of the local tensors.
    sums: torch.Tensor
    # Pass 2, given the same layout of sums reduced over all shards.
    finish: Callable[[torch.Tensor], None]
