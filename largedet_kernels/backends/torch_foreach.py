"""The ``torch`` backend: PMD-LAMB with multi-tensor ``torch._foreach_*`` ops.

Runs on any device PyTorch runs on. Hyper-parameters are host floats of the
param groups and enter foreach ops as scalar lists; what depends on the step
count (ξ, bias corrections), the trust ratio and GradScaler's ``found_inf``
stays on the device as per-tensor 0-d tensors, so nothing here waits on the
host. Math is done in float32, or float64 for float64 parameters.

On CUDA one foreach call covers the whole bucket (few launches). On CPU foreach
ops are loops over tensors anyway, so the bucket is walked in cache-sized
slices instead: every op of a slice runs while its tensors are still in cache,
and temporaries stay small enough for the allocator to reuse.
"""

import math
from typing import Dict, List, Optional, Tuple

import torch

from .. import rounding
from . import Bucket, PendingStep
from .tables import COLUMN, TensorLrs, hyper_rows, hyper_table, math_dtype

NAME = "torch"
TRACEABLE = True

# Elements per slice on CPU: x, g, m, v and two temporaries of 4 B stay within ~6 MiB.
_CPU_SLICE_NUMEL = 1 << 18


def grad_sumsq(bucket: Bucket) -> torch.Tensor:
    norms = torch._foreach_norm(bucket.grads, 2, dtype=math_dtype(bucket.grads[0].dtype))
    return torch.stack(norms).square().sum()


def _coefficient_dtype(device: torch.device) -> torch.dtype:
    """Dtype the per-tensor coefficients are formed in (NOTE [double coefficients] in tables.py): float64
    wherever the device has it, which MPS has not."""
    return torch.float32 if device.type == "mps" else torch.float64


# The columns of the hyper-parameter table that the update reads on the device.
_DEVICE_COLUMNS = ("beta1", "beta2", "cycle_length", "bias_correction", "use_trust_ratio", "lr_alpha",
                   "trust_ratio_min", "trust_ratio_max")  # fmt: skip


def _constants(bucket: Bucket) -> Tuple[Dict[str, torch.Tensor], Dict[str, list], Optional[TensorLrs]]:
    """What the update takes from the param groups, from the hyper-parameter table the fused kernels read
    (tables.py): some of its columns on the device, its values as host lists, and its tensor lrs; kept
    while the hyper-parameters last."""
    cached = bucket.constants
    if cached is not None and bucket.hyper_version is not None and cached[0] == bucket.hyper_version:
        return cached[1:]
    rows, which = hyper_rows(bucket.groups)
    table = hyper_table(rows, which, _coefficient_dtype(bucket.device), bucket.device)
    device = {name: table[:, COLUMN[name]] for name in _DEVICE_COLUMNS}
    lrs = TensorLrs.of(bucket.groups, bucket.device, table.dtype)
    column = {name: [rows[w][i] for w in which] for name, i in COLUMN.items()}
    eps, inside, lam, adam_w = column["eps"], column["eps_inside_sqrt"], column["weight_decay"], column["adam_w_mode"]
    host = {
        # Gradient ascent: g negated first (exactly), so that the ops that follow are those of −g.
        "grad_sign": [-1.0 if maximize else 1.0 for maximize in column["maximize"]],
        "weight_g": column["weight_g"],
        "weight_g2": column["weight_g2"],
        "eps_in": [e if i else 0.0 for e, i in zip(eps, inside)],
        "eps_out": [0.0 if i else e for e, i in zip(eps, inside)],
        "decay_in_grad": [0.0 if w else wd for w, wd in zip(adam_w, lam)],
        "decay_in_update": [wd if w else 0.0 for w, wd in zip(adam_w, lam)],
        "bias_correction": [bool(bc) for bc in column["bias_correction"]],
        # NOTE [stochastic rounding]: bf16 parameters without masters, in groups that ask for it.
        "stochastic": [
            sr and not bucket.masters and p.dtype == torch.bfloat16
            for sr, p in zip(column["stochastic_rounding"], bucket.params)
        ],
        "seed": column["seed"],
    }
    bucket.constants = (bucket.hyper_version, device, host, lrs)
    return device, host, lrs


