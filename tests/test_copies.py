"""A copied optimizer (copy.deepcopy, pickle, torch.save of the object) keeps every setting and steps bit
for bit like the original from then on, on every backend."""

import copy
import io
import pickle

import pytest
import torch

from harness import SHAPES, make_params

from largedet_kernels import LAMB, PMDLAMB


def _deepcopy(pair):
    return copy.deepcopy(pair)


def _pickle(pair):
    return pickle.loads(pickle.dumps(pair))


def _torch_save(pair):
    buffer = io.BytesIO()
    torch.save(pair, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", [_deepcopy, _pickle, _torch_save], ids=["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize(
    "cls,kwargs",
    [(PMDLAMB, dict(cycle_length=3, master_weights=False, moment_dtype=torch.bfloat16, max_grad_norm=1.0)),
     (LAMB, dict(set_grad_none=False, stochastic_rounding=True, seed=5))],
    ids=["PMDLAMB", "LAMB"],
)  # fmt: skip
def test_a_copy_steps_like_the_original(every_backend, how, cls, kwargs):
    params = make_params(SHAPES, torch.bfloat16)
    opt = cls([{"params": params[:3]}, {"params": params[3:], "lr": 0.02}], lr=0.1, backend=every_backend, **kwargs)
    gen = torch.Generator().manual_seed(3)

    def step(o, ps, grads):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        o.step()

    step(opt, params, [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params])  # caches built
    copy_params, copy_opt = how((params, opt))
    if every_backend == "cuda":
        # The emulator tracks the memory of c10's CPU allocator (NOTE [checked accesses] in
        # tests/cuda_emulator/ops.cpp); a storage that deepcopy or pickle makes comes from torch's default
        # one, whose accesses it would report: the copies move to tracked memory first.
        for t in [*copy_params, *(v for s in copy_opt.state.values() for v in s.values())]:
            t.data = t.data.clone()
    for name in ("backend", "master_weights", "moment_dtype", *(["set_grad_none"] if cls is LAMB else [])):
        assert getattr(copy_opt, name) == getattr(opt, name), name
    # torch.optim's __setstate__ adds defaults["differentiable"] = False to every copy, as to every load.
    assert {k: v for k, v in copy_opt.defaults.items() if k != "differentiable"} == opt.defaults
    assert copy_opt._step_cache is not opt._step_cache
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
        step(opt, params, grads)
        step(copy_opt, copy_params, grads)
    assert all(torch.equal(a, b) for a, b in zip(params, copy_params))
    for a, b in zip(params, copy_params):
        assert opt.state[a].keys() == copy_opt.state[b].keys()
        assert all(torch.equal(opt.state[a][k], copy_opt.state[b][k]) for k in opt.state[a])
    if cls is LAMB:
        copy_opt.zero_grad()
        assert all(p.grad is not None for p in copy_params)  # set_grad_none=False survived
