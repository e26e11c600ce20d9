"""PMDLAMB and LAMB: the ``torch.optim.Optimizer`` front end of every backend.

This file owns what is common to all backends: argument checks, optimizer
state, sorting tensors into (device, dtype) buckets across param groups,
GradScaler's ``grad_scale``/``found_inf``, and global gradient-norm clipping.
The update itself happens in a backend chosen by :mod:`largedet_kernels.dispatch`.

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

import numbers
from itertools import chain
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from . import dispatch
from .backends import Bucket
from .backends.torch_foreach import compute_dtype

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed support has no DTensors to step
    DTensor = ()  # type: ignore[assignment,misc]

# The process groups over which a bucket's tensors are sharded; () when they are whole.
ShardKey = Tuple[Any, ...]


def _shard_key(p: torch.Tensor) -> ShardKey:
    """(mesh, sharded mesh dims) of a DTensor parameter; () for whole tensors (NOTE [sharded norms])."""
    if not isinstance(p, DTensor):
        return ()
    if any(pl.is_partial() for pl in p.placements):
        raise ValueError(f"a parameter with a Partial placement has no well-defined value: {p.placements}")
    dims = tuple(d for d, pl in enumerate(p.placements) if pl.is_shard())
    return (p.device_mesh, dims) if dims else ()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _all_reduce(key: ShardKey, tensor: torch.Tensor) -> None:
    """Sum ``tensor`` in place over the ranks that hold shards of the same tensors."""
    mesh, dims = key
    for dim in dims:
        dist.all_reduce(tensor, group=mesh.get_group(dim))


def _reduce_per_key(values: List[Tuple[ShardKey, torch.Tensor]]) -> List[torch.Tensor]:
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


def _check_hyper(group: Dict[str, Any]) -> None:
    """ValueError naming the argument for every out-of-range hyper-parameter."""
    lr, eps, wd, alpha = group["lr"], group["eps"], group["weight_decay"], group["alpha"]
    if not isinstance(lr, numbers.Real) or lr < 0:
        raise ValueError(f"Invalid lr: {lr!r} (must be a number >= 0)")
    if not isinstance(eps, numbers.Real) or eps < 0:
        raise ValueError(f"Invalid eps: {eps!r} (must be >= 0)")
    betas = group["betas"]
    if len(betas) != 2 or not all(isinstance(b, numbers.Real) and 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"Invalid betas: {betas!r} (each must be in [0, 1))")
    if not isinstance(wd, numbers.Real) or wd < 0:
        raise ValueError(f"Invalid weight_decay: {wd!r} (must be >= 0)")
    if not isinstance(alpha, numbers.Real) or not alpha > 0:
        raise ValueError(f"Invalid alpha: {alpha!r} (must be > 0)")
    cycle = group["cycle_length"]
    if cycle is not None and (isinstance(cycle, bool) or not isinstance(cycle, numbers.Integral) or cycle < 1):
        raise ValueError(f"Invalid cycle_length: {cycle!r} (must be an integer >= 1, or None for no decay)")
    max_norm = group["max_grad_norm"]
    if max_norm is not None and (not isinstance(max_norm, numbers.Real) or not max_norm > 0):
        raise ValueError(f"Invalid max_grad_norm: {max_norm!r} (must be > 0, or None to disable clipping)")


def _moment_like(saved: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A saved moment as a copy in p's device, math dtype and layout (sharded like p when p is a DTensor)."""
    dtype = compute_dtype(p.dtype)
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