def _coefficients(bucket: Bucket, dtype: torch.dtype, keep: Optional[torch.Tensor]) -> Dict[str, list]:
    """Per-tensor coefficients of the update, each a list over the bucket's tensors: those that
    depend on t formed on the device in _coefficient_dtype, then rounded to the math dtype once."""
    device, host, lrs = _constants(bucket)
    beta1_d, beta2_d, cycle, bias_correction, use_trust, lr_alpha, lo, hi = (device[name] for name in _DEVICE_COLUMNS)
    t = torch.stack(bucket.steps).to(beta1_d.dtype)
    xi = torch.where(cycle > 0, torch.cos(math.pi / 2 * torch.fmod(t, cycle) / cycle), 1.0)
    decay_m, decay_v = (xi * beta1_d).to(dtype), (xi * beta2_d).to(dtype)
    if keep is not None:  # a skipped step leaves m and v exactly as they are
        decay_m, decay_v = torch.where(keep, decay_m, 1.0), torch.where(keep, decay_v, 1.0)
    return {
        # device, one 0-d tensor per tensor
        "decay_m": decay_m.unbind(),
        "decay_v": decay_v.unbind(),
        "correction_m": torch.where(bias_correction > 0, 1 - beta1_d**t, 1.0).to(dtype).unbind(),
        "correction_v": torch.where(bias_correction > 0, 1 - beta2_d**t, 1.0).to(dtype).unbind(),
        # device vectors
        "use_trust": use_trust > 0,
        "trust_ratio_min": lo.to(dtype),
        "trust_ratio_max": hi.to(dtype),
        "lr_alpha": (lr_alpha if lrs is None else lr_alpha * lrs.factors()).to(dtype),  # NOTE [tensor lr] in tables.py
        # host floats
        **host,
    }


def _slices(bucket: Bucket) -> List[Tuple[int, int]]:
    """[lo, hi) ranges of the bucket's tensors stepped together."""
    n = len(bucket.params)
    if bucket.device.type != "cpu":
        return [(0, n)]
    cached = bucket.slices if bucket.address_version is not None else None
    if cached is None:
        cached, lo, numel = [], 0, 0
        for i, p in enumerate(bucket.params):
            numel += p.numel()
            if numel >= _CPU_SLICE_NUMEL or i == n - 1:
                cached.append((lo, i + 1))
                lo, numel = i + 1, 0
        bucket.slices = cached
    return cached


def _prepare(bucket: Bucket, grad_factor: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]):
    """Advance the steps; the math dtype, the per-tensor coefficients, the factor, keep."""
    if bucket.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # Its per-step host-to-device copies would replay from freed host memory.
        raise RuntimeError("the torch backend cannot be captured in a CUDA graph: use backend='triton' or 'cuda'")
    dtype = math_dtype(bucket.params[0].dtype)
    keep = None if found_inf is None else found_inf == 0
    torch._foreach_add_(bucket.steps, 1.0 if keep is None else keep.float())
    coeff = _coefficients(bucket, dtype, keep)
    if keep is not None:
        grad_factor = torch.where(keep, 1.0 if grad_factor is None else grad_factor, 0.0)
    if grad_factor is not None:
        grad_factor = grad_factor.to(dtype)
    return dtype, coeff, grad_factor, keep


