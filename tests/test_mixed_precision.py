"""Mixed precision on every backend: fp32 master weights, bf16 moments and stochastic rounding
(NOTE [master weights] in largedet_kernels/optimizer.py, NOTE [stochastic rounding] in
largedet_kernels/rounding.py), against the float64 reference and in a model that only trains with them."""


import pytest
import torch

from conftest import CPU_BACKENDS
from harness import FP32_MATH_RTOL, SHAPES, make_params, random_grads, roundtrip, run_against_reference, train

from largedet_kernels import LAMB, PMDLAMB, reference, rounding

ZERO = (2, 6)
KWARGS = dict(lr=0.05, weight_decay=0.01, alpha=0.3, cycle_length=3)

SETTINGS = {
    "masters": dict(),
    "masters-bf16-moments": dict(moment_dtype=torch.bfloat16),
    "bf16-moments": dict(master_weights=False, moment_dtype=torch.bfloat16),
    "stochastic": dict(stochastic_rounding=True, seed=12345),
    "stochastic-bf16-moments": dict(stochastic_rounding=True, moment_dtype=torch.bfloat16),
}


@pytest.mark.parametrize("grad_dtype", [None, torch.float32], ids=["same-grads", "fp32-grads"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("setting", SETTINGS.values(), ids=SETTINGS.keys())
def test_against_the_reference(backend, setting, dtype, grad_dtype):
    if dtype == torch.float16 and setting.get("stochastic_rounding"):
        setting = {**setting, "master_weights": "auto"}  # fp16 keeps its masters under stochastic rounding
    params = make_params(SHAPES, dtype, zero=ZERO)
    opt = PMDLAMB(params, **KWARGS, backend=backend, **setting)
    run_against_reference(opt, steps=5, rtol=FP32_MATH_RTOL, ulps=1, resync=True, grad_dtype=grad_dtype)
    state = opt.state[params[0]]
    assert ("master" in state) == (setting.get("master_weights", "auto") == "auto" and
                                   not (setting.get("stochastic_rounding") and dtype == torch.bfloat16))
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == setting.get("moment_dtype", torch.float32)


def test_lamb_with_masters_against_the_reference(backend):
    params = make_params(SHAPES, torch.bfloat16, zero=ZERO)
    opt = LAMB(params, lr=0.01, backend=backend, moment_dtype=torch.bfloat16)
    run_against_reference(opt, steps=4, rtol=FP32_MATH_RTOL, ulps=1, resync=True)


def test_the_trust_ratio_reads_the_master(backend):
    # One tensor whose bf16 value is all zeros but whose master is not: ‖master‖ sets the ratio.
    p = torch.nn.Parameter(torch.zeros(64, dtype=torch.bfloat16))
    opt = PMDLAMB([p], lr=0.1, alpha=1.0, backend=backend)
    p.grad = torch.ones_like(p)
    opt.step()  # ‖x‖ = 0: ratio 1, the master starts moving
    master = opt.state[p]["master"]
    master.copy_(torch.full_like(master, 1e-3))
    before = master.clone()
    p.grad = torch.ones_like(p)
    opt.step()
    u = opt.state[p]["exp_avg"] / (opt.state[p]["exp_avg_sq"] + 1e-6).sqrt() + 5e-4 * before
    want = before - 0.1 * before.norm() / u.norm() * u
    torch.testing.assert_close(master, want, rtol=1e-5, atol=0)
    assert torch.equal(p.detach(), master.to(torch.bfloat16))


def test_a_master_laid_out_unlike_its_parameter_is_stepped_right(backend):
    # A master that came back from a checkpoint in another layout: the fused kernels address element i at
    # offset i of every stream, so such a tensor goes to the torch backend (chunk_plan.kernel_friendly).
    params = make_params([(3, 5), (64, 3, 3, 3), (7,)], torch.bfloat16)
    opt = PMDLAMB(params, **KWARGS, backend=backend)
    run_against_reference(opt, steps=1, rtol=FP32_MATH_RTOL, ulps=1, resync=True)
    saved = opt.state_dict()
    for i in (0, 1):
        master = saved["state"][i]["master"]
        saved["state"][i] = {**saved["state"][i], "master": master.transpose(0, 1).contiguous().transpose(0, 1)}
    opt.load_state_dict(saved)
    assert not any(opt.state[p]["master"].is_contiguous() for p in params[:2])
    run_against_reference(opt, steps=3, rtol=FP32_MATH_RTOL, ulps=1, resync=True)


# --- NOTE [stochastic rounding] in largedet_kernels/rounding.py


def test_stochastic_rounding_is_unbiased(backend, monkeypatch):
    # 2^18 equal elements with equal gradients all take the same fp32 update, far below bf16's step:
    # rounded to nearest they would all stay, rounded stochastically their mean follows the update.
    if backend == "triton":  # the interpreter's own chunks: the small ones of the tests take minutes here
        from largedet_kernels.backends import triton as triton_backend

        monkeypatch.setattr(triton_backend, "CHUNK", 1 << 14)
        monkeypatch.setattr(triton_backend, "BLOCK", 1 << 10)
    x0 = 1.0 + 2.0**-7
    p = torch.nn.Parameter(torch.full((1 << 18,), x0, dtype=torch.bfloat16))
    opt = PMDLAMB([p], lr=0.01, weight_decay=0.0, backend=backend, stochastic_rounding=True)
    p.grad = torch.ones_like(p)
    opt.step()
    exact = x0 - 0.01 * 0.012 * x0  # ratio ‖x‖/‖u‖ with u the same in every element: x0/|u|, times u
    ulp = 2.0**-7
    moved_up = (p.detach().float() > x0).float().mean().item()
    assert p.detach().float().unique().tolist() == [x0 - ulp, x0]  # the two neighbours of the exact value
    fraction = (x0 - exact) / ulp  # the probability of rounding down
    sigma = (fraction * (1 - fraction) / p.numel()) ** 0.5
    mean = p.detach().double().mean().item()
    assert abs(mean - exact) < 5 * sigma * ulp, (mean, exact, sigma * ulp)
    assert moved_up == 0.0
    # Rounded to nearest, nothing would have moved: the test sees the difference.
    nearest = torch.full((1 << 18,), exact, dtype=torch.float32).to(torch.bfloat16)
    assert abs(nearest.double().mean().item() - exact) > 20 * sigma * ulp


def _stochastic_run(backend, seed=7, threads=None, steps=3):
    params = make_params([(4099,), (3, 77), (0,), (64, 3, 3, 3)], torch.bfloat16, zero=(1,))
    opt = PMDLAMB(params, lr=0.01, cycle_length=3, backend=backend, stochastic_rounding=True, seed=seed)
    gen = torch.Generator().manual_seed(1)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for _ in range(steps):
            for p, g in zip(params, random_grads(params, gen)):
                p.grad = g
            opt.step()
    finally:
        torch.set_num_threads(before)
    return [p.detach().clone() for p in params]


def test_stochastic_rounding_follows_the_reference_bits(backend):
    """The reference, given each step's starting values, rounds with the same dither: all but the rare
    elements whose fp32 and float64 values straddle a rounding point come out bit-identical."""
    params = make_params([(4099,), (3, 77), (64, 3, 3, 3)], torch.bfloat16)
    opt = PMDLAMB(params, lr=0.01, cycle_length=3, backend=backend, stochastic_rounding=True, seed=99)
    gen = torch.Generator().manual_seed(2)
    group = opt.param_groups[0]
    kwargs = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=5e-4, alpha=0.012, cycle_length=3)
    differ = total = 0
    for t in range(1, 4):
        grads = random_grads(params, gen)
        start = [(p.detach().double(), opt.state[p]["exp_avg"].double() if opt.state[p] else torch.zeros(p.shape,
                  dtype=torch.float64), opt.state[p]["exp_avg_sq"].double() if opt.state[p] else torch.zeros(p.shape,
                  dtype=torch.float64)) for p in params]  # fmt: skip
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for p, g, (x, m, v) in zip(params, grads, start):
            reference.pmd_lamb_step(x, g.double(), m, v, t, **kwargs)
            want = reference.store_parameter(x, torch.bfloat16, stochastic_rounding=True, seed=group["seed"], t=t)
            got = p.detach()
            differ += (got != want).sum().item()
            total += got.numel()
            assert ((got.double() - want.double()).abs() <= 2.0**-7 * want.double().abs().clamp_min(1e-30)).all()
    assert differ <= 1e-3 * total, f"{differ} of {total} elements rounded otherwise than the reference"


def test_stochastic_rounding_is_reproducible(backend):
    a, b = _stochastic_run(backend), _stochastic_run(backend)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    other_seed = _stochastic_run(backend, seed=8)
    assert any(not torch.equal(x, y) for x, y in zip(a, other_seed))


def test_stochastic_rounding_does_not_depend_on_the_thread_count():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("needs the CPU extension")
    one, two = _stochastic_run("cpu", threads=1), _stochastic_run("cpu", threads=2)
    assert all(torch.equal(x, y) for x, y in zip(one, two))


def test_every_backend_rounds_with_the_same_dither():
    results = {backend: _stochastic_run(backend) for backend in CPU_BACKENDS}
    base = results.pop("torch")
    for backend, got in results.items():
        for x, y in zip(base, got):
            differ = (x != y).sum().item()
            assert differ <= 1e-3 * max(1, x.numel()), (backend, differ)
            assert ((x.double() - y.double()).abs() <= 2.0**-7 * x.double().abs().clamp_min(1e-30)).all(), backend


def test_the_dither_is_the_hash_of_seed_step_and_index():
    # Independent of rounding.py's own arithmetic: mix32 written out in Python integers.
    def mix32(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x1B873593) & 0xFFFFFFFF
        return x ^ (x >> 16)

    seed, t = 0xDEADBEEF, 17
    key = mix32(mix32(seed) ^ t)
    assert rounding.step_key(seed, torch.tensor(float(t))).item() == key
    index = torch.tensor([0, 1, 2**31, 2**32 + 5, 3 * 2**40 + 1])
    want = [mix32(mix32((i & 0xFFFFFFFF) ^ key) ^ (i >> 32)) >> 16 for i in index.tolist()]
    assert rounding.dither(torch.tensor(key), index).tolist() == want
    # And the rounding: bits + dither, the low 16 bits dropped.
    y = torch.tensor([1.0 + 2.0**-9, -3.0e-3, float("inf"), float("nan"), 0.0])
    got = rounding.stochastic_bf16(y, torch.tensor(key)).view(torch.int16).to(torch.int64) & 0xFFFF
    bits = y.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    for i in range(len(y)):
        if torch.isnan(y[i]):
            assert got[i].item() == 0x7FC0
        else:
            assert got[i].item() == ((bits[i].item() + want[i]) & 0xFFFFFFFF) >> 16


# The bf16 scenario: a model that trains in fp32 and stalls in bf16 without help.


def _scenario(backend, dtype, lr, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    ).to(dtype)
    gen = torch.Generator().manual_seed(1)
    inputs = 8 * torch.randn(256, 64, generator=gen)
    labels = (inputs @ torch.randn(64, 10, generator=gen)).argmax(1)

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.nn.functional.cross_entropy(model(inputs.to(dtype)), labels)

    start = [p.detach().clone() for p in model.parameters()]
    opt = PMDLAMB(model.parameters(), lr=lr, backend=backend, **options)
    first = loss().item()
    for _ in range(20):
        loss().backward()
        opt.step()
        opt.zero_grad()
    changed = sum((p.detach() != q).sum().item() for p, q in zip(model.parameters(), start))
    return first, loss().item(), changed / sum(q.numel() for q in start)


# Triton's interpreter takes ten minutes over the scenario's 100 steps; its kernels, like the others, are judged
# against the reference above.
@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if b in CPU_BACKENDS])
def test_the_bf16_scenario_trains_with_masters_or_stochastic_rounding(backend):
    first, fp32, _ = _scenario(backend, torch.float32, lr=0.13)
    assert fp32 < first - 0.3  # the fp32-parameter run trains
    _, masters, changed = _scenario(backend, torch.bfloat16, lr=0.13)
    assert abs(masters - fp32) < 0.01 * fp32 and changed > 0.95, (masters, fp32, changed)
    _, stochastic, _ = _scenario(backend, torch.bfloat16, lr=0.13, stochastic_rounding=True)
    assert abs(stochastic - fp32) < 0.03 * fp32, (stochastic, fp32)
    # Without either, most updates round away: a third of the elements move, the loss lags.
    _, plain, changed = _scenario(backend, torch.bfloat16, lr=0.13, master_weights=False)
    assert plain > 1.05 * fp32 and changed < 0.5, (plain, fp32, changed)
    # At lr 1e-3, torch's usual default, the stall is complete.
    _, frozen, changed = _scenario(backend, torch.bfloat16, lr=1e-3, master_weights=False)
    assert changed < 0.01 and abs(frozen - first) < 1e-3 * first, (frozen, first, changed)