class _LambFamily(Optimizer):
    """PMD-LAMB's update with every option; PMDLAMB and LAMB differ only in defaults."""

    # GradScaler hands us grad_scale/found_inf instead of unscaling and syncing itself.
    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable, defaults: Dict[str, Any], backend: str) -> None:
        dispatch.check_backend_name(backend)
        self.backend = backend
        self._backend_of_device: Dict[torch.device, str] = {}
        self._bucket_caches: Dict[Tuple[torch.device, torch.dtype, torch.dtype], Dict[str, Any]] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyper(group)
        if group["max_grad_norm"] != self.defaults["max_grad_norm"]:
            raise ValueError(
                "max_grad_norm clips the global gradient norm over all param groups; "
                "set it on the optimizer, not per param group"
            )
        if len({id(p) for p in group["params"]}) != len(group["params"]):
            raise ValueError("a parameter appears twice in one param group: it would be stepped twice")
        for p in group["params"]:
            if p.is_complex():
                raise ValueError(f"complex parameters are not supported (got a {p.dtype} parameter)")
            if not p.is_floating_point():
                raise ValueError(f"parameters must be floating point (got a {p.dtype} parameter)")
            if self.backend != "auto":
                dispatch.resolve(self.backend, p.device)  # raises now, not at the first step

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load param groups and state; state goes to each parameter's device.

        torch's default would cast the moments to the parameter dtype (bf16 moments
        for bf16 parameters) and alias the source tensors; here the moments keep
        their compute dtype, ``step`` stays a float32 tensor, and everything is copied.
        """
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(ids, params):
            if pid not in saved:
                continue
            s = saved[pid]
            state = {
                "step": torch.as_tensor(s["step"]).to(device=p.device, dtype=torch.float32, copy=True),
                "exp_avg": _moment_like(s["exp_avg"], p),
                "exp_avg_sq": _moment_like(s["exp_avg_sq"], p),
            }
            for key in ("exp_avg", "exp_avg_sq"):
                if state[key].shape != p.shape:
                    raise ValueError(
                        f"loaded state {key!r} has shape {tuple(state[key].shape)} "
                        f"but its parameter has shape {tuple(p.shape)}"
                    )
            self.state[p] = state

    def _backend(self, device: torch.device) -> str:
        if device not in self._backend_of_device:
            self._backend_of_device[device] = dispatch.resolve(self.backend, device)
        return self._backend_of_device[device]

    def _buckets(self) -> List[Tuple[Bucket, str, ShardKey]]:
        """(bucket, backend, shard key) per (device, param dtype, grad dtype, shard key), state initialised."""
        with_grad = [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]
        for p, _ in with_grad:  # every check before anything is modified
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if isinstance(p, DTensor) and not (
                isinstance(p.grad, DTensor)
                and p.grad.device_mesh == p.device_mesh
                and p.grad.placements == p.placements
            ):
                got = p.grad.placements if isinstance(p.grad, DTensor) else "a plain tensor"
                raise RuntimeError(
                    f"the gradient of a DTensor parameter with placements {p.placements} must be a DTensor "
                    f"on the same mesh with the same placements, got {got}"
                )
        buckets: Dict[Tuple[Any, ...], Bucket] = {}
        for p, group in with_grad:
            state = self.state[p]
            if not state:
                moment = {"dtype": compute_dtype(p.dtype), "memory_format": torch.preserve_format}
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, **moment)
                state["exp_avg_sq"] = torch.zeros_like(p, **moment)
            x, grad = _local(p), _local(p.grad)
            key = (x.device, x.dtype, grad.dtype, _shard_key(p))
            if key not in buckets:
                buckets[key] = Bucket(x.device, cache=self._bucket_caches.setdefault(key, {}))
            b = buckets[key]
            b.params.append(x)
            b.grads.append(grad)
            b.exp_avgs.append(_local(state["exp_avg"]))
            b.exp_avg_sqs.append(_local(state["exp_avg_sq"]))
            b.steps.append(state["step"])
            b.groups.append(group)
        return [(b, self._backend(b.device), key[3]) for key, b in buckets.items()]

    def _grad_factor(self, buckets: List[Tuple[Bucket, str, ShardKey]]) -> Optional[torch.Tensor]:
        """What every gradient is multiplied by: GradScaler's 1/scale × the clip factor."""
        grad_scale: Optional[torch.Tensor] = getattr(self, "grad_scale", None)
        inv_scale = None if grad_scale is None else grad_scale.double().reciprocal().float()
        max_norm = self.defaults["max_grad_norm"]
        if max_norm is None:
            return inv_scale
        device = buckets[0][0].device
        local = [(key, dispatch.backend_module(name).grad_sumsq(b)) for b, name, key in buckets]
        sumsq = _reduce_per_key(local)  # NOTE [sharded norms]
        dtype = torch.float64 if any(s.dtype == torch.float64 for s in sumsq) else torch.float32
        norm = torch.stack([s.to(device, dtype) for s in sumsq]).sum().sqrt()
        if inv_scale is not None:
            norm = norm * inv_scale.to(device)
        clip = torch.where(norm > max_norm, max_norm / norm, 1.0)
        return clip if inv_scale is None else clip * inv_scale.to(device)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets = self._buckets()
        if not buckets:
            return loss
        factor = self._grad_factor(buckets)
        found_inf: Optional[torch.Tensor] = getattr(self, "found_inf", None)
        pending = []
        for bucket, name, key in buckets:
            backend = dispatch.backend_module(name)
            args = (
                bucket,
                None if factor is None else factor.to(bucket.device),
                None if found_inf is None else found_inf.to(bucket.device),
            )
            if key:
                pending.append((key, backend.begin_step(*args)))
            else:
                backend.step(*args)
        if pending:  # NOTE [sharded norms]
            sums = _reduce_per_key([(key, p.sums) for key, p in pending])
            for (_, p), global_sums in zip(pending, sums):
                p.finish(global_sums)
        return loss


