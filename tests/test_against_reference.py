"""Every backend against the float64 reference, over several ξ cycles."""

import pytest
import torch

from harness import FP32_MATH_RTOL, SHAPES, make_params, run_against_reference

from largedet_kernels import LAMB, PMDLAMB

ZERO = (2, 6)  # a zero-norm matrix and a zero-norm conv weight

OPTIONS = {
    "paper": {},
    "bias_correction": dict(bias_correction=True),
    "eps_outside_sqrt": dict(eps_inside_sqrt=False),
    "no_grad_averaging": dict(grad_averaging=False),
    "clipping_active": dict(max_grad_norm=0.5),
    "clipping_inactive": dict(max_grad_norm=1e6),
    "no_cycle": dict(cycle_length=None),
    "cycle_1": dict(cycle_length=1),
    "no_weight_decay": dict(weight_decay=0.0),
    "everything": dict(bias_correction=True, eps_inside_sqrt=False, grad_averaging=False, max_grad_norm=2.0),
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_float64_trajectory(backend, options):
    params = make_params(SHAPES, torch.float64, zero=ZERO)
    kwargs = dict(lr=0.05, weight_decay=0.01, alpha=0.3, cycle_length=3, eps=1e-8, backend=backend)
    opt = PMDLAMB(params, **{**kwargs, **options})
    run_against_reference(opt, steps=10, rtol=1e-10)  # 3+ cycles of T = 3


@pytest.mark.parametrize(
    "options",
    [dict(), dict(adam_w_mode=False), dict(use_nvlamb=True), dict(weight_decay=0.0), dict(max_grad_norm=None)],
    ids=["apex-defaults", "l2-mode", "nvlamb", "no-decay-no-trust", "no-clip"],
)
def test_lamb_float64_trajectory(backend, options):
    params = make_params(SHAPES, torch.float64, zero=ZERO)
    opt = LAMB(params, lr=0.01, backend=backend, **options)
    run_against_reference(opt, steps=6, rtol=1e-10)


def test_per_group_hyper_parameters(backend):
    p = make_params(SHAPES, torch.float64, zero=ZERO)
    groups = [
        dict(params=p[0:2], lr=0.1, betas=(0.5, 0.6), cycle_length=2, alpha=1.0),
        dict(params=p[2:4], eps=1e-3, eps_inside_sqrt=False, weight_decay=0.0, bias_correction=True),
        dict(params=p[4:6], cycle_length=None, grad_averaging=False, weight_decay=0.3),
        dict(params=p[6:], lr=0.0),
    ]
    opt = PMDLAMB(groups, lr=0.02, alpha=0.2, cycle_length=5, max_grad_norm=3.0, backend=backend)
    run_against_reference(opt, steps=8, rtol=1e-10)


def test_one_group_per_parameter(backend):
    # detectron2's layout: one param group per tensor, each with its own lr and decay.
    p = make_params(SHAPES, torch.float64, zero=ZERO)
    groups = [dict(params=[t], lr=0.01 * (i + 1), weight_decay=1e-3 * i) for i, t in enumerate(p)]
    opt = PMDLAMB(groups, cycle_length=4, backend=backend)
    run_against_reference(opt, steps=6, rtol=1e-10)


# Low precision: per step from the optimizer's own state, so the bound is one step's rounding.
@pytest.mark.parametrize(
    "dtype,rtol,ulps",
    [(torch.float32, FP32_MATH_RTOL, 1), (torch.float16, FP32_MATH_RTOL, 1), (torch.bfloat16, FP32_MATH_RTOL, 1)],
    ids=["fp32", "fp16", "bf16"],
)
@pytest.mark.parametrize("options", [OPTIONS["paper"], OPTIONS["everything"]], ids=["paper", "everything"])
def test_low_precision_each_step(backend, dtype, rtol, ulps, options):
    params = make_params(SHAPES, dtype, zero=ZERO)
    opt = PMDLAMB(params, lr=0.05, weight_decay=0.01, alpha=0.3, cycle_length=3, backend=backend, **options)
    run_against_reference(opt, steps=7, rtol=rtol, ulps=ulps, resync=True)
    for p in params:
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert opt.state[p]["exp_avg_sq"].dtype == torch.float32
        assert opt.state[p]["step"].dtype == torch.float32


def test_mixed_dtypes_in_one_group(backend):
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    params = [make_params([s], dtypes[i % 4], seed=i)[0] for i, s in enumerate(SHAPES)]
    opt = PMDLAMB(params, lr=0.05, cycle_length=3, max_grad_norm=1.0, backend=backend)
    run_against_reference(opt, steps=5, rtol=FP32_MATH_RTOL, ulps=1, resync=True)


def test_tensors_without_grad_are_left_alone(backend):
    params = make_params(SHAPES, torch.float64)
    opt = PMDLAMB(params, lr=0.05, cycle_length=3, max_grad_norm=1.0, backend=backend)
    # Tensor 3 never has a gradient, tensor 1 only on odd steps: its step count lags.
    ref = run_against_reference(opt, steps=6, rtol=1e-10, skip_grad=lambda s, i: i == 3 or (i == 1 and s % 2 == 0))
    assert params[3] not in opt.state or not opt.state[params[3]]
    assert torch.equal(params[3].detach().double(), ref.x[3])
    assert opt.state[params[1]]["step"].item() == 3


def test_zero_initialised_tensor_trains(backend):
    bias = torch.nn.Parameter(torch.zeros(5))
    opt = PMDLAMB([bias], lr=0.1, backend=backend)
    bias.grad = torch.ones(5)
    opt.step()
    # ratio 1: x = −η·α·u with u = r = m/√(v+ε) = 0.1/√(0.001+1e-6) per element
    assert torch.allclose(bias.detach(), torch.full((5,), -0.1 * 0.012 * 0.1 / (0.001 + 1e-6) ** 0.5))


def test_many_tensors(backend):
    shapes = [(n,) for n in range(1, 130)] + [(3, n) for n in range(1, 30)]
    params = make_params(shapes, torch.float64, zero=(5, 77))
    opt = PMDLAMB(params, lr=0.05, cycle_length=2, backend=backend)
    run_against_reference(opt, steps=3, rtol=1e-10)


def test_closure_is_called_with_grad_enabled(backend):
    w = torch.nn.Parameter(torch.randn(4))
    opt = PMDLAMB([w], backend=backend)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    before = w.detach().clone()
    loss = opt.step(closure)
    assert loss.item() == pytest.approx((before**2).sum().item())
    assert not torch.equal(w.detach(), before)


def test_channels_last_parameters(backend):
    w = torch.nn.Parameter(torch.randn(8, 3, 3, 3, dtype=torch.float64).to(memory_format=torch.channels_last))
    opt = PMDLAMB([w], lr=0.05, backend=backend)
    run_against_reference(opt, steps=3, rtol=1e-10)


def test_cpu_slices_of_the_torch_backend(monkeypatch):
    # The torch backend walks CPU buckets in cache-sized slices; make them tiny so
    # slices cut through groups, dtypes and the zero-norm tensors.
    from largedet_kernels.backends import torch_foreach

    monkeypatch.setattr(torch_foreach, "_CPU_SLICE_NUMEL", 100)
    p = make_params(SHAPES, torch.float64, zero=ZERO)
    groups = [dict(params=p[:3], lr=0.1, bias_correction=True), dict(params=p[3:], eps_inside_sqrt=False)]
    opt = PMDLAMB(groups, lr=0.05, cycle_length=3, max_grad_norm=1.0, backend="torch")
    run_against_reference(opt, steps=5, rtol=1e-10)


def test_lr_schedule_is_followed(backend):
    params = make_params(SHAPES, torch.float64, zero=ZERO)
    opt = PMDLAMB(params, lr=0.1, cycle_length=3, backend=backend)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step))
    for _ in range(4):
        run_against_reference(opt, steps=1, rtol=1e-10)
        schedule.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 5)