# Checkpoints






@pytest.mark.parametrize("setting", SETTINGS.values(), ids=SETTINGS.keys())
def test_a_resumed_run_equals_the_uninterrupted_one(backend, setting):
    params = make_params(SHAPES, torch.bfloat16, zero=ZERO)
    opt = PMDLAMB(params, **KWARGS, backend=backend, **setting)
    gen = torch.Generator().manual_seed(7)
    train(opt, params, 2, gen)
    saved_params, saved_opt = roundtrip([p.detach().clone() for p in params]), roundtrip(opt.state_dict())
    gen_state = gen.get_state()
    train(opt, params, 3, gen)
    resumed = [torch.nn.Parameter(p) for p in saved_params]
    opt2 = PMDLAMB(resumed, **KWARGS, backend=backend, **setting)
    opt2.load_state_dict(saved_opt)
    gen.set_state(gen_state)
    train(opt2, resumed, 3, gen)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
        assert opt.state[a].keys() == opt2.state[b].keys()
        for key, value in opt.state[a].items():
            assert torch.equal(value, opt2.state[b][key]) and value.dtype == opt2.state[b][key].dtype, key


def test_a_checkpoint_loads_on_every_other_backend():
    backends = CPU_BACKENDS
    for saver in backends:
        params = make_params(SHAPES, torch.bfloat16, zero=ZERO)
        opt = PMDLAMB(params, **KWARGS, backend=saver, moment_dtype=torch.bfloat16)
        train(opt, params, 2, torch.Generator().manual_seed(3))
        saved = roundtrip(opt.state_dict())
        results = {}
        for loader in backends:
            copy = [torch.nn.Parameter(p.detach().clone()) for p in params]
            opt2 = PMDLAMB(copy, **KWARGS, backend=loader, moment_dtype=torch.bfloat16)
            opt2.load_state_dict(saved)
            for p, q in zip(params, copy):
                assert all(torch.equal(opt.state[p][k], opt2.state[q][k]) for k in opt.state[p]), (saver, loader)
            train(opt2, copy, 2, torch.Generator().manual_seed(4))
            results[loader] = [opt2.state[q]["master"].clone() for q in copy]
        for loader, masters in results.items():  # every loader goes on to the same place
            for a, b in zip(results[saver], masters):
                # bf16 moments may round a tie apart on two backends: one element then moves by 2^-8 of its update
                torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-4)


