"""NOTE [step cache] in largedet_kernels/step_cache.py: step() reuses what it built from the
parameter set, and each event that changes the answer makes it rebuild or refresh.

Each test applies one event to two copies of the same parameters: one stepped by an optimizer
that has already stepped (and cached), the other by an optimizer built after the event and
loaded with the first one's state. Both run the same code on the same values, so anything but
bitwise equality is a stale cache.
"""

import gc
import weakref
from typing import Callable, List

import pytest
import torch

from conftest import CPU_BACKENDS
from largedet_kernels import LAMB, PMDLAMB, step_cache

SHAPES = [(5,), (3, 4), (257,), (2, 3, 2, 2)]


@pytest.fixture(autouse=True, params=["native", "python"])
def check(request, monkeypatch):
    """The cache's per-step check in C++ (csrc/step_cache/step_cache.cpp), and its Python stand-in."""
    if request.param == "native" and step_cache._native(build=True) is None:
        pytest.skip("the step cache's native check cannot be built here")
    if request.param == "python":
        monkeypatch.setattr(step_cache, "_NATIVE", None)
    return request.param


@pytest.fixture(params=[*CPU_BACKENDS, pytest.param("cuda", marks=pytest.mark.emulator)])
def backend(request):
    """Every CPU backend, and the CUDA C++ kernels through the emulator."""
    if request.param == "cuda":
        request.getfixturevalue("emulated_cuda")
    elif request.param == "triton":
        request.getfixturevalue("triton_backend")
    return request.param


def _pair(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in SHAPES]
    return a, [torch.nn.Parameter(p.detach().clone()) for p in a]


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def _fresh(opt: torch.optim.Optimizer, a: List[torch.Tensor], b: List[torch.Tensor]) -> torch.optim.Optimizer:
    """An optimizer over b built now, with opt's param groups (mapped from a to b) and state."""
    index = {id(p): i for i, p in enumerate(a)}
    groups = [{**g, "params": [b[index[id(p)]] for p in g["params"]]} for g in opt.param_groups]
    twin = type(opt)(groups, backend=opt.backend, max_grad_norm=opt.defaults["max_grad_norm"])
    assert not twin._step_cache.valid
    twin.load_state_dict(opt.state_dict())
    return twin


def _assert_same(a, b) -> None:
    for i, (p, q) in enumerate(zip(a, b)):
        assert p.dtype == q.dtype and torch.equal(p.detach(), q.detach()), f"parameter {i} differs"


def _check_event(backend: str, event: Callable, cls=PMDLAMB, steps_after: int = 2, dtype=torch.float32,
                 prepare: Callable = lambda params: None, **options) -> None:  # fmt: skip
    a, b = _pair(dtype)
    prepare(a)
    prepare(b)
    opt = cls(a, lr=0.05, backend=backend, **options)
    for seed in range(2):  # the cache is built and used
        _grads(a, seed)
        opt.step()
    for p, q in zip(a, b):
        q.data.copy_(p.data)
        q.grad = p.grad.clone()
    event(opt, a)
    event(None, b)
    twin = _fresh(opt, a, b)
    for seed in range(10, 10 + steps_after):
        for params, o in ((a, opt), (b, twin)):
            gen = torch.Generator().manual_seed(seed)
            for p in params:  # in place: no new address hides a stale table
                if p.grad is not None:
                    p.grad.copy_(torch.randn(p.shape, generator=gen))
            o.step()
        _assert_same(a, b)


def test_a_plain_step_reuses_the_cache(backend, monkeypatch):
    a, _ = _pair()
    opt = PMDLAMB(a, backend=backend)
    _grads(a, 0)
    opt.step()
    builds = []
    build = step_cache.StepCache._build
    monkeypatch.setattr(step_cache.StepCache, "_build", lambda *args, **kw: builds.append(1) or build(*args, **kw))
    for seed in range(3):
        _grads(a, seed)  # new gradient tensors: refreshed, not rebuilt
        opt.step()
        for p in a:
            p.grad.add_(1.0)  # written in place: nothing to refresh
        opt.step()
    assert builds == []
    opt.param_groups[0]["lr"] = 0.5  # a hyper-parameter: refreshed, not rebuilt
    opt.step()
    assert builds == []
    a[0].grad = None  # a lost gradient: rebuilt
    opt.step()
    assert builds == [1]


def test_new_gradient_tensors(backend):
    keep = []  # the old gradients stay alive, so the new ones get new addresses

    def event(opt, params):
        keep.extend(p.grad for p in params)
        _grads(params, 99)

    _check_event(backend, event, steps_after=1, cycle_length=3)


