"""The Triton backend's mixed precision: fp32 masters, bf16 moments and stochastic rounding (NOTE [bf16 bits] in
largedet_kernels/triton_kernels.py), against the float64 reference and, bit for bit, against the torch backend."""

import pytest
import torch

from conftest import TRITON_TEST_BLOCK as BLOCK, TRITON_TEST_CHUNK as CHUNK
from harness import FP32_MATH_RTOL, SHAPES, make_bucket, make_params, random_grads, run_against_reference, ulp

from largedet_kernels import LAMB, PMDLAMB, rounding

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from largedet_kernels import triton_kernels  # noqa: E402

# SHAPES, a tensor of three chunks, and many small ones; two of them zero.
MIXED_SHAPES = SHAPES + [(2 * CHUNK + BLOCK + 3,)] + [(n % 37 + 1,) for n in range(0, 100, 7)]
ZERO = (2, 6)
# About 10k elements, so that one element in a thousand is 10.
ROUNDING_SHAPES = [(4099,), (64, 3, 3, 3), (2999,), (2 * CHUNK + BLOCK + 3,), (7,), (1,), (0,), (3, 5)]
SEED = 0xDEADBEEF  # above 2**31: the table's float64 seed must reach the hash as uint32


def _optimizer(dtype, **options):
    params = make_params(MIXED_SHAPES, dtype, zero=ZERO)
    return params, PMDLAMB(params, lr=0.05, weight_decay=0.01, alpha=0.3, cycle_length=3, backend="triton", **options)