def step(bucket: Bucket, grad_factor: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> None:
    dtype, coeff, grad_factor, keep = _prepare(bucket, grad_factor, found_inf)
    for lo, hi in _slices(bucket):
        c = {k: v[lo:hi] for k, v in coeff.items()}
        x, u = _moments(bucket, lo, hi, c, dtype, grad_factor, keep)
        _apply(bucket, lo, hi, x, u, _sums(x, u), c, keep)


def begin_step(bucket: Bucket, grad_factor: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> PendingStep:
    dtype, coeff, grad_factor, keep = _prepare(bucket, grad_factor, found_inf)
    slices = []
    for lo, hi in _slices(bucket):
        c = {k: v[lo:hi] for k, v in coeff.items()}
        x, u = _moments(bucket, lo, hi, c, dtype, grad_factor, keep)
        slices.append((lo, hi, c, x, u))

    def finish(sums: torch.Tensor) -> None:
        for lo, hi, c, x, u in slices:
            _apply(bucket, lo, hi, x, u, sums[lo:hi], c, keep)

    # u is kept between the passes: this path is for shards, and recomputing u costs more.
    return PendingStep(torch.cat([_sums(x, u) for *_, x, u in slices]), finish)


def _moments(bucket: Bucket, lo: int, hi: int, c, dtype, grad_factor, keep):
    """Pass 1 of Algorithm 1 on tensors [lo, hi) of the bucket (see reference.pmd_lamb_step):
    m and v in place; returns x in the math dtype (the masters themselves, when kept) and u = r + λx."""
    xs, grads, m, v = bucket.params[lo:hi], bucket.grads[lo:hi], bucket.exp_avgs[lo:hi], bucket.exp_avg_sqs[lo:hi]
    # Working copies in the compute dtype: grads are never written.
    if bucket.masters:
        x = bucket.masters[lo:hi]
    else:
        x = xs if xs[0].dtype == dtype else [p.to(dtype) for p in xs]
    stored_m, stored_v = m, v
    if m[0].dtype != dtype:  # moments stored in another dtype: the math in dtype, the stores rounded
        m, v = [t.to(dtype) for t in m], [t.to(dtype) for t in v]
    g = [gi.to(dtype) for gi in grads] if grads[0].dtype != dtype else list(grads)
    if keep is not None:  # with found_inf set the factor is 0: make 0·g exactly 0
        g = [torch.nan_to_num(gi, nan=0.0, posinf=0.0, neginf=0.0) for gi in g]
    if any(s < 0 for s in c["grad_sign"]):
        g = torch._foreach_mul(g, c["grad_sign"])
    if grad_factor is not None:
        g = torch._foreach_mul(g, grad_factor)
    if any(c["decay_in_grad"]):  # L2 mode: g ← g + λx
        g = torch._foreach_add(g, torch._foreach_mul(x, c["decay_in_grad"]))

    # m = ξβ1·m + (1−β1)·g ;  v = ξβ2·v + (1−β2)·g²
    torch._foreach_mul_(m, c["decay_m"])
    if len(set(c["weight_g"])) == 1:
        torch._foreach_add_(m, g, alpha=c["weight_g"][0])
    else:
        torch._foreach_add_(m, torch._foreach_mul(g, c["weight_g"]))
    torch._foreach_mul_(v, c["decay_v"])
    torch._foreach_addcmul_(v, g, g, c["weight_g2"])
    if m is not stored_m:  # r is formed from what is stored
        torch._foreach_copy_(stored_m, m)
        torch._foreach_copy_(stored_v, v)
        m, v = [t.to(dtype) for t in stored_m], [t.to(dtype) for t in stored_v]

    # r = m̂ / √(v̂ + ε)  or  m̂ / (√v̂ + ε), as m / (denominator · (1−β1^t))
    bias_correction = any(c["bias_correction"])
    if bias_correction:
        denom = torch._foreach_div(v, c["correction_v"])
        torch._foreach_add_(denom, c["eps_in"])
    else:
        denom = torch._foreach_add(v, c["eps_in"])
    torch._foreach_sqrt_(denom)
    if any(c["eps_out"]):
        torch._foreach_add_(denom, c["eps_out"])
    if bias_correction:
        torch._foreach_mul_(denom, c["correction_m"])

    # u = r + λx
    if any(c["decay_in_update"]):
        u = torch._foreach_mul(x, c["decay_in_update"])
        torch._foreach_addcdiv_(u, m, denom)
    else:
        u = torch._foreach_div(m, denom)
    return x, u


def _sums(x: List[torch.Tensor], u: List[torch.Tensor]) -> torch.Tensor:
    """[n, 2]: Σx², Σu² per tensor."""
    return torch.stack([torch.stack(torch._foreach_norm(x)), torch.stack(torch._foreach_norm(u))], 1).square()


def _apply(bucket: Bucket, lo: int, hi: int, x, u, sums: torch.Tensor, c, keep) -> None:
    """Pass 2: x ← x − η·α·(‖x‖/‖u‖)·u, the ratio taken as 1 when a norm is 0 and NaN when one is not finite
    (NOTE [non-finite gradients] in largedet_kernels/reference.py); then the parameters [lo, hi) of the bucket
    get x rounded, when x is a master or a working copy."""
    x_norm, u_norm = sums.sqrt().unbind(1)
    trusted = c["use_trust"] & (x_norm > 0) & (u_norm > 0)
    bounded = torch.minimum(torch.maximum(x_norm / u_norm, c["trust_ratio_min"]), c["trust_ratio_max"])
    applied = torch.where(sums.isfinite().all(1), torch.where(trusted, bounded, 1.0), math.nan)
    ratio = c["lr_alpha"] * applied
    if bucket.records is not None:  # NOTE [trust-ratio records] in tables.py
        t = torch.stack(bucket.steps[lo:hi]).to(applied.dtype)
        record = torch.stack([t, x_norm, u_norm, applied], 1)
        bucket.records[lo:hi] = record if keep is None else torch.where(keep, record, bucket.records[lo:hi])
    if keep is not None:
        ratio = torch.where(keep, ratio, 0.0)
    torch._foreach_addcmul_(x, u, ratio.unbind(), value=-1)
    xs = bucket.params[lo:hi]
    if x is xs:
        return
    if not any(c["stochastic"]):
        torch._foreach_copy_(xs, x)
        return
    # The seed is the optimizer's (one for every group): the slice's keys in one go.
    keys = rounding.step_key(c["seed"][0], torch.stack(bucket.steps[lo:hi])).unbind()
    for p, xi, stochastic, key in zip(xs, x, c["stochastic"], keys):
        p.copy_(rounding.stochastic_bf16(xi, key) if stochastic else xi)
