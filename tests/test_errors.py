"""Bad input fails loudly, naming the argument, before anything is modified."""

import pytest
import torch

from largedet_kernels import LAMB, PMDLAMB, BackendUnavailableError


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


def test_a_parameter_twice_in_a_group_is_refused():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="twice"):
        PMDLAMB([p, p])


def test_auto_on_cpu_never_takes_the_triton_interpreter(monkeypatch):
    from largedet_kernels import dispatch

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the Triton backend can run here, but only to be tested
    expected = "cpu" if dispatch.unavailable_reason("cpu", torch.device("cpu")) is None else "torch"
    assert dispatch.resolve("auto", torch.device("cpu")) == expected
