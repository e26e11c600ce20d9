"""Trust-ratio telemetry (NOTE [trust-ratio records]): every backend records what the float64 reference computes,
in bucket order whichever part of a bucket steps a tensor, nothing on a skipped step, nothing when off."""

import copy
import math
import statistics

import pytest
import torch

from harness import FP32_MATH_RTOL, SHAPES, assert_records, make_params, random_grads, run_against_reference

from largedet_kernels import LAMB, PMDLAMB
from largedet_kernels.telemetry import Record


def _named_groups(params):
    # Bounds that bind from above and below, a group without the trust ratio, and the rest; the names are those a
    # detector's modules give. ‖x‖/‖u‖ is about 1 for these tensors.
    names = [f"{module}.{i}" for i, module in enumerate(["backbone"] * 3 + ["neck"] * 2 + ["roi_heads"] * 3)]
    return [
        {"params": params[0:2], "param_names": names[0:2], "trust_ratio_bounds": (0.1, 0.5)},
        {"params": params[2:4], "param_names": names[2:4], "trust_ratio_bounds": (2.0, 4.0)},
        {"params": params[4:6], "param_names": names[4:6], "adapt": False},
        {"params": params[6:], "param_names": names[6:]},
    ], names


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
def test_records_are_the_references(every_backend, dtype, rtol):
    params = make_params(SHAPES, dtype, zero=(2,))  # param 2 is zero: ratio 1; param 5 is empty
    groups, names = _named_groups(params)
    opt = PMDLAMB(groups, lr=0.1, cycle_length=3, backend=every_backend, telemetry=True)
    fp64 = dtype == torch.float64
    for step in range(3):  # each step's records, the reference's taken over from the optimizer's state
        ref = run_against_reference(opt, steps=1, rtol=1e-10 if fp64 else FP32_MATH_RTOL, ulps=1, seed=step)
        assert_records(opt, ref, names, rtol)
        if step == 0:
            assert opt.trust_ratios().records["backbone.2"].ratio == 1.0  # ‖x‖ = 0
    records = opt.trust_ratios().records
    # The controls show in the ratios: bounds that bind; the group without adaptation and the empty tensor take 1.
    for name, (lo, hi) in (("backbone.0", (0.1, 0.5)), ("backbone.1", (0.1, 0.5)), ("neck.3", (2.0, 4.0))):
        r = records[name]
        assert r.ratio == pytest.approx(min(max(r.x_norm / r.u_norm, lo), hi), rel=rtol), name
    assert records["neck.3"].ratio == 2.0 and records["neck.3"].x_norm / records["neck.3"].u_norm < 2.0
    assert all(records[n].ratio == 1.0 for n in ("neck.4", "roi_heads.5"))
    assert records["neck.4"].x_norm / records["neck.4"].u_norm != pytest.approx(1.0)


def test_records_of_a_split_bucket_are_in_bucket_order(backend):
    # A transposed parameter leaves the fused kernels for the torch backend (chunk_plan.split): each part
    # records its own tensors, read back in the bucket's order.
    params = make_params(SHAPES, torch.float32)
    params[3] = torch.nn.Parameter(torch.randn(33, 17).t())
    groups, names = _named_groups(params)
    opt = PMDLAMB(groups, lr=0.1, weight_decay=0.01, backend=backend, telemetry=True)
    ref = run_against_reference(opt, steps=2, rtol=FP32_MATH_RTOL, ulps=1, resync=True)
    assert_records(opt, ref, names, 1e-5)


def test_lamb_records_with_the_global_gradient_norm(every_backend):
    params = make_params(SHAPES, torch.float64)
    opt = LAMB(params, lr=0.01, max_grad_norm=1.0, backend=every_backend, telemetry=True)
    gen = torch.Generator().manual_seed(5)
    grads = random_grads(params, gen)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    got = opt.trust_ratios()
    want = math.sqrt(sum(g.double().square().sum().item() for g in grads))
    assert got.grad_norm == pytest.approx(want, rel=1e-12)
    assert set(got.records) == set(params) and all(r.step == 1 for r in got.records.values())
    # Without clipping the step computes no ‖g‖, and none is reported.
    assert PMDLAMB(params, backend=every_backend, telemetry=True).trust_ratios().grad_norm is None


def test_a_skipped_step_records_nothing_and_says_so(every_backend):
    params = make_params(SHAPES[:4], torch.float32)
    opt = PMDLAMB(params, lr=0.1, backend=every_backend, telemetry=True)
    gen = torch.Generator().manual_seed(2)
    for p, g in zip(params, random_grads(params, gen)):
        p.grad = g
    opt.step()
    first = opt.trust_ratios()
    assert not first.skipped and {r.step for r in first.records.values()} == {1}
    # GradScaler's found_inf, as it hands it to optimizers that unscale in their step.
    opt.grad_scale, opt.found_inf = torch.ones(()), torch.ones(())
    for p, g in zip(params, random_grads(params, gen)):
        p.grad = g
    opt.step()
    skipped = opt.trust_ratios()
    assert skipped.skipped and skipped.records == first.records
    opt.found_inf = torch.zeros(())
    opt.step()
    after = opt.trust_ratios()
    assert not after.skipped and {r.step for r in after.records.values()} == {2}
    assert all(after.records[p] != first.records[p] for p in params)


