"""adapt and trust_ratio_bounds (per param group): the reference defines them, every backend matches it,
with bounds that bind from above and from below, groups that do not adapt in the same bucket as groups
that do, and zero-norm and non-finite tensors."""

import math

import pytest
import torch

from harness import SHAPES, make_params, run_against_reference

from largedet_kernels import LAMB, PMDLAMB


def _groups(params):
    # ‖x‖/‖u‖ is about 1 for these tensors: (0.1, 0.5) binds from above, (2, 4) from below.
    return [
        {"params": params[0:2], "trust_ratio_bounds": (0.1, 0.5)},
        {"params": params[2:4], "trust_ratio_bounds": (2.0, 4.0)},
        {"params": params[4:6], "adapt": False},
        {"params": params[6:]},
    ]


def test_the_controls_against_the_reference(every_backend):
    params = make_params(SHAPES, torch.float64, zero=(2,))  # param 2 is zero: its ratio stays 1
    opt = PMDLAMB(_groups(params), lr=0.1, cycle_length=3, backend=every_backend)
    run_against_reference(opt, steps=4, rtol=1e-10)


def test_bounds_and_adapt_change_the_step(backend):
    runs = []
    for groups in (_groups, lambda params: [{"params": params}]):
        params = make_params(SHAPES, torch.float64)
        opt = PMDLAMB(groups(params), lr=0.1, backend=backend)
        run_against_reference(opt, steps=2, rtol=1e-10)
        runs.append(params)
    moved = [not torch.equal(a, b) for a, b in zip(*runs)]
    # Each control binds on a tensor of its group (params[5] is empty); the last group steps as before.
    assert any(moved[0:2]) and any(moved[2:4]) and moved[4] and not moved[5] and not any(moved[6:]), moved


def test_lamb_adapt_overrides_use_nvlamb(backend):
    params = make_params(SHAPES, torch.float64)
    opt = LAMB([{"params": params[:4], "weight_decay": 0.0, "adapt": True}, {"params": params[4:], "adapt": False}],
               lr=0.01, use_nvlamb=False, backend=backend)  # fmt: skip
    run_against_reference(opt, steps=3, rtol=1e-10)


def test_a_non_finite_tensor_stays_nan_under_bounds(backend):
    params = make_params(SHAPES[:3], torch.float32)
    opt = PMDLAMB(params, trust_ratio_bounds=(0.5, 2.0), max_grad_norm=None, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad[0] = math.inf
    opt.step()
    assert params[1].isnan().all() and not params[0].isnan().any() and not params[2].isnan().any()


@pytest.mark.parametrize(
    "key,value,message",
    [("trust_ratio_bounds", (0.0, 1.0), "Invalid trust_ratio_bounds in param group 1"),
     ("trust_ratio_bounds", (2.0, 1.0), "Invalid trust_ratio_bounds in param group 1"),
     ("trust_ratio_bounds", (0.1, math.inf), "Invalid trust_ratio_bounds in param group 1"),
     ("trust_ratio_bounds", 0.5, "Invalid trust_ratio_bounds in param group 1"),
     ("adapt", "yes", "Invalid adapt in param group 1")],
)  # fmt: skip
def test_bad_controls_are_refused_naming_the_group(key, value, message):
    params = make_params(SHAPES[:2], torch.float32)
    with pytest.raises(ValueError, match=message):
        PMDLAMB([{"params": params[:1]}, {"params": params[1:], key: value}])
    with pytest.raises(ValueError, match=message.replace(" in param group 1", ":")):
        PMDLAMB(params, **{key: value})
