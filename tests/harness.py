"""Steps an optimizer and the float64 reference side by side and compares them.

The reference sees float64 copies of everything and its own step counter, so it
shares nothing with the code under test but the inputs.
"""

import io
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch

from largedet_kernels import PMDLAMB, dispatch, reference
from largedet_kernels.backends import Bucket

# One step's error of float32 math (fp32, fp16 and bf16 parameters: float32 moments) against
# the float64 reference, relative to the update and to the moments' size: a few float32
# roundings (NOTE [double coefficients] in largedet_kernels/backends/tables.py), up to
# 3.5e-7 on the CPU backends; beyond the 1 ulp of x's own dtype that the tests add.
FP32_MATH_RTOL = 1e-6

# Shapes that cross nothing in particular and everything at once: one element,
# odd sizes, a 4-D conv weight, an empty tensor.
SHAPES = [(1,), (7,), (3, 5), (64, 3, 3, 3), (257,), (0,), (2, 1, 1, 1), (1000,)]


def make_params(
    shapes: Sequence[Sequence[int]], dtype: torch.dtype, zero: Sequence[int] = (), seed: int = 0, device: str = "cpu"
) -> List[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(shapes):
        x = torch.zeros(shape) if i in zero else torch.randn(shape, generator=gen)
        params.append(torch.nn.Parameter(x.to(device=device, dtype=dtype)))
    return params


def random_grads(
    params: Sequence[torch.Tensor], gen: torch.Generator, scale: float = 1.0, dtype: Optional[torch.dtype] = None
) -> List[torch.Tensor]:
    """Fresh gradients of each parameter's dtype, or of ``dtype``."""
    return [(scale * torch.randn(p.shape, generator=gen)).to(device=p.device, dtype=dtype or p.dtype) for p in params]


def reference_kwargs(group: Dict) -> Dict:
    keys = ("lr", "eps", "weight_decay", "alpha", "cycle_length", "bias_correction",
            "eps_inside_sqrt", "grad_averaging", "adam_w_mode", "use_nvlamb", "maximize", "adapt",
            "trust_ratio_bounds")  # fmt: skip
    kwargs = {k: group[k] for k in keys}
    kwargs["beta1"], kwargs["beta2"] = group["betas"]
    return kwargs


def stepped_value(opt: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor:
    """What a step changes of p: its fp32 master when it has one, else p."""
    master = opt.state[p].get("master") if opt.state[p] else None
    return (p if master is None else master).detach()


def bf16_moments(opt: torch.optim.Optimizer, p: torch.Tensor) -> bool:
    return opt.moment_dtype == torch.bfloat16 and p.dtype != torch.float64


class ReferenceRun:
    """The reference's own copy of params (their masters, when kept), moments and step counts, in float64.

    With bf16 moments each step is judged in its two halves: the moments within one bf16 rounding of
    the reference's (float32 and float64 math may round a value near a tie apart), then the parameter
    from the optimizer's stored moments, which are the state the update is formed from."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.opt = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.x = [stepped_value(optimizer, p).double().clone() for p in self.params]
        self.m = [torch.zeros_like(x) for x in self.x]
        self.v = [torch.zeros_like(x) for x in self.x]
        self.t = [0] * len(self.params)
        # Each tensor's (t, ‖x‖, ‖u‖, applied ratio) of its last step (NOTE [trust-ratio records]).
        self.records: List[Optional[Tuple[int, float, float, float]]] = [None] * len(self.params)
        self.resync()  # an optimizer that has stepped before hands over its state
        for i, p in enumerate(self.params):
            if optimizer.state[p]:
                self.t[i] = int(optimizer.state[p]["step"].item())

    def resync(self) -> None:
        """Start the next reference step from the optimizer's current values."""
        for i, p in enumerate(self.params):
            state = self.opt.state[p]
            self.x[i] = stepped_value(self.opt, p).double().clone()
            if state:
                self.m[i] = state["exp_avg"].double().clone()
                self.v[i] = state["exp_avg_sq"].double().clone()

    State = Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]

    def state(self) -> "ReferenceRun.State":
        """Copies of x, m and v."""
        return [x.clone() for x in self.x], [m.clone() for m in self.m], [v.clone() for v in self.v]

    def step(self, grads: Sequence[Optional[torch.Tensor]]) -> None:
        g64 = [None if g is None else g.double() for g in grads]
        factor = reference.clip_factor([g for g in g64 if g is not None], self.opt.defaults["max_grad_norm"])
        i = 0
        for group in self.opt.param_groups:
            kwargs = reference_kwargs(group)
            moment_kwargs = {k: kwargs[k] for k in ("beta1", "beta2", "weight_decay", "cycle_length",
                                                     "grad_averaging", "adam_w_mode")}  # fmt: skip
            update_kwargs = {k: kwargs[k] for k in kwargs if k not in ("cycle_length", "grad_averaging", "maximize")}
            sign = -1.0 if kwargs["maximize"] else 1.0
            for p in group["params"]:
                if g64[i] is not None:
                    self.t[i] += 1
                    x, m, v, t = self.x[i], self.m[i], self.v[i], self.t[i]
                    if not bf16_moments(self.opt, p):
                        record = reference.pmd_lamb_step(x, g64[i] * factor, m, v, t, **kwargs)
                    else:
                        reference.update_moments(x, sign * g64[i] * factor, m, v, t, moment_dtype=torch.bfloat16,
                                                 **moment_kwargs)  # fmt: skip
                        # The moments are judged against the reference's by assert_close_to_reference.
                        stored = [self.opt.state[p][k].double() for k in ("exp_avg", "exp_avg_sq")]
                        record = reference.update_parameter(x, *stored, t, **update_kwargs)
                    self.records[i] = (t, *(float(r) for r in record))
                    if "master" in self.opt.state[p]:
                        x.copy_(x.float())  # what the master stores
                    else:
                        x.copy_(reference.store_parameter(x, p.dtype, stochastic_rounding=group["stochastic_rounding"],
                                                          seed=group["seed"], t=t))  # fmt: skip
                i += 1


_MANTISSA_BITS = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers around |x| (float64 result)."""
    exponent = torch.floor(torch.log2(x.abs().clamp_min(torch.finfo(dtype).tiny)))
    return torch.exp2(exponent - _MANTISSA_BITS[dtype])


def assert_close_to_reference(opt: torch.optim.Optimizer, ref: ReferenceRun, before: ReferenceRun.State, rtol: float,
                              ulps: float) -> None:  # fmt: skip
    """x within ``rtol`` of the reference update plus ``ulps`` of rounding; m, v within ``rtol``
    of the larger of their size before and after the step: a new m sums two terms that can
    cancel, and its rounding follows the terms, not the sum."""
    x_before, m_before, v_before = before
    for i, p in enumerate(ref.params):
        value = stepped_value(opt, p)
        got, want = value.double(), ref.x[i]
        update = (want - x_before[i]).abs().max() if want.numel() else torch.tensor(0.0)
        bound = rtol * update + ulps * ulp(want, value.dtype)
        err = (got - want).abs()
        assert bool((err <= bound).all()), (
            f"param {i} {tuple(p.shape)} {value.dtype}: max error {err.max().item():.3e}, "
            f"update size {update.item():.3e}"
        )
        if opt.state[p] and "master" in opt.state[p]:  # NOTE [master weights]: p is its master rounded to nearest
            assert torch.equal(p.detach(), value.to(p.dtype)), f"param {i} is not its master rounded"
        state = opt.state[p]
        if not state:
            continue
        for name, want_s, was in (("exp_avg", ref.m[i], m_before[i]), ("exp_avg_sq", ref.v[i], v_before[i])):
            got_s = state[name].double()
            scale = torch.maximum(want_s.abs().max(), was.abs().max()) if want_s.numel() else torch.tensor(0.0)
            err = (got_s - want_s).abs()
            rounding = ulp(want_s, torch.bfloat16) if bf16_moments(opt, p) else 0.0
            assert bool((err <= rtol * scale + rounding + 1e-300).all()), (
                f"{name} of param {i}: max error {err.max().item():.3e} of {scale.item():.3e}"
            )
        assert state["step"].item() == ref.t[i], f"step of param {i}"


def run_against_reference(
    opt: torch.optim.Optimizer,
    steps: int,
    *,
    rtol: float,
    ulps: float = 0.0,
    resync: bool = False,
    seed: int = 1,
    grad_scale: float = 1.0,
    skip_grad: Callable[[int, int], bool] = lambda step, i: False,
    grad_dtype: Optional[torch.dtype] = None,
) -> ReferenceRun:
    """Step ``opt`` and the reference ``steps`` times on fresh random gradients.

    With ``resync`` every reference step starts from the optimizer's values, so
    each comparison measures one step's error (the way to judge low precision).
    ``grad_dtype`` gives the gradients another dtype than their parameters (float32
    gradients of bf16 parameters); the reference sees the same values.
    """
    ref = ReferenceRun(opt)
    gen = torch.Generator().manual_seed(seed)
    if grad_dtype is not None:
        for p in ref.params:
            p.grad_dtype = grad_dtype
    for s in range(steps):
        if resync:
            ref.resync()
        grads = random_grads(ref.params, gen, grad_scale, grad_dtype)
        grads = [None if skip_grad(s, i) else g for i, g in enumerate(grads)]
        for p, g in zip(ref.params, grads):
            p.grad = None if g is None else g.clone()
        before = ref.state()
        opt.step()
        ref.step(grads)
        for p, g in zip(ref.params, grads):
            if g is not None:
                assert torch.equal(p.grad, g), "the optimizer wrote a gradient"
        assert_close_to_reference(opt, ref, before, rtol, ulps)
    return ref


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = b.abs().max().item()
    return (a - b).abs().max().item() / denom if denom else (a - b).abs().max().item()


def make_bucket(xs: Sequence[torch.Tensor], group: Dict) -> Bucket:
    """A backend bucket of xs (zero moments and steps, empty grads) under one param group."""
    math = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    return Bucket(
        xs[0].device, params=list(xs), grads=[torch.empty_like(x) for x in xs],
        exp_avgs=[torch.zeros_like(x, dtype=math) for x in xs], exp_avg_sqs=[torch.zeros_like(x, dtype=math) for x in xs],
        steps=[torch.zeros((), device=xs[0].device) for _ in xs], groups=[group] * len(xs),
    )  # fmt: skip


def check_sharded_halves(backend: str, dtype: torch.dtype, device: str, rtol: float, ulps: float = 0.0,
                         steps: int = 7, shapes: Sequence[Sequence[int]] = SHAPES, **options) -> None:  # fmt: skip
    """NOTE [sharded norms] in one process: every tensor cut into two uneven shards (some
    empty), each shard set a bucket stepped in halves with the two ranks' sums added in
    between, against the float64 reference on the whole tensors; each step starts the
    reference from the shards' values, so the bound is one step's error."""
    module = dispatch.backend_module(backend)
    group = PMDLAMB([torch.zeros(1)], lr=0.05, weight_decay=0.01, alpha=0.3, cycle_length=3, **options).param_groups[0]
    whole = make_params(shapes, dtype, zero=(2,), device=device)
    cuts = [p.numel() // 3 for p in whole]
    shards = [
        make_bucket([p.detach().flatten()[:c].clone() for p, c in zip(whole, cuts)], group),
        make_bucket([p.detach().flatten()[c:].clone() for p, c in zip(whole, cuts)], group),
    ]
    gen = torch.Generator().manual_seed(3)
    for t in range(1, steps + 1):
        joined = [[torch.cat([getattr(b, name)[i].double() for b in shards]) for i in range(len(whole))]
                  for name in ("params", "exp_avgs", "exp_avg_sqs")]  # fmt: skip
        x, m, v = joined
        grads = [g.flatten() for g in random_grads(whole, gen)]
        for b in shards:
            for i, c in enumerate(cuts):
                part = grads[i][:c] if b is shards[0] else grads[i][c:]
                b.grads[i].copy_(part)
        pending = [module.begin_step(b, None, None) for b in shards]
        total = pending[0].sums + pending[1].sums
        for p in pending:
            p.finish(total)
        kwargs = reference_kwargs(group)
        factor = reference.clip_factor([g.double() for g in grads], group["max_grad_norm"])
        for i in range(len(whole)):
            before = x[i].clone()
            reference.pmd_lamb_step(x[i], grads[i].double() * factor, m[i], v[i], t, **kwargs)
            got = torch.cat([b.params[i].double() for b in shards])
            update = (x[i] - before).abs().max() if x[i].numel() else torch.tensor(0.0)
            bound = rtol * update + ulps * ulp(x[i], dtype)
            assert bool(((got - x[i]).abs() <= bound).all()), (i, (got - x[i]).abs().max().item(), update.item())
        assert all(s.item() == t for b in shards for s in b.steps)


def check_halves_equal_step(
    backend: str, dtype: torch.dtype, device: str, shapes: Sequence[Sequence[int]] = SHAPES
) -> None:
    """begin_step, then finish with the bucket's own sums, is step, bit for bit."""
    module = dispatch.backend_module(backend)
    group = PMDLAMB([torch.zeros(1)], lr=0.05, weight_decay=0.01, cycle_length=3).param_groups[0]
    params = make_params(shapes, dtype, zero=(2,), device=device)
    a, b = (make_bucket([p.detach().clone() for p in params], group) for _ in range(2))
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):
        for i, g in enumerate(random_grads(params, gen)):
            a.grads[i].copy_(g)
            b.grads[i].copy_(g)
        module.step(a, None, None)
        pending = module.begin_step(b, None, None)
        pending.finish(pending.sums)
    for name in ("params", "exp_avgs", "exp_avg_sqs", "steps"):
        assert all(torch.equal(s, t) for s, t in zip(getattr(a, name), getattr(b, name))), name


def train(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], steps: int, gen: torch.Generator) -> None:
    """``steps`` steps of opt on fresh random gradients."""
    for _ in range(steps):
        for p, g in zip(params, random_grads(params, gen)):
            p.grad = g
        opt.step()


def roundtrip(obj):
    """obj through torch.save and torch.load, as a checkpoint goes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_records(opt: torch.optim.Optimizer, ref: ReferenceRun, names: Sequence[str], rtol: float) -> None:
    """The optimizer's trust-ratio records of its last step are the reference's, by parameter name."""
    got = opt.trust_ratios()
    assert not got.skipped
    assert list(got.records) == [n for n, r in zip(names, ref.records) if r is not None]
    for name, want in zip(names, ref.records):
        record = got.records[name]
        assert record.step == want[0], name
        for field, w in zip(("x_norm", "u_norm", "ratio"), want[1:]):
            value = getattr(record, field)
            assert value == pytest.approx(w, rel=rtol, abs=1e-300), (name, field, value, w)