def test_a_changed_hyper_parameter(backend):
    def event(opt, params):
        if opt is not None:
            opt.param_groups[0]["lr"] = 0.2
            opt.param_groups[0]["betas"] = (0.5, 0.6)
            opt.param_groups[0]["weight_decay"] = 0.1

    _check_event(backend, event)


def test_a_hyper_parameter_changed_in_a_second_group(backend):
    a, b = _pair()
    opt = PMDLAMB([{"params": a[:2]}, {"params": a[2:]}], lr=0.05, backend=backend)
    twin = PMDLAMB([{"params": b[:2]}, {"params": b[2:]}], lr=0.05, backend=backend)
    for seed in range(3):
        for params, o in ((a, opt), (b, twin)):
            _grads(params, seed)
            o.step()
        opt.param_groups[1]["alpha"] = twin.param_groups[1]["alpha"] = 0.3 + seed
        opt.param_groups[1].update(eps=1e-3 * (seed + 1))
        twin.param_groups[1]["eps"] = 1e-3 * (seed + 1)
    _assert_same(a, b)


def test_a_changed_hyper_parameter_is_checked():
    a, _ = _pair()
    opt = PMDLAMB(a)
    _grads(a, 0)
    opt.step()
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.step()


def test_a_parameter_added(backend):
    extra = {}

    def event(opt, params):
        q = torch.nn.Parameter(torch.randn(6, generator=torch.Generator().manual_seed(5)))
        q.grad = torch.randn(6, generator=torch.Generator().manual_seed(6))
        extra[opt is None] = q
        params.append(q)
        if opt is not None:
            opt.add_param_group({"params": [q], "lr": 0.1})

    _check_event(backend, event)
    assert not torch.equal(extra[False].detach(), torch.randn(6, generator=torch.Generator().manual_seed(5)))


def test_a_parameter_appended_to_a_group(backend):
    def event(opt, params):
        q = torch.nn.Parameter(torch.randn(6, generator=torch.Generator().manual_seed(5)))
        q.grad = torch.randn(6, generator=torch.Generator().manual_seed(6))
        params.append(q)
        if opt is not None:
            opt.param_groups[0]["params"].append(q)

    _check_event(backend, event)


def test_a_parameter_removed_is_not_stepped(backend):
    a, _ = _pair()
    opt = PMDLAMB(a, lr=0.05, backend=backend)
    _grads(a, 0)
    opt.step()
    removed = opt.param_groups[0]["params"].pop(1)
    before = removed.detach().clone()
    _grads(a, 1)
    opt.step()
    assert torch.equal(removed.detach(), before)
    assert opt.state[removed]["step"].item() == 1


def test_a_parameter_that_loses_then_gains_its_gradient(backend):
    a, _ = _pair()
    opt = PMDLAMB(a, lr=0.05, backend=backend)
    _grads(a, 0)
    opt.step()
    a[2].grad = None
    before = a[2].detach().clone()
    _grads(a[:2] + a[3:], 1)
    opt.step()
    assert torch.equal(a[2].detach(), before) and opt.state[a[2]]["step"].item() == 1
    assert opt.state[a[0]]["step"].item() == 2

    def event(opt, params):
        params[1].grad = None

    _check_event(backend, event)


def test_a_parameter_that_gains_its_first_gradient(backend):
    def event(opt, params):
        params[0].grad = None

    a, b = _pair()
    opt = PMDLAMB(a, lr=0.05, backend=backend)
    a[0].grad = None
    _grads(a[1:], 0)
    opt.step()
    assert not opt.state[a[0]]
    _grads(a, 1)
    opt.step()
    assert opt.state[a[0]]["step"].item() == 1 and opt.state[a[1]]["step"].item() == 2


def test_a_changed_parameter_dtype(backend):
    def event(opt, params):
        for p in params[:2]:
            p.data = p.data.double()
            p.grad = None

    _check_event(backend, event)


def test_a_changed_gradient_dtype(backend):
    # grad_dtype lets a float32 gradient sit on a bfloat16 parameter: another bucket.
    def event(opt, params):
        for p in params[:2]:
            p.data = p.data.bfloat16()
            p.grad_dtype = torch.float32
            p.grad = None

    _check_event(backend, event)


def test_a_parameter_replaced_by_new_storage(backend):
    def event(opt, params):
        params[1].data = params[1].data.clone()

    _check_event(backend, event)


