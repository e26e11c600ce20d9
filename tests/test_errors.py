"""Bad input fails loudly, naming the argument, before anything is modified."""

import re
import warnings

import pytest
import torch

from largedet_kernels import LAMB, PMDLAMB, BackendUnavailableError, dispatch


def _p():
    return [torch.nn.Parameter(torch.randn(3))]


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(lr=-1e-3), "lr"),
        (dict(eps=-1.0), "eps"),
        (dict(betas=(1.0, 0.999)), "betas"),
        (dict(betas=(0.9, -0.1)), "betas"),
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=-1.0), "alpha"),
        (dict(cycle_length=0), "cycle_length"),
        (dict(cycle_length=2.5), "cycle_length"),
        (dict(weight_decay=-1e-4), "weight_decay"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(max_grad_norm=-1.0), "max_grad_norm"),
        (dict(backend="cudnn"), "backend"),
    ],
)
def test_bad_hyper_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PMDLAMB(_p(), **kwargs)


def test_bad_hyper_parameter_in_a_group():
    with pytest.raises(ValueError, match="weight_decay"):
        PMDLAMB([dict(params=_p()), dict(params=_p(), weight_decay=-1.0)])


def test_per_group_max_grad_norm_is_refused():
    with pytest.raises(ValueError, match="max_grad_norm"):
        PMDLAMB([dict(params=_p(), max_grad_norm=1.0)], max_grad_norm=2.0)


def test_lamb_bad_input():
    with pytest.raises(ValueError, match="max_grad_norm"):
        LAMB(_p(), max_grad_norm=0.0)
    with pytest.raises(RuntimeError, match="AMSGrad"):
        LAMB(_p(), amsgrad=True)


def test_sparse_gradient_is_refused_before_anything_changes():
    dense, sparse = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(5, 2))
    opt = PMDLAMB([dense, sparse])
    dense.grad = torch.randn(4)
    sparse.grad = torch.sparse_coo_tensor([[0, 3]], torch.randn(2, 2), (5, 2), check_invariants=True)
    before = dense.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(dense, before) and not opt.state


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64])
def test_complex_and_integer_parameters_are_refused(dtype):
    with pytest.raises(ValueError, match="complex|floating"):
        PMDLAMB([torch.zeros(3, dtype=dtype)])


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_explicit_gpu_backend_off_gpu_says_why(backend):
    with pytest.raises(BackendUnavailableError, match=f"backend='{backend}'.* runs on CUDA devices.* on meta"):
        PMDLAMB([torch.nn.Parameter(torch.zeros(3, device="meta"))], backend=backend)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without the extension")
def test_cuda_backend_on_cpu_says_how_to_get_it():
    with pytest.raises(BackendUnavailableError, match="runs on CUDA devices"):
        PMDLAMB(_p(), backend="cuda")


def test_a_parameter_twice_in_a_group_is_refused_before_torchs_warning():
    p = torch.nn.Parameter(torch.randn(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "duplicate parameters" warning would raise here
        with pytest.raises(ValueError, match="twice"):
            PMDLAMB([p, p])
        opt = PMDLAMB([torch.nn.Parameter(torch.randn(2))])
        with pytest.raises(ValueError, match="twice"):
            opt.add_param_group({"params": iter([p, p])})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", [PMDLAMB, LAMB])
@pytest.mark.parametrize(
    "key,value,message",
    [
        ("backend", "torch", "backend is a setting of the whole optimizer's constructor"),
        ("master_weights", False, "master_weights is a setting of the whole optimizer's constructor"),
        ("moment_dtype", torch.bfloat16, "moment_dtype is a setting of the whole optimizer's constructor"),
        ("momentum", 0.9, "unknown key 'momentum' in param group 1"),
        ("weight_decay_rate", 0.1, "unknown key 'weight_decay_rate' in param group 1"),
    ],
)  # fmt: skip
def test_a_param_group_key_that_would_be_ignored_is_refused(cls, key, value, message):
    group = {"params": _p(), key: value}
    with pytest.raises(ValueError, match=re.escape(message)):
        cls([{"params": _p()}, group])
    opt = cls(_p())
    with pytest.raises(ValueError, match=re.escape(message)):
        opt.add_param_group(group)
    assert len(opt.param_groups) == 1


def test_a_constructor_setting_in_a_group_is_taken_when_it_agrees():
    # ZeroRedundancyOptimizer puts its constructor's arguments into every group it builds.
    opt = LAMB([{"params": _p(), "backend": "torch", "moment_dtype": torch.float32, "set_grad_none": False}],
               backend="torch", set_grad_none=False)  # fmt: skip
    assert opt.backends == {torch.device("cpu"): "torch"}
    with pytest.raises(ValueError, match=re.escape("set_grad_none is a setting of the whole optimizer's constructor")):
        opt.add_param_group({"params": _p(), "set_grad_none": True})


def test_the_keys_of_torch_and_of_lr_schedulers_are_taken():
    named = [("w", torch.nn.Parameter(torch.randn(3)))]
    opt = PMDLAMB([{"params": [p for _, p in named], "param_names": ["w"], "initial_lr": 0.1, "lr_scale": 0.5}])
    assert opt.param_groups[0]["param_names"] == ["w"]


@pytest.mark.parametrize("cls", [PMDLAMB, LAMB])
@pytest.mark.parametrize(
    "key,instead",
    [("foreach", "backend="), ("fused", "backend="), ("capturable", "capturable as they are"),
     ("differentiable", "not differentiable")],
)  # fmt: skip
def test_torch_optims_implementation_keywords_say_what_to_use(cls, key, instead):
    with pytest.raises(TypeError, match=f"does not take torch.optim's {key}=: .*{re.escape(instead)}"):
        cls(_p(), **{key: True})
    with pytest.raises(TypeError, match=re.escape("got an unexpected keyword argument 'nesterov'")):
        cls(_p(), nesterov=True)


def test_auto_on_cpu_never_takes_the_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the Triton backend can run here, but only to be tested
    expected = "cpu" if dispatch.unavailable_reason("cpu", torch.device("cpu")) is None else "torch"
    assert dispatch.resolve("auto", torch.device("cpu")) == expected


@pytest.mark.parametrize("name", dispatch.BACKEND_NAMES)
def test_each_backend_module_names_itself_as_the_dispatcher_does(name):
    if name == "triton":
        pytest.importorskip("triton")
    assert dispatch.backend_module(name).NAME == name
