"""state_dict() / load_state_dict(): exact round trips, mid-cycle, across dtypes and devices."""

import pytest
import torch

from harness import SHAPES, make_params, roundtrip, train

from largedet_kernels import LAMB, PMDLAMB






@pytest.mark.parametrize("cls", [PMDLAMB, LAMB])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resumed_run_equals_uninterrupted_run(backend, cls, dtype):
    kwargs = dict(lr=0.05, backend=backend) | (dict(cycle_length=5) if cls is PMDLAMB else {})
    params = make_params(SHAPES, dtype, zero=(2,))
    opt = cls(params, **kwargs)
    gen = torch.Generator().manual_seed(7)
    train(opt, params, 3, gen)  # stop mid-cycle: t = 3 of T = 5

    saved_params = roundtrip([p.detach().clone() for p in params])
    saved_opt = roundtrip(opt.state_dict())
    gen_state = gen.get_state()
    train(opt, params, 6, gen)  # the uninterrupted run crosses the cycle boundary

    resumed = [torch.nn.Parameter(p) for p in saved_params]
    opt2 = cls(resumed, **kwargs)
    opt2.load_state_dict(saved_opt)
    gen.set_state(gen_state)
    train(opt2, resumed, 6, gen)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    for a, b in zip(params, resumed):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[a][key], opt2.state[b][key]), key


def test_loaded_state_keeps_float32_moments_and_does_not_alias(backend):
    params = make_params(SHAPES, torch.bfloat16)
    opt = PMDLAMB(params, backend=backend)
    train(opt, params, 2, torch.Generator().manual_seed(0))
    sd = opt.state_dict()
    opt2 = PMDLAMB([torch.nn.Parameter(p.detach().clone()) for p in params], backend=backend)
    opt2.load_state_dict(sd)
    for p in opt2.param_groups[0]["params"]:
        s = opt2.state[p]
        assert s["exp_avg"].dtype == s["exp_avg_sq"].dtype == s["step"].dtype == torch.float32
        assert s["step"].device == p.device
    src = opt.state[params[0]]["exp_avg"]
    assert opt2.state[opt2.param_groups[0]["params"][0]]["exp_avg"].data_ptr() != src.data_ptr()


def test_hyper_parameters_come_back(backend):
    params = make_params(SHAPES[:2], torch.float32)
    opt = PMDLAMB([dict(params=params[:1], lr=0.3, cycle_length=7), dict(params=params[1:])], backend=backend)
    opt2 = PMDLAMB([dict(params=params[:1]), dict(params=params[1:])], backend=backend)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["lr"] == 0.3 and opt2.param_groups[0]["cycle_length"] == 7


def test_shape_mismatch_is_an_error(backend):
    a = torch.nn.Parameter(torch.randn(3))
    opt = PMDLAMB([a], backend=backend)
    a.grad = torch.randn(3)
    opt.step()
    opt2 = PMDLAMB([torch.nn.Parameter(torch.randn(4))], backend=backend)
    with pytest.raises(ValueError, match="shape"):
        opt2.load_state_dict(opt.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_state_moves_across_devices():
    params = make_params(SHAPES, torch.float32, device="cuda")
    opt = PMDLAMB(params)
    train(opt, params, 2, torch.Generator().manual_seed(0))
    cpu_params = [torch.nn.Parameter(p.detach().cpu()) for p in params]
    opt_cpu = PMDLAMB(cpu_params)
    opt_cpu.load_state_dict(opt.state_dict())
    for p in cpu_params:
        assert all(t.device.type == "cpu" for t in opt_cpu.state[p].values())
