"""maximize (torch.optim's flag, per param group): gradient ascent. The kernels fold it into the per-tensor
weight of g and the λ added to g, so a maximizing step on g is, bit for bit, a minimizing step on −g, on
every backend and in both weight-decay modes; and it matches the float64 reference."""

import pytest
import torch

from harness import SHAPES, make_params, run_against_reference

from largedet_kernels import LAMB, PMDLAMB

CASES = {
    "PMDLAMB": (PMDLAMB, dict(cycle_length=3, weight_decay=0.01)),
    "LAMB-L2": (LAMB, dict(adam_w_mode=False, weight_decay=0.02)),
    "LAMB-no-averaging": (LAMB, dict(grad_averaging=False, max_grad_norm=None)),
}


@pytest.mark.parametrize("case", CASES, ids=CASES)
def test_maximizing_on_g_is_minimizing_on_minus_g(every_backend, case):
    cls, kwargs = CASES[case]
    runs = []
    for maximize in (True, False):
        params = make_params(SHAPES, torch.float32)
        opt = cls([{"params": params[:4], "maximize": maximize}, {"params": params[4:]}], lr=0.1,
                  backend=every_backend, **kwargs)  # fmt: skip
        gen = torch.Generator().manual_seed(9)
        for _ in range(3):
            for i, p in enumerate(params):
                g = torch.randn(p.shape, generator=gen)
                p.grad = -g if (i < 4 and not maximize) else g
            opt.step()
        runs.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("case", CASES, ids=CASES)
def test_maximize_against_the_reference(backend, case):
    cls, kwargs = CASES[case]
    params = make_params(SHAPES, torch.float64)  # float64 math: the update itself is judged
    opt = cls([{"params": params[:4], "maximize": True}, {"params": params[4:]}], lr=0.1, backend=backend, **kwargs)
    run_against_reference(opt, steps=3, rtol=1e-10)


def test_maximize_ascends():
    x = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = PMDLAMB([x], lr=0.5, weight_decay=0.0, maximize=True, backend="torch")
    before = (x * x).sum().item()
    for _ in range(5):
        opt.zero_grad()
        (x * x).sum().backward()
        opt.step()
    assert (x * x).sum().item() > before
