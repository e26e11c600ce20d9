"""fp32 against the float64 reference: m, v and x within a few float32 roundings of it, on
every backend (NOTE [double coefficients] in largedet_kernels/backends/tables.py).

The error of a tensor a is ‖a − a_ref‖∞ / ‖a_ref‖∞ after the same steps on the same random
data (no zeros), the reference stepping its own float64 copy from the start."""

import pytest
import torch

from harness import ReferenceRun, make_params, random_grads, relative_error

from largedet_kernels import LAMB, PMDLAMB, dispatch
from largedet_kernels.backends import cpu

STEPS = 10
AFTER_ONE_STEP, AFTER_TEN_STEPS = 2e-7, 2e-6

# Clipping stays off: its factor comes from a float32 global norm, a rounding of its own.
SETTINGS = {
    "pmd_lamb": dict(optimizer=PMDLAMB, lr=0.05, weight_decay=0.01, alpha=0.3, cycle_length=4),
    "pmd_lamb_bias_correction": dict(optimizer=PMDLAMB, lr=0.05, weight_decay=0.01, alpha=0.3, cycle_length=4,
                                     bias_correction=True, eps_inside_sqrt=False),  # fmt: skip
    "lamb": dict(optimizer=LAMB, lr=0.01, max_grad_norm=None),
    "lamb_no_bias_correction": dict(optimizer=LAMB, lr=0.01, bias_correction=False, max_grad_norm=None),
    # No decay, so no trust ratio to cancel a uniform error of u (a bias correction's): x carries it.
    "lamb_no_trust_ratio": dict(optimizer=LAMB, lr=0.1, weight_decay=0.0, max_grad_norm=None),
}


def shapes(backend: str):
    """Odd sizes and a tensor across three of the backend's chunks (the cpu backend's for torch, which has none)."""
    chunk = getattr(dispatch.backend_module(backend), "CHUNK", cpu.CHUNK)
    return [(1,), (7,), (33, 5), (2 * chunk + 37,)]


def errors(opt: torch.optim.Optimizer, ref: ReferenceRun):
    """(error, what) of m, v and x of every tensor."""
    out = []
    for i, p in enumerate(ref.params):
        state = opt.state[p]
        for name, got, want in (("m", state["exp_avg"], ref.m[i]), ("v", state["exp_avg_sq"], ref.v[i]),
                                ("x", p.detach(), ref.x[i])):  # fmt: skip
            out.append((relative_error(got.double(), want), f"{name} of tensor {i} {tuple(p.shape)}"))
    return out


@pytest.mark.parametrize("setting", SETTINGS.values(), ids=SETTINGS.keys())
def test_float32_stays_within_a_few_roundings_of_the_reference(backend, setting):
    check_float32_precision(backend, setting)


@pytest.mark.emulator
@pytest.mark.parametrize("setting", SETTINGS.values(), ids=SETTINGS.keys())
def test_the_cuda_kernels_stay_within_a_few_roundings_of_the_reference(emulated_cuda, setting):
    check_float32_precision("cuda", setting)


def check_float32_precision(backend: str, setting: dict) -> None:
    options = dict(setting)
    params = make_params(shapes(backend), torch.float32)
    opt = options.pop("optimizer")(params, backend=backend, **options)
    ref = ReferenceRun(opt)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, STEPS + 1):
        grads = random_grads(ref.params, gen)
        for p, g in zip(ref.params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
        bound = AFTER_ONE_STEP if step == 1 else AFTER_TEN_STEPS
        error, what = max(errors(opt, ref))
        assert error <= bound, f"step {step}: {what} off by {error:.2e} of its size, more than {bound:.0e}"