def test_a_gradient_with_other_strides(backend):
    # A transposed gradient of a contiguous parameter cannot be read flat: it must leave the kernels.
    def event(opt, params):
        params[1].grad = torch.randn(4, 3).t()

    a, b = _pair()
    opt = PMDLAMB(a, lr=0.05, backend=backend)
    _grads(a, 0)
    opt.step()
    for p, q in zip(a, b):
        q.data.copy_(p.data)
    twin = _fresh(opt, a, b)
    for params, o in ((a, opt), (b, twin)):
        _grads(params, 1)
        g = params[1].grad
        params[1].grad = torch.empty(4, 3).t().copy_(g)
        o.step()
    _assert_same(a, b)
    assert a[1].grad.stride() == (1, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_a_changed_device():
    def event(opt, params):
        for p in params:
            p.data = p.data.cuda()
            p.grad = None

    _check_event("auto", event)


def test_state_loaded_into_a_stepped_optimizer(backend):
    a, b = _pair()
    opt, other = PMDLAMB(a, lr=0.05, backend=backend), PMDLAMB(b, lr=0.05, backend=backend)
    for seed in range(2):
        _grads(a, seed)
        opt.step()
    _grads(b, 7)
    other.step()
    opt.load_state_dict(other.state_dict())  # new moments: the old ones must not be stepped
    for p, q in zip(a, b):
        p.data.copy_(q.data)
    for params, o in ((a, opt), (b, other)):
        _grads(params, 8)
        o.step()
    _assert_same(a, b)


def test_a_param_group_replaced_directly(backend):
    def event(opt, params):
        if opt is not None:
            opt.param_groups[0] = {**opt.param_groups[0], "lr": 0.3}

    _check_event(backend, event)


def test_lamb_with_clipping(backend):
    def event(opt, params):
        params[0].grad = None

    _check_event(backend, event, cls=LAMB)


def test_gradients_are_not_held_between_steps(backend):
    a, _ = _pair()
    opt = PMDLAMB(a, backend=backend, max_grad_norm=1.0)
    _grads(a, 0)
    opt.step()
    refs = [weakref.ref(p.grad) for p in a]
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert all(r() is None for r in refs)


def test_a_parameter_swapped_for_another_of_the_same_layout(backend):
    def event(opt, params):
        q = torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(5)))
        q.grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(6))
        old, params[1] = params[1], q
        if opt is not None:
            opt.param_groups[0]["params"][1] = q
            opt.state.pop(old)  # state_dict() cannot save the state of a parameter outside the groups

    _check_event(backend, event)


def test_a_gradient_that_changes_dtype_alone(backend):
    def any_gradient_dtype(params):  # grad_dtype None: a bfloat16 parameter takes a gradient of any dtype
        for p in params:
            p.grad_dtype = None

    def event(opt, params):
        for p in params[:2]:
            p.grad = p.grad.float()

    _check_event(backend, event, dtype=torch.bfloat16, prepare=any_gradient_dtype)


def test_a_parameter_swapped_for_another_on_the_same_storage(backend):
    # Same address, layout and gradient: only its identity (and so its state) tells it apart.
    def event(opt, params):
        old = params[1]
        params[1] = torch.nn.Parameter(old.detach())
        params[1].grad = old.grad
        if opt is not None:
            opt.param_groups[0]["params"][1] = params[1]
            opt.state.pop(old)

    _check_event(backend, event)


def test_a_step_is_an_in_place_write_to_autograd(backend):
    # Kernels that write through pointer tables must still advance the version counters that autograd
    # checks: a graph that saved a parameter before the step cannot be back-propagated after it.
    a, _ = _pair()
    opt = PMDLAMB(a, lr=0.05, backend=backend)
    for seed in range(3):  # the first step builds the cache, the others use it
        _grads(a, seed)
        with torch.enable_grad():
            loss = (a[0] * a[0]).sum()
        versions = [p._version for p in a]
        opt.step()
        assert all(p._version > v for p, v in zip(a, versions))
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_a_parameter_written_from_outside_hands_its_value_to_its_master(backend):
    # NOTE [master weights]: the step's own writes move the version counters too; only the others count.
    a, b = _pair(torch.bfloat16)
    opt = PMDLAMB(a, lr=0.05, backend=backend)
    for seed in range(2):
        _grads(a, seed)
        opt.step()
    with torch.no_grad():  # as model.load_state_dict writes a parameter
        a[1].copy_(torch.randn(SHAPES[1], generator=torch.Generator().manual_seed(5)))
    for p, q in zip(a, b):
        q.data.copy_(p.data)
    saved = opt.state_dict()
    saved["state"] = {k: dict(v) for k, v in saved["state"].items()}
    del saved["state"][1]["master"]  # the twin starts that master from the written value
    twin = PMDLAMB(b, lr=0.05, backend=backend)
    twin.load_state_dict(saved)
    for seed in (10, 11):
        _grads(a, seed)
        _grads(b, seed)
        opt.step()
        twin.step()
        _assert_same(a, b)
        for p, q in zip(a, b):
            assert torch.equal(opt.state[p]["master"], twin.state[q]["master"])