def test_a_checkpoint_without_masters_starts_them_from_the_parameters(backend):
    params = make_params(SHAPES, torch.bfloat16, zero=ZERO)
    opt = PMDLAMB(params, **KWARGS, backend=backend, master_weights=False)
    train(opt, params, 2, torch.Generator().manual_seed(3))
    saved = roundtrip(opt.state_dict())
    assert not any("master" in s for s in saved["state"].values())
    copy = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = PMDLAMB(copy, **KWARGS, backend=backend)
    opt2.load_state_dict(saved)
    train(opt2, copy, 0, None)
    for q in copy:
        q.grad = torch.zeros_like(q)
    opt2.found_inf = torch.ones(())  # a skipped step: state is set up, nothing moves
    opt2.step()
    del opt2.found_inf
    for p, q in zip(params, copy):
        if p.numel():
            assert torch.equal(opt2.state[q]["master"], p.detach().float())
    # And the other way: a checkpoint with masters into an optimizer that keeps none drops them.
    opt3 = PMDLAMB([torch.nn.Parameter(p.detach().clone()) for p in params], **KWARGS, backend=backend,
                   master_weights=False)  # fmt: skip
    opt3.load_state_dict(roundtrip(opt2.state_dict()))
    assert not any("master" in s for s in opt3.state.values())


