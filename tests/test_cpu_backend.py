"""The cpu backend (csrc/cpu/): tensors across its chunks against the float64 reference,
the same bits for 1 and N threads, and the fallback when the extension is not built.
The small-tensor cases run for every backend in test_against_reference.py."""

import re
import warnings

import pytest
import torch

from conftest import CPU_BACKENDS
from harness import FP32_MATH_RTOL, check_halves_equal_step, make_params, run_against_reference
from largedet_kernels import LAMB, PMDLAMB, BackendUnavailableError, _extensions, dispatch
from largedet_kernels.backends import cpu

pytestmark = pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="needs the CPU extension (built ahead of time or "
                                "on first use): " + str(dispatch.unavailable_reason("cpu", torch.device("cpu"))))

# Around the 65536-element chunks: one chunk less one, exactly one, one more, several with a tail.
BIG = [(cpu.CHUNK - 1,), (cpu.CHUNK,), (cpu.CHUNK + 1,), (3 * cpu.CHUNK + 5,), (64, 33, 3, 3), (7,), (0,), (1,)]


@pytest.mark.parametrize(
    "dtype,rtol,ulps",
    [(torch.float64, 1e-10, 0), (torch.float32, FP32_MATH_RTOL, 1), (torch.bfloat16, FP32_MATH_RTOL, 1),
     (torch.float16, FP32_MATH_RTOL, 1)],
    ids=["fp64", "fp32", "bf16", "fp16"],
)
@pytest.mark.parametrize(
    "options", [dict(), dict(max_grad_norm=1.0, bias_correction=True, eps_inside_sqrt=False)], ids=["paper", "clip"]
)
def test_chunked_tensors_against_the_reference(dtype, rtol, ulps, options):
    params = make_params(BIG, dtype, zero=(1,))
    opt = PMDLAMB(params, lr=0.05, weight_decay=0.01, alpha=0.3, cycle_length=3, backend="cpu", **options)
    run_against_reference(opt, steps=7, rtol=rtol, ulps=ulps, resync=dtype != torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_gradients_of_low_precision_parameters(dtype):
    # Gradients of the parameter dtype, given once as they are and once widened to float32:
    # the kernels widen them anyway, so the two runs must agree bit for bit.
    runs = []
    for widen in (False, True):
        params = make_params(BIG, dtype)
        opt = PMDLAMB(params, cycle_length=3, max_grad_norm=1.0, backend="cpu")
        gen = torch.Generator().manual_seed(5)
        for _ in range(3):
            for p in params:
                g = torch.randn(p.shape, generator=gen).to(dtype)
                p.grad_dtype = torch.float32 if widen else dtype
                p.grad = g.float() if widen else g
            opt.step()
        runs.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_lamb_with_chunked_tensors():
    params = make_params(BIG, torch.float32)
    opt = LAMB([dict(params=params[:3], weight_decay=0.0), dict(params=params[3:])], lr=0.01, backend="cpu")
    run_against_reference(opt, steps=4, rtol=FP32_MATH_RTOL, ulps=1, resync=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_same_bits_for_one_thread_and_many(dtype):
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(4, threads)):
            torch.set_num_threads(n)
            params = make_params(BIG, dtype)
            opt = PMDLAMB(params, cycle_length=3, max_grad_norm=1.0, backend="cpu")
            gen = torch.Generator().manual_seed(7)
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen).to(dtype)
                opt.step()
            results.append([p.detach().clone() for p in params] + [opt.state[p]["exp_avg_sq"] for p in params])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_halves_equal_one_step_across_chunks():
    check_halves_equal_step("cpu", torch.float32, "cpu", shapes=BIG)


def test_auto_warns_once_at_the_callers_line_and_takes_torch_without_the_extension(monkeypatch, tmp_path):
    # Not built ahead of time, nothing in the cache, no compiler: the build on first use is refused.
    monkeypatch.setattr(_extensions.CPU, "_found", None)
    monkeypatch.setattr(_extensions.CPU, "_missed", False)
    monkeypatch.setattr(_extensions.CPU, "aot_name", lambda: "largedet_kernels._not_built")
    monkeypatch.setenv("LARGEDET_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    dispatch._warn_slow_cpu_path.cache_clear()
    params = make_params([(5,), (3, 2)], torch.float32)
    for p in params:
        p.grad = torch.randn_like(p)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PMDLAMB(params, backend="auto").step()
        PMDLAMB(params, backend="auto").step()  # once
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert caught[0].filename == __file__  # the user's line, not one of the package or of torch.optim
    assert re.search(r"torch backend because the CPU extension is unavailable: .*no C\+\+ compiler.*g\+\+",
                     str(caught[0].message)), caught[0].message  # fmt: skip
    with pytest.raises(BackendUnavailableError, match=r"backend='cpu' is unavailable: .*no C\+\+ compiler"):
        PMDLAMB(params, backend="cpu").step()
    dispatch._warn_slow_cpu_path.cache_clear()


def test_auto_takes_the_cpu_backend_on_cpu():
    assert dispatch.resolve("auto", torch.device("cpu")) == "cpu"