@pytest.mark.parametrize("grad_dtype", [None, torch.float32], ids=["own-grads", "fp32-grads"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_masters_against_reference(triton_backend, dtype, grad_dtype):
    params, opt = _optimizer(dtype)
    run_against_reference(opt, steps=3, rtol=FP32_MATH_RTOL, ulps=1, resync=True, grad_dtype=grad_dtype)
    assert all(opt.state[p]["master"].dtype == torch.float32 for p in params)


@pytest.mark.parametrize("dtype,master_weights", [(torch.float32, "auto"), (torch.bfloat16, "auto"),
                                                  (torch.bfloat16, False)],
                         ids=["fp32", "bf16-masters", "bf16-no-masters"])  # fmt: skip
def test_bf16_moments_against_reference(triton_backend, dtype, master_weights):
    # The harness forms the update from the stored moments: pass 1's Σu² must come from them too.
    params, opt = _optimizer(dtype, moment_dtype=torch.bfloat16, master_weights=master_weights)
    run_against_reference(opt, steps=3, rtol=FP32_MATH_RTOL, ulps=1, resync=True)
    assert all(opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16 for p in params)
    assert all(("master" in opt.state[p]) == (dtype == torch.bfloat16 and master_weights == "auto") for p in params)


def test_stochastic_rounding_against_reference(triton_backend):
    params, opt = _optimizer(torch.bfloat16, stochastic_rounding=True, seed=SEED)
    run_against_reference(opt, steps=3, rtol=FP32_MATH_RTOL, ulps=1, resync=True)
    assert not any("master" in opt.state[p] for p in params)  # 'auto' keeps none under stochastic rounding


def _rounded_run(backend, cls, stochastic_rounding=True, **options):
    """bf16 parameters without masters over 3 steps of updates near half a bf16 step (η·α = 2e-3)."""
    params = make_params(ROUNDING_SHAPES, torch.bfloat16, zero=(3,), seed=5)
    opt = cls(params, backend=backend, stochastic_rounding=stochastic_rounding, seed=SEED, **options)
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        for p, g in zip(params, random_grads(params, gen)):
            p.grad = g
        opt.step()
    return torch.cat([p.detach().flatten() for p in params])


def _assert_nearly_bit_equal(got, want):
    """All bits equal but for a few elements, each one bf16 step apart: fp32 math may differ in its last
    bit between backends, and a dither can fall on either side of that bit."""
    differ = got.view(torch.int16) != want.view(torch.int16)
    assert differ.float().mean().item() < 1e-3, f"{int(differ.sum())} of {got.numel()} elements differ"
    step = ulp(torch.maximum(got.double().abs(), want.double().abs()), torch.bfloat16)
    assert bool(((got.double() - want.double()).abs()[differ] <= step[differ]).all())


MODES = {
    "pmd-lamb": (PMDLAMB, dict(lr=0.02, alpha=0.1, weight_decay=0.01, cycle_length=3)),
    # No trust ratio and no clipping: each element's update is its own, so no sum can differ with the chunking.
    "elementwise": (LAMB, dict(lr=2e-3, weight_decay=0.0, use_nvlamb=False, max_grad_norm=None)),
}


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_stochastic_rounding_matches_the_torch_backend(triton_backend, monkeypatch, mode):
    cls, options = mode
    want = _rounded_run("torch", cls, **options)
    got = _rounded_run("triton", cls, **options)
    _assert_nearly_bit_equal(got, want)
    nearest = _rounded_run("torch", cls, **options, master_weights=False, stochastic_rounding=False)
    # Rounding stochastically changed the bits of many elements: the comparison above compares something.
    assert (nearest.view(torch.int16) != want.view(torch.int16)).float().mean().item() > 0.05

    # NOTE [stochastic rounding]: the dither of an element is a function of its index in its tensor.
    monkeypatch.setattr(triton_backend, "CHUNK", 4 * CHUNK)
    monkeypatch.setattr(triton_backend, "BLOCK", 2 * BLOCK)
    other_chunks = _rounded_run("triton", cls, **options)
    _assert_nearly_bit_equal(other_chunks, want)
    if cls is LAMB:
        assert torch.equal(other_chunks.view(torch.int16), got.view(torch.int16))


@triton.jit
def _parameter_bits_kernel(y_ptr, index_ptr, out_ptr, key, stochastic, n, STOCHASTIC: tl.constexpr,
                           BLOCK: tl.constexpr):  # fmt: skip
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    index = tl.load(index_ptr + offs, mask=mask, other=0)
    bits = triton_kernels._parameter_value(y, index, stochastic != 0, key.to(tl.uint32), tl.bfloat16, STOCHASTIC)
    tl.store(out_ptr + offs, bits, mask=mask)


def _special_values():
    """fp32 values at every edge of rounding to bf16: ties to even either way, one bit off a tie, ±0, ±inf,
    NaNs of both signs and payloads, the largest finite (rounds to inf), subnormals; and random values."""
    bits = [0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0xBF808000, 0xBF818000, 0x00000000, 0x80000000,
            0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000,
            0x00000001, 0x00008000, 0x00018000, 0x807FFFFF, 0x00800000]  # fmt: skip
    special = torch.tensor(bits, dtype=torch.int64)
    special = torch.where(special >= 1 << 31, special - (1 << 32), special).to(torch.int32).view(torch.float32)
    gen = torch.Generator().manual_seed(7)
    scales = torch.exp2(torch.randint(-140, 120, (2000,), generator=gen).float())
    return torch.cat([special, torch.randn(2000, generator=gen) * scales])


def _bits(t):
    return t.view(torch.int16).to(torch.int64) & 0xFFFF


def test_parameter_rounding_bits(triton_backend):
    """NOTE [bf16 bits]: to nearest as torch rounds, and stochastically as rounding.py does, for indices past
    2**32 too. Interpreted, so to nearest is the integer spelling (test_triton.py checks the compiled cvt)."""
    assert triton_kernels.INTERPRETED
    y = _special_values()
    n = y.numel()
    key_tensor = rounding.step_key(SEED, torch.tensor(7.0))
    key = int(key_tensor)
    out = torch.empty(n, dtype=torch.bfloat16)
    block = triton.next_power_of_2(n)
    arange = torch.arange(n, dtype=torch.int64)

    # Torch's CPU casts make a NaN 0xFFFF (0x7FC0 for a 0-d tensor): the kernels' is rounding.h's.
    nan = torch.isnan(y)
    for stochastic_kernel in (False, True):  # the plain store, and a tensor not asking for stochastic rounding
        _parameter_bits_kernel[(1,)](y, arange, out, key, 0, n, STOCHASTIC=stochastic_kernel, BLOCK=block)
        assert torch.equal(_bits(out), torch.where(nan, 0x7FC0, _bits(y.to(torch.bfloat16)))), stochastic_kernel

    _parameter_bits_kernel[(1,)](y, arange, out, key, 1, n, STOCHASTIC=True, BLOCK=block)
    assert torch.equal(_bits(out), torch.where(nan, 0x7FC0, _bits(rounding.stochastic_bf16(y, key_tensor))))

    for start in ((1 << 32) - 1000, 5 << 32, (1 << 40) + 3):
        index = start + arange
        _parameter_bits_kernel[(1,)](y, index, out, key, 1, n, STOCHASTIC=True, BLOCK=block)
        y_bits = y.view(torch.int32).to(torch.int64) & rounding.MASK32
        want = (y_bits + rounding.dither(key_tensor, index)) >> 16 & 0xFFFF
        want = torch.where(nan, 0x7FC0, want)
        assert torch.equal(_bits(out), want), start
    # Indices 2**32 apart share their low half: only the high half tells their dithers apart.
    assert not torch.equal(rounding.dither(key_tensor, arange), rounding.dither(key_tensor, arange + (5 << 32)))


def _state(opt, params):
    return [p.detach().clone() for p in params], [{k: v.clone() for k, v in opt.state[p].items()} for p in params]


def _assert_same_state(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x.view(torch.int16), y.view(torch.int16))
    for i, (s, t) in enumerate(zip(a[1], b[1])):
        assert s.keys() == t.keys()
        for key in s:
            assert torch.equal(s[key], t[key]), f"{key} of param {i}"


SKIPPED = {"masters": {}, "masters-bf16-moments": dict(moment_dtype=torch.bfloat16),
           "stochastic": dict(stochastic_rounding=True, seed=SEED)}  # fmt: skip


@pytest.mark.parametrize("options", SKIPPED.values(), ids=SKIPPED.keys())
def test_a_skipped_step_changes_nothing(triton_backend, options):
    # NOTE [skipped steps]: params, masters, moments and steps as they were; the next step is the one skipped.
    params, opt = _optimizer(torch.bfloat16, **options)
    twin_params, twin = _optimizer(torch.bfloat16, **options)
    gen = torch.Generator().manual_seed(8)
    grads = [random_grads(params, gen) for _ in range(3)]
    for ps, o in ((params, opt), (twin_params, twin)):
        for p, g in zip(ps, grads[0]):
            p.grad = g.clone()
        o.step()
    assert all(("master" in opt.state[p]) == ("stochastic_rounding" not in options) for p in params)
    before = _state(opt, params)
    for p, g in zip(params, grads[1]):
        p.grad = g
    opt.found_inf = torch.ones(())
    opt.step()
    del opt.found_inf
    _assert_same_state(_state(opt, params), before)
    for ps, o in ((params, opt), (twin_params, twin)):
        for p, g in zip(ps, grads[2]):
            p.grad = g.clone()
        o.step()
    _assert_same_state(_state(opt, params), _state(twin, twin_params))


def test_with_masters_the_parameters_are_not_read(triton_backend):
    # Both passes take x from the master: NaNs written into the parameters change nothing, and are overwritten.
    # Written through .data, which the version counters do not see: a write they see hands its value to the
    # master (NOTE [master weights]).
    params, opt = _optimizer(torch.bfloat16)
    twin_params, twin = _optimizer(torch.bfloat16)
    gen = torch.Generator().manual_seed(9)
    for step in range(2):
        grads = random_grads(params, gen)
        if step == 1:
            for p in params:
                p.data.fill_(float("nan"))
        for ps, o in ((params, opt), (twin_params, twin)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            o.step()
    _assert_same_state(_state(opt, params), _state(twin, twin_params))


def test_a_misaligned_parameter_with_a_master(triton_backend):
    # NOTE [vector and scalar paths]: pass 1 moves the aligned master, pass 2 the misaligned parameter as well.
    odd = torch.nn.Parameter(torch.randn(2 * CHUNK + 9).to(torch.bfloat16)[1:])
    assert odd.data_ptr() % 16 != 0
    params = [odd, *make_params([(CHUNK + 5,), (7,)], torch.bfloat16)]
    opt = PMDLAMB(params, lr=0.05, cycle_length=3, backend="triton")
    run_against_reference(opt, steps=2, rtol=FP32_MATH_RTOL, ulps=1, resync=True)
    assert opt.state[odd]["master"].data_ptr() % 16 == 0


def test_halves_with_masters_and_bf16_moments_equal_one_step(triton_backend):
    # NOTE [sharded norms]: begin_step, then finish with the bucket's own sums, is step, bit for bit.
    group = PMDLAMB([torch.zeros(1)], lr=0.05, weight_decay=0.01, cycle_length=3).param_groups[0]
    params = make_params([(CHUNK + 5,), (7,), (0,), (3, 5)], torch.bfloat16, zero=(3,))
    buckets = [make_bucket([p.detach().clone() for p in params], group) for _ in range(2)]
    for b in buckets:
        b.masters = [p.float() for p in b.params]
        b.exp_avgs = [torch.zeros_like(p) for p in b.params]
        b.exp_avg_sqs = [torch.zeros_like(p) for p in b.params]
    gen = torch.Generator().manual_seed(10)
    for _ in range(3):
        grads = random_grads(params, gen, dtype=torch.float32)
        for b in buckets:
            b.grads = [g.clone() for g in grads]
        triton_backend.step(buckets[0], None, None)
        pending = triton_backend.begin_step(buckets[1], None, None)
        pending.finish(pending.sums)
    for name in ("params", "masters", "exp_avgs", "exp_avg_sqs", "steps"):
        a, b = (getattr(bucket, name) for bucket in buckets)
        assert all(torch.equal(s, t) for s, t in zip(a, b)), name
    assert not torch.equal(buckets[0].masters[0], params[0].float())  # the masters were stepped
    assert all(torch.equal(x, m.to(torch.bfloat16)) for x, m in zip(buckets[0].params, buckets[0].masters))