def test_a_non_finite_tensor_records_nan(every_backend):
    params = make_params(SHAPES[:3], torch.float32)
    opt = PMDLAMB(params, backend=every_backend, telemetry=True)
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad[0] = math.inf
    opt.step()
    records = opt.trust_ratios().records
    assert math.isnan(records[params[1]].ratio) and not math.isfinite(records[params[1]].u_norm)
    assert math.isfinite(records[params[1]].x_norm)
    assert all(math.isfinite(records[p].ratio) for p in (params[0], params[2]))


def test_off_nothing_is_recorded_and_the_step_is_the_same(every_backend):
    runs = {}
    for telemetry in (False, True):
        params = make_params(SHAPES, torch.float32)
        opt = PMDLAMB(params, lr=0.1, max_grad_norm=1.0, backend=every_backend, telemetry=telemetry)
        gen = torch.Generator().manual_seed(3)
        for _ in range(2):
            for p, g in zip(params, random_grads(params, gen)):
                p.grad = g
            opt.step()
        buckets = [e.bucket for e in opt._step_cache._built.entries]
        assert all((b.records is not None) == telemetry for b in buckets)
        runs[telemetry] = params, opt
    assert all(torch.equal(a, b) for a, b in zip(runs[False][0], runs[True][0]))  # bit for bit
    with pytest.raises(RuntimeError, match="telemetry=True"):
        runs[False][1].trust_ratios()


def test_by_module_and_scalars():
    records = {"backbone.a": 0.5, "backbone.b": 2.0, "backbone.c.d": 1.0, "neck.a": 3.0, "rpn_head.a": math.nan}
    from largedet_kernels.telemetry import TrustRatios

    got = TrustRatios({n: Record(7, 1.0, 1.0, r) for n, r in records.items()}, grad_norm=4.0, skipped=False)
    stats = got.by_module()
    assert stats["backbone"] == dict(min=0.5, median=statistics.median([0.5, 2.0, 1.0]), max=2.0)
    assert stats["neck"] == dict(min=3.0, median=3.0, max=3.0)
    assert all(math.isnan(v) for v in stats["rpn_head"].values())  # a NaN shows
    assert got.by_module(prefixes=["backbone.c", "neck"]) == {"backbone.c": dict(min=1.0, median=1.0, max=1.0),
                                                             "neck": dict(min=3.0, median=3.0, max=3.0)}  # fmt: skip
    assert set(got.by_module(depth=2)) == {"backbone.a", "backbone.b", "backbone.c", "neck.a", "rpn_head.a"}
    scalars = got.scalars()
    assert scalars["trust_ratio/backbone/max"] == 2.0 and scalars["trust_ratio/grad_norm"] == 4.0
    assert len(scalars) == 3 * 3 + 1
    with pytest.raises(ValueError, match="field"):
        got.by_module(field="step")
    unnamed = TrustRatios({torch.zeros(1): Record(1, 1.0, 1.0, 1.0)}, grad_norm=None, skipped=False)
    with pytest.raises(ValueError, match="param_names"):
        unnamed.by_module()


def test_the_setting_is_checked_copied_and_refused_in_a_group():
    params = make_params(SHAPES[:2], torch.float32)
    with pytest.raises(ValueError, match="Invalid telemetry"):
        PMDLAMB(params, telemetry=1)
    with pytest.raises(ValueError, match="telemetry is a setting of the whole optimizer's constructor"):
        PMDLAMB([{"params": params, "telemetry": True}])
    opt = PMDLAMB(params, backend="torch", telemetry=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    copied = copy.deepcopy(opt)  # with copies of the parameters, without their gradients
    assert copied.telemetry
    for p in copied.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    copied.step()
    assert {r.step for r in copied.trust_ratios().records.values()} == {2}
    # An optimizer pickled before the setting existed gets it off.
    state = opt.__getstate__()
    del state["telemetry"]
    old = PMDLAMB.__new__(PMDLAMB)
    old.__setstate__(state)
    assert old.telemetry is False


def test_a_compiled_step_is_refused_with_telemetry():
    params = make_params(SHAPES[:2], torch.float32)
    opt = PMDLAMB(params, backend="torch", telemetry=True)
    for p in params:
        p.grad = torch.randn_like(p)
    with pytest.raises(Exception, match="telemetry=True records the steps of eager mode"):
        torch.compile(opt.step, fullgraph=True)()


def test_the_kernels_move_the_same_vectors_with_records(emulated_cuda):
    # The CUDA kernels with telemetry on: the same launches, blocks and counted 16-byte loads and stores as off (the
    # records are four scalar stores per tensor, by one thread of its first block of pass 2), the same bits.
    counts, results = {}, {}
    for telemetry in (False, True):
        params = make_params([(1,), (7,), (8,), (4096,), (16385,), (64, 3, 3, 3)], torch.float32)
        opt = PMDLAMB(params, lr=0.05, weight_decay=0.01, max_grad_norm=1.0, backend="cuda", telemetry=telemetry)
        gen = torch.Generator().manual_seed(1)
        for _ in range(2):
            for p, g in zip(params, random_grads(params, gen)):
                p.grad = g
            emulated_cuda.reset_counters()
            opt.step()
        counts[telemetry], results[telemetry] = emulated_cuda.counters(), params
    assert counts[True] == counts[False] and counts[True]["launches"] == 3, counts
    assert all(torch.equal(a, b) for a, b in zip(results[False], results[True]))