class PMDLAMB(_LambFamily):
    r"""Periodical Moments Decay LAMB (LargeDet, Algorithm 1).

    Per parameter tensor x with gradient g at step t (from 1):
    ξ = cos(π/2·(t mod T)/T), m = ξβ1·m + (1−β1)·g, v = ξβ2·v + (1−β2)·g²,
    r = m/√(v+ε), u = r + λx, x ← x − η·α·(‖x‖/‖u‖)·u.

    Args:
        params: parameters or param groups; every hyper-parameter below except
            ``max_grad_norm`` and ``backend`` can be set per group.
        lr: η. betas: (β1, β2). eps: ε. weight_decay: λ (decoupled).
        alpha: α, the trust-ratio scale (0.012 in the paper).
        cycle_length: T, the ξ cycle in steps; None gives ξ ≡ 1 (plain LAMB moments).
        bias_correction: divide m, v by (1−β1^t), (1−β2^t) before r.
        eps_inside_sqrt: r = m/√(v+ε) (True, the paper) or m/(√v+ε).
        grad_averaging: weight g by (1−β1) in m (True) or by 1.
        max_grad_norm: clip the global gradient norm over all groups to this
            before the moments; None disables clipping.
        backend: ``"auto" | "cuda" | "triton" | "torch"``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 5e-4,
        alpha: float = 0.012,
        cycle_length: Optional[int] = 200,
        bias_correction: bool = False,
        eps_inside_sqrt: bool = True,
        grad_averaging: bool = True,
        max_grad_norm: Optional[float] = None,
        backend: str = "auto",
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha=alpha,
            cycle_length=cycle_length, bias_correction=bias_correction,
            eps_inside_sqrt=eps_inside_sqrt, grad_averaging=grad_averaging,
            max_grad_norm=max_grad_norm, adam_w_mode=True, use_nvlamb=True,
        )  # fmt: skip
        super().__init__(params, defaults, backend)


class LAMB(_LambFamily):
    """LAMB with apex ``FusedLAMB``'s constructor, defaults and update.

    It is PMD-LAMB with ξ ≡ 1, α = 1, ε outside the square root and bias
    correction on; ``adam_w_mode=False`` adds λx to the gradient (L2) instead of
    the update; ``use_nvlamb=False`` applies no trust ratio to groups with
    weight_decay 0. Differences from apex, all intentional: ``max_grad_norm=None``
    disables clipping (apex's 0 zeroes every gradient; here 0 is an error),
    gradients are never overwritten (apex writes its update into them), and
    ``max_grad_norm`` cannot differ per param group (apex reads only the default).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        amsgrad: bool = False,
        adam_w_mode: bool = True,
        grad_averaging: bool = True,
        set_grad_none: bool = True,
        max_grad_norm: Optional[float] = 1.0,
        use_nvlamb: bool = False,
        backend: str = "auto",
    ) -> None:
        if amsgrad:
            raise RuntimeError("LAMB does not support the AMSGrad variant.")
        self.set_grad_none = set_grad_none
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha=1.0,
            cycle_length=None, bias_correction=bias_correction, eps_inside_sqrt=False,
            grad_averaging=grad_averaging, max_grad_norm=max_grad_norm,
            adam_w_mode=adam_w_mode, use_nvlamb=use_nvlamb,
        )  # fmt: skip
        super().__init__(params, defaults, backend)

    def zero_grad(self, set_to_none: Optional[bool] = None) -> None:
        super().zero_grad(self.set_grad_none if set_to_none is None else set_to_none)
