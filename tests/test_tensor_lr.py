"""A 0-d or one-element tensor lr (NOTE [tensor lr] in largedet_kernels/backends/tables.py): the same steps
as a float lr of its value, on every backend; an in-place write reaches the next step without a rebuild of
the step cache; a compiled step does not recompile when it changes."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import CPU_BACKENDS
from harness import SHAPES, make_params

from largedet_kernels import LAMB, PMDLAMB, step_cache


def _run(backend, lrs, cls=PMDLAMB, dtype=torch.float32, **kwargs):
    """Three steps, the first group's lr written before each as lrs[t] (a float, or into a tensor in place)."""
    params = make_params(SHAPES, dtype)
    lr = lrs[0]
    opt = cls([{"params": params[:3], "lr": lr}, {"params": params[3:], "lr": 0.05}], backend=backend, **kwargs)
    gen = torch.Generator().manual_seed(5)
    for value in lrs:
        if isinstance(lr, torch.Tensor):
            lr.copy_(torch.as_tensor(value, dtype=lr.dtype).reshape(lr.shape))
        else:
            opt.param_groups[0]["lr"] = value
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    return params


@pytest.mark.parametrize("cls", [PMDLAMB, LAMB])
@pytest.mark.parametrize("lr_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-d", "1-element"])
def test_a_tensor_lr_steps_as_a_float_lr_of_its_value(every_backend, cls, lr_dtype, shape):
    values = [torch.tensor(v, dtype=lr_dtype).item() for v in (0.3, 0.1, 0.2)]
    as_tensor = _run(every_backend, [torch.tensor(values[0], dtype=lr_dtype).reshape(shape), *values[1:]], cls)
    as_float = _run(every_backend, values, cls)
    assert all(torch.equal(a, b) for a, b in zip(as_tensor, as_float))


def test_an_in_place_lr_write_rebuilds_nothing(backend, monkeypatch):
    builds, accepted = [], []
    build = step_cache.StepCache._build
    monkeypatch.setattr(step_cache.StepCache, "_build", lambda *a, **k: (builds.append(1), build(*a, **k))[1])
    params = make_params(SHAPES, torch.float32)
    lr = torch.tensor(0.1)
    opt = PMDLAMB(params, lr=lr, backend=backend)
    check = opt._accept_hypers
    monkeypatch.setattr(opt, "_accept_hypers", lambda: (accepted.append(1), check())[1])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    builds.clear(), accepted.clear()
    lr.fill_(0.0)  # a scheduler's write: the next step must see it
    opt.step()
    assert builds == [] and accepted == []
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_torch_schedulers_drive_a_tensor_lr(backend):
    params = make_params(SHAPES[:2], torch.float32)
    lr = torch.tensor(0.4)
    opt = PMDLAMB(params, lr=lr, backend=backend)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.1)


def test_a_tensor_lr_of_more_than_one_element_is_refused():
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        PMDLAMB(make_params(SHAPES[:1], torch.float32), lr=torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b in ("torch", "cpu")])
def test_a_compiled_step_does_not_recompile_when_a_tensor_lr_changes(backend):
    torch._dynamo.reset()
    counters.clear()
    values = [0.3, 0.1, 0.2, 0.05]
    runs = []
    for compiled in (False, True):
        params = make_params(SHAPES, torch.float32)
        lr = torch.tensor(values[0])
        opt = PMDLAMB([{"params": params[:3], "lr": lr}, {"params": params[3:], "lr": 0.05}], backend=backend)
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        gen = torch.Generator().manual_seed(5)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for value in values:
                lr.fill_(value)
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                step()
        runs.append(params)
    assert counters["stats"]["unique_graphs"] == 1
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
