"""The step cache's native check (csrc/step_cache/step_cache.cpp, NOTE [step cache] in
largedet_kernels/step_cache.py): the Python check's verdicts on the same events, an extension of its own
that steps take without the CPU kernels (built on first use by a fused backend's step, never by the torch
backend's), and Python's exceptions for its errors.

tests/test_step_cache.py steps optimizers through both checks and compares the parameters; here each event
is put to the checks themselves, so a wrong verdict shows even where a needless rebuild would hide it."""

from pathlib import Path
from typing import Callable, List

import pytest
import torch
from torch.distributed.tensor import DTensor

from conftest import CPU_BACKENDS
from largedet_kernels import PMDLAMB, _extensions, step_cache
from largedet_kernels.sharding import local

SHAPES = [(5,), (3, 4), (257,), (2, 3, 2, 2)]
UNCHANGED, NEW_ADDRESSES, REBUILD = "unchanged", "new gradient addresses", "rebuild"
FUSED = [b for b in CPU_BACKENDS if b != "torch"]  # the backends that step CPU tensors with kernels here


@pytest.fixture(scope="module")
def native():
    module = step_cache._native(build=True)
    if module is None:
        pytest.skip("the step cache's native check cannot be built here")
    return module


def _params(dtype: torch.dtype = torch.float32) -> List[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def _grads(params, seed: int) -> None:
    """New gradients, DTensors placed as their parameters for DTensors."""
    from torch.distributed.tensor import distribute_tensor

    gen = torch.Generator().manual_seed(seed)
    for p in params:
        g = torch.randn(p.shape, generator=gen).to(p.dtype)
        p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g


def _verdict(module, monkeypatch, event: Callable, params: List[torch.Tensor], stepped: slice):
    """What the cache's check (the native one with ``module``, else the Python one) says of ``event`` after two
    steps of ``params[stepped]``: REBUILD, or (UNCHANGED or NEW_ADDRESSES, the positions written from outside)."""
    monkeypatch.setattr(step_cache, "_NATIVE", module)
    opt = PMDLAMB(params, lr=0.05, backend="torch")
    for seed in range(2):  # the cache is built, then used
        _grads(params[stepped], seed)
        opt.step()
    built = opt._step_cache._built
    assert (built.snapshot is not None) == (module is not None)
    event(opt, params)
    flat = [p for g in opt.param_groups for p in g["params"]]
    checked = built.check(flat)
    if checked is None:
        return REBUILD
    grads, new_addresses, written = checked
    assert [id(g) for g in grads] == [id(local(p.grad)) for p in flat if p.grad is not None]
    return NEW_ADDRESSES if new_addresses else UNCHANGED, written


def _same_verdicts(native, monkeypatch, event, make=_params, stepped=slice(None)):
    """The verdict of both checks on ``event``, the same."""
    verdicts = [_verdict(module, monkeypatch, event, make(), stepped) for module in (native, None)]
    assert verdicts[0] == verdicts[1], verdicts
    return verdicts[0]


def _written_in_place(opt, params):
    for p in params:
        p.grad.add_(1.0)


def _new_gradients(opt, params, kept=[]):  # noqa: B006  the old ones stay alive, so the new ones get new addresses
    kept.extend(p.grad for p in params)
    _grads(params, 99)


def _gradient_lost(opt, params):
    params[2].grad = None


def _parameter_on_new_storage(opt, params):
    params[1].data = params[1].data.clone()


def _parameter_layout_at_the_same_address(opt, params):
    params[1].data = params[1].data.as_strided((4, 3), (3, 1))


def _gradient_layout_at_the_same_address(opt, params):
    params[1].grad = params[1].grad.as_strided((3, 4), (1, 3))


def _parameter_dtype(opt, params):
    params[0].data = params[0].data.double()
    params[0].grad = params[0].grad.double()


def _gradient_dtype_alone(opt, params):
    params[1].grad_dtype = None  # a gradient of any dtype: int32 on the float32's storage
    params[1].grad = params[1].grad.view(torch.int32)


def _sparse_gradient(opt, params):
    params[0].grad = params[0].grad.to_sparse()


def _parameter_swapped_on_the_same_storage(opt, params):
    old = params[1]
    params[1] = opt.param_groups[0]["params"][1] = torch.nn.Parameter(old.detach())
    params[1].grad = old.grad
    opt.state.pop(old)


def _parameter_removed(opt, params):
    opt.param_groups[0]["params"].pop(1)


def _local_tensor_replaced(opt, params):
    params[1]._local_tensor = params[1]._local_tensor.clone()


@pytest.mark.parametrize("event, expected", [
    (_written_in_place, (UNCHANGED, [])),
    (_new_gradients, (NEW_ADDRESSES, [])),
    (_gradient_lost, REBUILD),
    (_parameter_on_new_storage, REBUILD),
    (_parameter_layout_at_the_same_address, REBUILD),
    (_gradient_layout_at_the_same_address, REBUILD),
    (_parameter_dtype, REBUILD),
    (_gradient_dtype_alone, REBUILD),
    (_sparse_gradient, REBUILD),
    (_parameter_swapped_on_the_same_storage, REBUILD),
    (_parameter_removed, REBUILD),
])  # fmt: skip
def test_the_verdicts_of_the_python_check(native, monkeypatch, event, expected):
    assert _same_verdicts(native, monkeypatch, event) == expected


def test_a_gradient_gained(native, monkeypatch):
    def event(opt, params):
        params[2].grad = torch.ones_like(params[2])

    assert _same_verdicts(native, monkeypatch, event, stepped=slice(0, 2)) == REBUILD


def test_the_parameters_written_from_outside(native, monkeypatch):
    # NOTE [master weights] in optimizer.py: bf16 parameters have masters, and the check watches their versions.
    def event(opt, params):
        with torch.no_grad():
            params[1].add_(1.0)
            params[3].copy_(torch.zeros_like(params[3]))

    assert _same_verdicts(native, monkeypatch, event, make=lambda: _params(torch.bfloat16)) == (UNCHANGED, [1, 3])


@pytest.fixture(scope="module")
def mesh():
    """A one-rank mesh: DTensors sharded over it hold all their values locally."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_available():
        pytest.skip("torch is built without torch.distributed")
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    if started:
        dist.destroy_process_group()


@pytest.mark.parametrize("event, expected", [
    (_written_in_place, (UNCHANGED, [])),
    (_new_gradients, (NEW_ADDRESSES, [])),
    (_gradient_lost, REBUILD),
    (_local_tensor_replaced, REBUILD),
])  # fmt: skip
def test_the_verdicts_on_dtensors(native, monkeypatch, mesh, event, expected):
    from torch.distributed.tensor import Shard, distribute_tensor

    def sharded():
        return [torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])) for p in _params()]

    assert _same_verdicts(native, monkeypatch, event, make=sharded) == expected


def _step(backend: str, request) -> PMDLAMB:
    """An optimizer of ``backend`` after one step."""
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    params = _params()
    opt = PMDLAMB(params, backend=backend)
    _grads(params, 0)
    opt.step()
    return opt


@pytest.fixture
def cpu_kernels_unavailable(monkeypatch):
    """The CPU kernels as on a GPU machine that never built them, the native check not yet resolved."""

    def unavailable(build: bool = True):
        if build:
            raise _extensions.ExtensionUnavailable("this test has no CPU kernels")
        return None

    monkeypatch.setattr(_extensions.CPU, "module", unavailable)
    monkeypatch.setattr(step_cache, "_NATIVE", step_cache._UNRESOLVED)
    return monkeypatch


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "cpu"])
def test_taken_without_the_cpu_kernels(native, cpu_kernels_unavailable, backend, request):
    opt = _step(backend, request)
    assert step_cache._NATIVE is native and opt._step_cache._built.snapshot is not None


@pytest.fixture
def unbuilt(monkeypatch, tmp_path):
    """The native check as if neither built ahead of time nor in the cache, and not yet resolved."""
    monkeypatch.setattr(_extensions.STEP_CACHE, "_found", None)
    monkeypatch.setattr(_extensions.STEP_CACHE, "_missed", False)
    monkeypatch.setattr(_extensions.STEP_CACHE, "aot_name", lambda: "largedet_kernels._not_built")
    monkeypatch.setattr(step_cache, "_NATIVE", step_cache._UNRESOLVED)
    monkeypatch.setenv("LARGEDET_KERNELS_CACHE", str(tmp_path / "cache"))
    return monkeypatch


@pytest.mark.skipif(not FUSED, reason="no fused backend steps CPU tensors here")
def test_built_on_first_use_by_a_fused_step_alone(native, unbuilt, request, tmp_path, capsys):
    import torch.utils.cpp_extension

    loads = []
    unbuilt.setattr(torch.utils.cpp_extension, "load", lambda **kwargs: loads.append(kwargs) or native)
    opt = _step("torch", request)  # the torch backend needs no compiler: it waits for none
    assert loads == [] and opt._step_cache._built.snapshot is None
    assert step_cache._NATIVE is step_cache._UNRESOLVED
    opt = _step(FUSED[0], request)
    (load,) = loads
    assert load["name"] == "largedet_kernels_step_cache", load
    assert [Path(s).name for s in load["sources"]] == ["step_cache.cpp"], load  # nothing of the CPU kernels
    assert step_cache._NATIVE is native and opt._step_cache._built.snapshot is not None
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "building" in line]
    assert line.startswith("largedet-kernels: building the step cache's native check once") and str(tmp_path) in line
    assert _step("torch", request)._step_cache._built.snapshot is not None  # built, the torch backend takes it


@pytest.mark.skipif(not FUSED, reason="no fused backend steps CPU tensors here")
def test_a_failed_build_leaves_the_python_check(unbuilt, request):
    import torch.utils.cpp_extension

    loads = []

    def load(**kwargs):
        loads.append(kwargs)
        raise RuntimeError("error: the compiler of this test refuses")

    unbuilt.setattr(torch.utils.cpp_extension, "load", load)
    for _ in range(2):  # tried once
        assert _step(FUSED[0], request)._step_cache._built.snapshot is None
    assert len(loads) == 1 and step_cache._NATIVE is None


def test_errors_are_python_exceptions(native):
    params = [torch.randn(3) for _ in range(2)]
    snapshot = torch.empty(2, 8, dtype=torch.int64)
    assert native.step_cache_snapshot(params, snapshot) is True
    for wrong in (torch.empty(3, 8, dtype=torch.int64), torch.empty(2, 8, dtype=torch.int32),
                  torch.empty(8, 2, dtype=torch.int64).t()):  # fmt: skip
        with pytest.raises(ValueError, match="the snapshot must be a contiguous CPU int64"):
            native.step_cache_snapshot(params, wrong)
        with pytest.raises(ValueError, match="the snapshot must be a contiguous CPU int64"):
            native.record_versions(params, wrong, [0])
    for position, error in ((2, IndexError), (-1, IndexError), (2**70, OverflowError), ("0", TypeError)):
        with pytest.raises(error):
            native.record_versions(params, snapshot, [position])
    with pytest.raises(TypeError, match="the parameters must be tensors"):
        native.step_cache_snapshot([*params, 1.0], torch.empty(3, 8, dtype=torch.int64))
    with pytest.raises(TypeError):
        native.step_cache_snapshot(tuple(params), snapshot)
    with pytest.raises(TypeError):
        native.check_step_cache(params, params, params)
    native.record_versions(params, snapshot, [1])
    # A snapshot of another parameter list is no error: the cache is rebuilt.
    assert native.check_step_cache(params[:1], params[:1], params[:1], snapshot) == (2, None, None)
    assert native.check_step_cache(params, params, params, snapshot) == (0, [], [])