@pytest.mark.parametrize("saved_dtype,loaded_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_a_changed_moment_dtype_converts_on_load(backend, saved_dtype, loaded_dtype):
    params = make_params(SHAPES, torch.float32, zero=ZERO)
    opt = PMDLAMB(params, **KWARGS, backend=backend, moment_dtype=saved_dtype)
    train(opt, params, 2, torch.Generator().manual_seed(3))
    copy = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = PMDLAMB(copy, **KWARGS, backend=backend, moment_dtype=loaded_dtype)
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    for p, q in zip(params, copy):
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt2.state[q][key].dtype == loaded_dtype
            assert torch.equal(opt2.state[q][key], opt.state[p][key].to(loaded_dtype))
    train(opt2, copy, 2, torch.Generator().manual_seed(4))
    assert all(opt2.state[q]["exp_avg"].dtype == loaded_dtype for q in copy)


# Bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(master_weights="yes"), "master_weights"),
        (dict(master_weights=1), "master_weights"),
        (dict(moment_dtype=torch.float16), "moment_dtype"),
        (dict(moment_dtype="bf16"), "moment_dtype"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**32), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(stochastic_rounding=1), "stochastic_rounding"),
        (dict(master_weights=True, stochastic_rounding=True), "master_weights"),
    ],
)
def test_bad_mixed_precision_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PMDLAMB([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))], **kwargs)


def test_settings_that_would_be_silently_ignored_are_refused():
    with pytest.raises(ValueError, match="float16 parameter"):
        PMDLAMB([torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))], master_weights=False,
                stochastic_rounding=True)  # fmt: skip
    with pytest.raises(ValueError, match="float64"):
        PMDLAMB([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))], moment_dtype=torch.bfloat16)
    opt = PMDLAMB([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="stochastic_rounding"):
        opt.add_param_group(dict(params=[torch.nn.Parameter(torch.zeros(2))], stochastic_rounding=True))
