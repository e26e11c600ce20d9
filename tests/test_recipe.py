"""The LargeDet recipe: linear scaling, warm-up and step decay, param groups, grouped SyncBN."""

import math

import pytest
import torch
import torch.distributed as dist
from ranks import run_ranks

from largedet_kernels import PMDLAMB
from largedet_kernels.recipe import WarmupMultiStepLR, biases, convert_sync_batchnorm, norms, param_groups, scaled_lr


def test_scaled_lr():
    # The paper: lr 0.02 for batch 16, hence 0.4 for batch 320 (Sec. 4.2).
    assert scaled_lr(0.02, 16, 320) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        scaled_lr(0.02, 0, 32)


def _lrs(scheduler, opt, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return out


def test_warmup_then_absolute_milestones():
    opt = PMDLAMB([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupMultiStepLR(opt, milestones=[6, 8], gamma=0.1, warmup_factor=0.25, warmup_iters=4)
    expected = [0.25, 0.4375, 0.625, 0.8125, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    assert _lrs(sched, opt, 10) == pytest.approx(expected)


def test_chains_with_torch_schedulers():
    opt = PMDLAMB([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ours = WarmupMultiStepLR(opt, milestones=[3], gamma=0.5, warmup_factor=0.5, warmup_iters=2)
    halving = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    chained = torch.optim.lr_scheduler.ChainedScheduler([ours, halving])
    got = _lrs(chained, opt, 5)
    warm = [0.5, 0.75, 1.0, 0.5, 0.5]
    assert got == pytest.approx([w * 0.9**i for i, w in enumerate(warm)])


def test_param_groups_exempt_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2), torch.nn.LayerNorm(2))  # fmt: skip
    model(torch.zeros(1, 3, 5, 5))
    model[0].weight.requires_grad_(False)
    groups = param_groups(model, weight_decay=5e-4)
    decay, exempt = groups
    assert decay["weight_decay"] == 5e-4 and exempt["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[3].weight)}
    assert {id(p) for p in exempt["params"]} == {
        id(p) for p in (model[0].bias, model[1].weight, model[1].bias, model[3].bias, model[4].weight, model[4].bias)
    }
    PMDLAMB(groups)  # usable as is


def test_param_groups_exclude_norms_from_adaptation_apart_from_decay():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    # LAMB's authors: norms out of both, biases keep their decay and their trust ratio.
    groups = param_groups(model, weight_decay=0.01, no_decay=norms, no_adapt=norms)
    assert [(g["weight_decay"], g.get("adapt", True)) for g in groups] == [(0.01, True), (0.0, False)]
    assert {id(p) for p in groups[1]["params"]} == {id(model[1].weight), id(model[1].bias)}
    assert {id(p) for p in groups[0]["params"]} == {id(p) for i in (0, 2) for p in model[i].parameters()}
    groups = param_groups(model, weight_decay=0.01, no_adapt=biases)  # no group for an empty combination
    assert [(g["weight_decay"], g.get("adapt", True), len(g["params"])) for g in groups] == [
        (0.01, True, 2), (0.0, True, 1), (0.0, False, 3)]  # fmt: skip
    opt = PMDLAMB(groups, backend="torch")
    assert [g["adapt"] for g in opt.param_groups] == [True, True, False]


def _syncbn_worker(rank, world, group_size):
    model = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1), torch.nn.BatchNorm2d(2)), group_size)
    bn = model[1]
    group = bn.process_group
    ranks = list(range(world)) if group is None else dist.get_process_group_ranks(group)
    return type(bn).__name__, tuple(ranks)


@pytest.mark.parametrize("group_size,expected", [(2, [(0, 1), (0, 1), (2, 3), (2, 3)]), (None, [(0, 1, 2, 3)] * 4)])
def test_sync_batchnorm_groups(group_size, expected):
    # torch's SyncBatchNorm refuses CPU tensors in forward: here the conversion and which ranks share statistics.
    assert run_ranks(_syncbn_worker, 4, group_size) == [("SyncBatchNorm", e) for e in expected]


# gamma 0: lr 0 from the milestone on, in the closed and the chained form.


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(3 + 2 * i, generator=gen)) for i in range(2)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


def _expected(base, n, milestones, gamma, warmup_factor, warmup_iters):
    """lr at each iteration from the definition: linear warm-up, then ×gamma at each milestone passed."""
    out = []
    for t in range(n):
        warm = warmup_factor + (1 - warmup_factor) * t / warmup_iters if t < warmup_iters else 1.0
        out.append(base * warm * gamma ** sum(t >= m for m in milestones))
    return out


@pytest.mark.parametrize(
    "milestones,warmup_factor,warmup_iters",
    [([2], 1 / 3, 0), ([3, 5], 0.25, 4), ([0], 0.5, 2)],
    ids=["no-warmup", "milestone-in-warmup", "milestone-0"],
)
def test_gamma_zero(milestones, warmup_factor, warmup_iters):
    a = _params()
    opt = PMDLAMB(a, lr=0.7)
    sched = WarmupMultiStepLR(opt, milestones, gamma=0.0, warmup_factor=warmup_factor, warmup_iters=warmup_iters)
    want = _expected(0.7, 8, milestones, 0.0, warmup_factor, warmup_iters)
    assert want[-1] == 0.0 and any(w > 0 for w in want) == (milestones != [0])
    got = _lrs(sched, opt, 8)
    assert got == pytest.approx(want, abs=0, rel=1e-12)
    assert sched._get_closed_form_lr() == [0.0]
    # lr 0 steps nothing.
    before = [p.detach().clone() for p in a]
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a, before))


def test_gamma_zero_chained():
    opt = PMDLAMB(_params(), lr=1.0)
    ours = WarmupMultiStepLR(opt, milestones=[3], gamma=0.0, warmup_factor=0.5, warmup_iters=2)
    decay = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    got = _lrs(torch.optim.lr_scheduler.ChainedScheduler([ours, decay]), opt, 6)
    want = [f * 0.9**t for t, f in enumerate(_expected(1.0, 6, [3], 0.0, 0.5, 2))]
    assert got == pytest.approx(want, abs=0, rel=1e-12)


@pytest.mark.parametrize("gamma", [-0.1, math.nan, math.inf, 10**400])
def test_bad_gamma_is_refused(gamma):
    with pytest.raises(ValueError, match="gamma"):
        WarmupMultiStepLR(PMDLAMB(_params()), [2], gamma=gamma)
