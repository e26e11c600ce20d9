"""GradScaler: unscaling inside the step, and skipped steps that change nothing."""

import pytest
import torch

from harness import SHAPES, make_params

from largedet_kernels import LAMB, PMDLAMB


def _pair(backend, dtype=torch.float32, **kwargs):
    a = make_params(SHAPES, dtype, zero=(2,))
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    kwargs = dict(lr=0.05, cycle_length=3, backend=backend, **kwargs)
    return a, PMDLAMB(a, **kwargs), b, PMDLAMB(b, **kwargs)


def _snapshot(opt):
    params = [p for g in opt.param_groups for p in g["params"]]
    return [p.detach().clone() for p in params], {
        i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params) if opt.state[p]
    }


@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_scaled_step_equals_unscaled_step(backend, max_grad_norm):
    a, opt_a, b, opt_b = _pair(backend, max_grad_norm=max_grad_norm)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen) for p in a]
        loss = sum((p * g).sum() for p, g in zip(a, grads))
        scaler.scale(loss).backward()
        scaler.step(opt_a)
        scaler.update()
        opt_a.zero_grad()
        for p, g in zip(b, grads):
            p.grad = g.clone()
        opt_b.step()
        for pa, pb in zip(a, b):
            torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    assert not hasattr(opt_a, "grad_scale") and not hasattr(opt_a, "found_inf")


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize(
    "dtype,options",
    [(torch.float32, {}), (torch.bfloat16, {}), (torch.float16, {}), (torch.float16, dict(moment_dtype=torch.bfloat16)),
     (torch.bfloat16, dict(stochastic_rounding=True))],
    ids=["fp32", "bf16-masters", "fp16-masters", "fp16-masters-bf16-moments", "bf16-stochastic"],
)  # fmt: skip
def test_non_finite_step_changes_nothing(backend, bad, dtype, options):
    # Masters included (NOTE [master weights]): _snapshot copies every state tensor.
    params, opt, _, _ = _pair(backend, dtype=dtype, max_grad_norm=1.0, **options)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    for p in params:  # one good step first so that moments and steps are non-trivial
        p.grad = torch.randn_like(p)
    opt.step()
    before = _snapshot(opt)
    loss = sum(p.float().sum() for p in params)
    scaler.scale(loss).backward()
    params[4].grad[3] = bad
    scaler.step(opt)
    scaler.update()
    after = _snapshot(opt)
    for x0, x1 in zip(before[0], after[0]):
        assert torch.equal(x0, x1)
    for i, s in before[1].items():
        for k, v in s.items():
            assert torch.equal(v, after[1][i][k]), f"{k} of param {i} changed"
    assert scaler.get_scale() == 2.0  # the scaler saw the overflow and backed off


def test_unscale_then_clip_then_step(backend):
    # The user unscales first (e.g. to log the norm); the step must not unscale again.
    a, opt_a, b, opt_b = _pair(backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    grads = [torch.randn_like(p) for p in a]
    scaler.scale(sum((p * g).sum() for p, g in zip(a, grads))).backward()
    scaler.unscale_(opt_a)
    for p, g in zip(a, grads):
        torch.testing.assert_close(p.grad, g)
    scaler.step(opt_a)
    for p, g in zip(b, grads):
        p.grad = g.clone()
    opt_b.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_lamb_supports_amp_scaling():
    assert LAMB._step_supports_amp_scaling and PMDLAMB._step_supports_amp_scaling
