"""NOTE [non-finite gradients] (in largedet_kernels/reference.py) on every backend this machine runs: a tensor with
an inf or NaN in its gradient becomes NaN all over, the other tensors step as they would without it, and with
max_grad_norm every tensor with a gradient becomes NaN. The CUDA C++ kernels run under tests/cuda_emulator."""

import pytest
import torch
from conftest import CPU_BACKENDS

from harness import FP32_MATH_RTOL, ReferenceRun, make_params, random_grads, ulp

from largedet_kernels import LAMB, PMDLAMB

# Triton's interpreter multiplies in numpy, which warns of the inf·0 that makes a NaN here on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")

# Odd sizes, several tensors per bucket; tensor 2 starts at zero (‖x‖ = 0: ratio 1).
SHAPES = [(5,), (3, 7), (11,), (2, 3, 3, 3), (301,), (1,)]
ZERO = (2,)
BACKENDS = [*CPU_BACKENDS, pytest.param("cuda", marks=pytest.mark.emulator)]
BAD = {"inf": (float("inf"),), "nan": (float("nan"),), "inf-and-nan": (float("inf"), float("nan"))}
# Against the reference after two steps: fp32 parameters take a rounding in each.
TOLERANCE = {torch.float64: (1e-10, 0), torch.float32: (FP32_MATH_RTOL, 2)}


@pytest.fixture(params=BACKENDS)
def any_backend(request):
    """Every backend that steps CPU tensors here, the CUDA kernels through the emulator."""
    if request.param == "cuda":
        request.getfixturevalue("emulated_cuda")
    elif request.param == "triton":
        request.getfixturevalue("triton_backend")
    return request.param


def _optimizer(kind: str, params, backend: str, **options):
    """Param groups that reach every branch of the ratio: one decayed, one without decay (LAMB: no trust ratio)."""
    groups = [dict(params=params[:3]), dict(params=params[3:], weight_decay=0.0)]
    if kind == "pmdlamb":
        return PMDLAMB(groups, lr=0.05, weight_decay=0.01, alpha=0.3, cycle_length=3, backend=backend, **options)
    options.setdefault("max_grad_norm", None)
    return LAMB(groups, lr=0.01, weight_decay=0.01, adam_w_mode=kind != "lamb-l2", backend=backend, **options)


def _spoil(grad: torch.Tensor, values) -> None:
    """Non-finite values at distinct random places of grad (a generator of its own: the gradients stay those of a
    run without)."""
    places = torch.randperm(grad.numel(), generator=torch.Generator().manual_seed(11))[: len(values)]
    for place, value in zip(places.tolist(), values):
        grad.view(-1)[place] = value


def _step_twice(opt, params, spoilt: int, bad, bad_step: int = 1, seed: int = 5):
    """Two steps, the gradient of tensor ``spoilt`` (None: none) given ``bad`` values in step ``bad_step``;
    the reference beside. Returns it and its values before the last step."""
    ref = ReferenceRun(opt)
    gen = torch.Generator().manual_seed(seed)
    for step in range(2):
        grads = random_grads(params, gen)
        if step == bad_step and spoilt is not None:
            _spoil(grads[spoilt], bad)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        before = [x.clone() for x in ref.x]
        opt.step()
        ref.step(grads)
    return ref, before


def _assert_steps_as_reference(p, want, before, dtype) -> None:
    rtol, ulps = TOLERANCE[dtype]
    update = (want - before).abs().max()
    assert bool(((p.detach().double() - want).abs() <= rtol * update + ulps * ulp(want, dtype)).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("bad", BAD.values(), ids=BAD.keys())
@pytest.mark.parametrize("kind", ["pmdlamb", "lamb", "lamb-l2"])
@pytest.mark.parametrize("spoilt", [1, 2, 4], ids=["decayed", "zero-norm", "no-trust-ratio"])
def test_a_non_finite_gradient_spoils_its_tensor_only(any_backend, kind, bad, dtype, spoilt):
    params = make_params(SHAPES, dtype, zero=ZERO)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = _optimizer(kind, params, any_backend)
    twin = _optimizer(kind, twins, any_backend)
    bad_step = 0 if spoilt in ZERO else 1  # the zero tensor is zero before its first step only
    ref, before = _step_twice(opt, params, spoilt, bad, bad_step)
    _step_twice(twin, twins, None, bad)  # the same gradients, none spoilt
    for i, (p, q) in enumerate(zip(params, twins)):
        if i == spoilt:
            assert not p.isfinite().any(), f"tensor {i} kept finite elements"
            assert not ref.x[i].isfinite().any(), "the reference kept finite elements"
        else:
            assert torch.equal(p, q), f"tensor {i} stepped differently beside the spoilt one"
            _assert_steps_as_reference(p, ref.x[i], before[i], dtype)
    # The zero-norm tensor took the ratio 1 when its gradient was finite: it moved by η·α·u.
    if spoilt != ZERO[0]:
        assert bool((params[ZERO[0]] != 0).all())


@pytest.mark.parametrize("bad", BAD.values(), ids=BAD.keys())
@pytest.mark.parametrize("kind", ["pmdlamb", "lamb"])
def test_a_non_finite_global_norm_spoils_every_tensor_with_a_gradient(any_backend, kind, bad):
    params = make_params(SHAPES, torch.float32, zero=ZERO)
    opt = _optimizer(kind, params, any_backend, max_grad_norm=1.0)
    ref = ReferenceRun(opt)
    gen = torch.Generator().manual_seed(7)
    for step in range(2):
        grads = random_grads(params, gen)
        if step == 1:
            _spoil(grads[1], bad)
            grads[3] = None  # a tensor without a gradient is not stepped
            idle, ref_idle = params[3].detach().clone(), ref.x[3].clone()
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
        ref.step(grads)
    for i, p in enumerate(params):
        if i == 3:
            assert torch.equal(p.detach(), idle) and torch.equal(ref.x[i], ref_idle)
        else:
            assert not p.isfinite().any(), f"tensor {i} kept finite elements"
            assert not ref.x[i].isfinite().any(), f"the reference's tensor {i} kept finite elements"


@pytest.mark.parametrize("bad", BAD.values(), ids=BAD.keys())
def test_a_non_finite_parameter_spoils_its_tensor(any_backend, bad):
    params = make_params(SHAPES, torch.float32, zero=ZERO)
    _spoil(params[0].data, bad)
    opt = _optimizer("pmdlamb", params, any_backend)
    ref, before = _step_twice(opt, params, None, bad)
    assert not params[0].isfinite().any() and not ref.x[0].isfinite().any()
    for i in range(1, len(params)):
        _assert_steps_as_reference(params[i], ref.x[i], before[i], torch.float32)
