"""Parameters sharded by FSDP2 (DTensors): their local tensors, their process groups, and the norms
summed over every shard.

NOTE [sharded norms]
    Under FSDP2 (``fully_shard``) a parameter is a DTensor of which each rank holds
    a shard, so the trust ratio's ‖x‖ and ‖u‖ (and the clipping norm ‖g‖) need every
    rank's sums. Backends get the local tensors (``to_local()``; the state stays
    DTensor, so checkpoints see it sharded). Buckets of shards are stepped in two
    halves: pass 1 and each tensor's local Σx², Σu² (``begin_step``), then one
    ``all_reduce`` of all those sums stacked together per process group, then pass 2
    (``finish``). Clipping likewise stacks every bucket's Σg² into one all-reduce. A
    rank with an empty shard still takes part; replicated placements need no
    collective; a mesh sharded along several dimensions takes one per dimension.
"""

from typing import Any, Dict, List, Tuple

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed support has no DTensors to step
    DTensor = ()  # type: ignore[assignment,misc]

# The process groups over which a bucket's tensors are sharded; () when they are whole.
ShardKey = Tuple[Any, ...]


def shard_key(p: torch.Tensor) -> ShardKey:
    """(mesh, sharded mesh dims) of a DTensor parameter; () for whole tensors."""
    if not isinstance(p, DTensor):
        return ()
    if any(pl.is_partial() for pl in p.placements):
        raise ValueError(f"a parameter with a Partial placement has no well-defined value: {p.placements}")
    dims = tuple(d for d, pl in enumerate(p.placements) if pl.is_shard())
    return (p.device_mesh, dims) if dims else ()


def local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor itself, a plain tensor as it is. (``to_local()`` would return a new
    view of it for a parameter each call, at ten times the cost; step() runs under no_grad.)"""
    return t._local_tensor if isinstance(t, DTensor) else t


def check_grad(p: torch.Tensor) -> None:
    """A DTensor parameter's gradient must be sharded as the parameter is."""
    if isinstance(p, DTensor) and not (
        isinstance(p.grad, DTensor) and p.grad.device_mesh == p.device_mesh and p.grad.placements == p.placements
    ):
        got = p.grad.placements if isinstance(p.grad, DTensor) else "a plain tensor"
        raise RuntimeError(
            f"the gradient of a DTensor parameter with placements {p.placements} must be a DTensor "
            f"on the same mesh with the same placements, got {got}"
        )


def _all_reduce(key: ShardKey, tensor: torch.Tensor) -> None:
    """Sum ``tensor`` in place over the ranks that hold shards of the same tensors."""
    mesh, dims = key
    for dim in dims:
        dist.all_reduce(tensor, group=mesh.get_group(dim))


def reduce_per_key(values: List[Tuple[ShardKey, torch.Tensor]]) -> List[torch.Tensor]:
    """Each tensor summed over its key's ranks; one collective per key and mesh dim, in first-seen order."""
    keys: Dict[ShardKey, List[int]] = {}
    for i, (key, _) in enumerate(values):
        if key:
            keys.setdefault(key, []).append(i)
    out = [v for _, v in values]
    for key, members in keys.items():
        parts = [values[i][1] for i in members]
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
        flat = torch.cat([p.reshape(-1).to(dtype) for p in parts])
        _all_reduce(key, flat)
        for i, part in zip(members, flat.split([p.numel() for p in parts])):
            out[i] = part.view_as(values[i][1]).to(values[i][1].dtype)
    return out


def state_like(saved: torch.Tensor, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A saved state tensor as a copy on p's device in ``dtype`` (sharded like p when p is a DTensor)."""
    if isinstance(p, DTensor):
        if isinstance(saved, DTensor):
            if saved.device_mesh == p.device_mesh and saved.placements == p.placements:
                return saved.to(dtype=dtype, copy=True)
            saved = saved.full_tensor()
        # A whole tensor, the same on every rank: each rank keeps its own shard of it.
        return distribute_tensor(saved.to(p.device, dtype), p.device_mesh, p.placements, src_data_rank=None)
    if isinstance(saved, DTensor):
        saved = saved.full_tensor()
    return saved.to(device=p.device, dtype=dtype, copy=True)
