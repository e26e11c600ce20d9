"""PMD-LAMB and LAMB on PyTorch's distributed engines, on CPU ranks with gloo.

FSDP2 (``fully_shard``): each rank steps shards, the norms of NOTE [sharded norms] come
from one all-reduce per step, and the result equals one process stepping the whole
parameters, uneven and empty shards included. DDP and ZeroRedundancyOptimizer hand
whole tensors to the optimizer: N ranks equal one process with N× the batch.
"""

import copy
import os
import threading

import pytest
import torch
import torch.distributed as dist
from conftest import TRITON_TEST_BLOCK, TRITON_TEST_CHUNK
from ranks import run_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from largedet_kernels import LAMB, PMDLAMB

STEPS = 7  # over two ξ cycles of T = 3
BATCH = 6  # divides among 2 and 3 ranks


def _use_backend(backend: str) -> None:
    if backend == "triton":  # small chunks, as the conftest fixture sets them in the parent
        from largedet_kernels.backends import triton as triton_backend

        triton_backend.CHUNK, triton_backend.BLOCK = TRITON_TEST_CHUNK, TRITON_TEST_BLOCK


def _model() -> torch.nn.Module:
    # 7 and 2 rows do not divide among 2 or 3 ranks (uneven shards; on 3 ranks the second
    # layer's last shard is empty); the first bias starts at zero (a zero-norm tensor).
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2), torch.nn.Tanh(), torch.nn.Linear(2, 3)
    )
    torch.nn.init.zeros_(model[0].bias)
    return model


def _batch(step: int) -> torch.Tensor:
    return torch.randn(BATCH, 5, generator=torch.Generator().manual_seed(100 + step))


# PMDLAMB as the paper runs it, and LAMB with bias correction and clipping that bites.
OPTIMIZERS = {
    "PMDLAMB": lambda params, backend, **kw: PMDLAMB(params, lr=0.05, weight_decay=0.01, cycle_length=3,
                                                     backend=backend, **kw),
    "LAMB": lambda params, backend, **kw: LAMB(params, lr=0.05, weight_decay=0.01, max_grad_norm=1e-3,
                                               backend=backend, **kw),
}  # fmt: skip


class _CountAllReduce:
    """Counts torch.distributed.all_reduce calls inside the block."""

    def __enter__(self):
        self.calls, self._orig = 0, dist.all_reduce

        def counting(*args, **kwargs):
            self.calls += 1
            return self._orig(*args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def _fsdp_worker(rank, world, backend, offload=False):
    _use_backend(backend)
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for name, make in OPTIMIZERS.items():
        sharded, whole = _model(), _model()
        fully_shard(
            sharded, mesh=mesh, offload_policy=CPUOffloadPolicy(pin_memory=False) if offload else OffloadPolicy()
        )
        # Telemetry on (NOTE [trust-ratio records]): the records of shards are those of the whole tensors.
        opt = make(sharded.named_parameters(), backend, telemetry=True)
        ref = make(whole.named_parameters(), backend, telemetry=True)
        worst_x = worst_g = 0.0
        collectives = []
        for step in range(STEPS):
            x = _batch(step)
            sharded(x.chunk(world)[rank]).square().mean().backward()
            whole(x).square().mean().backward()  # the mean over ranks of per-rank means: the full-batch mean
            for p, q in zip(sharded.parameters(), whole.parameters()):
                worst_g = max(worst_g, (p.grad.full_tensor() - q.grad).abs().max().item())
            with _CountAllReduce() as count:
                opt.step()
            collectives.append(count.calls)
            ref.step()
            opt.zero_grad()
            ref.zero_grad()
            for p, q in zip(sharded.parameters(), whole.parameters()):
                scale = q.detach().abs().max().item() or 1.0
                worst_x = max(worst_x, (p.full_tensor() - q.detach()).abs().max().item() / scale)
        got, want = opt.trust_ratios(), ref.trust_ratios()
        worst_record = max(abs(getattr(got.records[n], f) - getattr(r, f)) / (abs(getattr(r, f)) or 1.0)
                           for n, r in want.records.items() for f in ("x_norm", "u_norm", "ratio"))  # fmt: skip
        records_ok = set(got.records) == set(want.records) and {r.step for r in got.records.values()} == {STEPS}
        locals_ = [tuple(p.to_local().shape) for p in sharded.parameters()]
        state = opt.state[next(sharded.parameters())]
        results[name] = dict(
            worst_x=worst_x, worst_g=worst_g, collectives=collectives, local_shapes=locals_,
            worst_record=worst_record, records_ok=records_ok, grad_norms=(got.grad_norm, want.grad_norm),
            state_is_dtensor=isinstance(state["exp_avg"], DTensor) and isinstance(state["exp_avg_sq"], DTensor),
            moved=max((p.full_tensor() - q).abs().max().item() for p, q in zip(sharded.parameters(),
                                                                                _model().parameters())),
        )  # fmt: skip
    return results


@pytest.mark.parametrize("world,offload", [(2, False), (3, False), (2, True)], ids=["2", "3", "2-cpu-offload"])
def test_fsdp2_shards_step_like_one_process(backend, world, offload):
    # With CPUOffloadPolicy the sharded parameters and the optimizer step live on the host
    # (what the cpu backend is for); here every tensor is on the host anyway.
    results = run_ranks(_fsdp_worker, world, backend, offload)
    if world == 3:  # the 2-row layer leaves rank 2 an empty shard, which still joins the collective
        assert results[2]["PMDLAMB"]["local_shapes"][2] == (0, 7)
    for per_rank in results:
        for name, r in per_rank.items():
            assert r["moved"] > 1e-3, name  # the parameters did train
            assert r["worst_g"] < 1e-6, (name, r)
            assert r["worst_x"] < 1e-5, (name, r)
            assert r["records_ok"] and r["worst_record"] < 1e-5, (name, r)
            if name == "LAMB":
                assert r["grad_norms"][0] == pytest.approx(r["grad_norms"][1], rel=1e-5), r["grad_norms"]
            assert r["state_is_dtensor"], name
            # One all-reduce per step for the trust-ratio norms; LAMB clips: one more for ‖g‖.
            assert r["collectives"] == [1 if name == "PMDLAMB" else 2] * STEPS, (name, r["collectives"])


def _fsdp_bf16_worker(rank, world, backend):
    """bf16 parameters with fp32 masters (NOTE [master weights]), sharded and whole, fed the same
    gradients: the masters are DTensors sharded like their parameters and follow the whole run's."""
    _use_backend(backend)
    mesh = init_device_mesh("cpu", (world,))
    sharded, whole = _model().to(torch.bfloat16), _model().to(torch.bfloat16)
    fully_shard(sharded, mesh=mesh)
    opt, ref = (PMDLAMB(m.parameters(), lr=0.05, weight_decay=0.01, cycle_length=3, backend=backend)
                for m in (sharded, whole))  # fmt: skip
    worst = 0.0
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(200 + step)
        for p, q in zip(sharded.parameters(), whole.parameters()):
            g = torch.randn(q.shape, generator=gen).to(torch.bfloat16)
            q.grad = g
            p.grad = distribute_tensor(g, mesh, p.placements, src_data_rank=None)
        opt.step()
        ref.step()
        for p, q in zip(sharded.parameters(), whole.parameters()):
            got, want = opt.state[p]["master"], ref.state[q]["master"]
            worst = max(worst, ((got.full_tensor() - want).abs().max() / want.abs().max()).item())
    masters = [opt.state[p]["master"] for p in sharded.parameters()]
    return dict(
        worst=worst,
        sharded_like_params=all(isinstance(m, DTensor) and m.placements == p.placements and m.dtype == torch.float32
                                for m, p in zip(masters, sharded.parameters())),
        params_are_rounded_masters=all(torch.equal(p.to_local(), m.to_local().to(torch.bfloat16))
                                       for m, p in zip(masters, sharded.parameters())),
        moved=max((p.full_tensor().float() - q.float()).abs().max().item()
                  for p, q in zip(sharded.parameters(), _model().parameters())),
    )  # fmt: skip


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_bf16_parameters_with_masters_step_like_one_process(backend, world):
    for r in run_ranks(_fsdp_bf16_worker, world, backend):
        assert r["sharded_like_params"] and r["params_are_rounded_masters"], r
        assert r["moved"] > 1e-3, r
        assert r["worst"] < 1e-6, r


def _state_dict_worker(rank, world, backend):
    _use_backend(backend)
    mesh = init_device_mesh("cpu", (world,))
    model = _model()
    fully_shard(model, mesh=mesh)
    opt = PMDLAMB(model.parameters(), lr=0.05, cycle_length=3, backend=backend)
    for step in range(2):
        model(_batch(step).chunk(world)[rank]).square().mean().backward()
        opt.step()
        opt.zero_grad()
    saved = copy.deepcopy(opt.state_dict())
    # As saved (sharded state), and as a whole-tensor checkpoint each rank loads in full.
    whole = copy.deepcopy(saved)
    for s in whole["state"].values():
        s["exp_avg"], s["exp_avg_sq"] = s["exp_avg"].full_tensor(), s["exp_avg_sq"].full_tensor()
    same = []
    for state_dict in (saved, whole):
        fresh = PMDLAMB(model.parameters(), lr=0.05, cycle_length=3, backend=backend)
        fresh.load_state_dict(state_dict)
        for p in model.parameters():
            a, b = opt.state[p], fresh.state[p]
            same.append(
                isinstance(b["exp_avg"], DTensor)
                and b["exp_avg"].placements == p.placements
                and torch.equal(a["exp_avg"].to_local(), b["exp_avg"].to_local())
                and torch.equal(a["exp_avg_sq"].to_local(), b["exp_avg_sq"].to_local())
                and torch.equal(a["step"], b["step"])
            )
    return same


def test_fsdp2_state_dict_loads_sharded_and_whole(backend):
    for same in run_ranks(_state_dict_worker, 3, backend):
        assert same and all(same)


def _replicated_worker(rank, world, backend):
    _use_backend(backend)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    p = torch.nn.Parameter(distribute_tensor(x, mesh, [Replicate()]))
    p.grad = distribute_tensor(torch.randn(4, 3), mesh, [Replicate()])
    q = torch.nn.Parameter(x.clone())
    q.grad = p.grad.to_local().clone()
    opt, ref = PMDLAMB([p], lr=0.1, backend=backend), PMDLAMB([q], lr=0.1, backend=backend)
    with _CountAllReduce() as count:
        opt.step()
    ref.step()
    return count.calls, torch.equal(p.to_local(), q.detach())


def test_replicated_dtensors_need_no_collective(backend):
    assert run_ranks(_replicated_worker, 2, backend) == [(0, True)] * 2


def _conv_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5)
    )


def _ddp_worker(rank, world, backend, zero):
    _use_backend(backend)
    kwargs = dict(lr=0.05, weight_decay=0.01, cycle_length=3, backend=backend)
    ddp, whole = DistributedDataParallel(_conv_model()), _conv_model()
    if zero:
        opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=PMDLAMB, **kwargs)
    else:
        opt = PMDLAMB(ddp.parameters(), **kwargs)
    ref = PMDLAMB(whole.parameters(), **kwargs)
    worst_x = worst_g = 0.0
    for step in range(STEPS):
        images = torch.randn(BATCH, 3, 6, 6, generator=torch.Generator().manual_seed(step))
        ddp(images.chunk(world)[rank]).square().mean().backward()
        whole(images).square().mean().backward()
        for p, q in zip(ddp.parameters(), whole.parameters()):
            worst_g = max(worst_g, (p.grad - q.grad).abs().max().item())
        opt.step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
        for p, q in zip(ddp.parameters(), whole.parameters()):
            worst_x = max(worst_x, ((p - q).abs().max() / q.abs().max()).item())
    moved = max((p - q).abs().max().item() for p, q in zip(ddp.parameters(), _conv_model().parameters()))
    return worst_x, worst_g, moved


@pytest.mark.parametrize("zero", [False, True], ids=["ddp", "zero"])
@pytest.mark.parametrize("world", [2, 3])
def test_ddp_ranks_equal_one_process_with_the_whole_batch(backend, world, zero):
    for worst_x, worst_g, moved in run_ranks(_ddp_worker, world, backend, zero):
        assert moved > 1e-4  # η·α = 6e-4 of ‖x‖ per step
        assert worst_g < 1e-6
        assert worst_x < 1e-5


def test_a_gradient_without_the_parameters_placements_is_refused():
    assert run_ranks(_mismatch_worker, 2) == [True, True]


def _mismatch_worker(rank, world):
    mesh = init_device_mesh("cpu", (world,))
    p = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Replicate()]))
    p.grad = torch.randn(4, 3)  # a plain tensor, as code that replaces .grad by hand might leave
    opt = PMDLAMB([p], backend="torch")
    try:
        opt.step()
    except RuntimeError as err:
        return "must be a DTensor" in str(err) and not opt.state[p]
    return False


def _pid_worker(rank, world, fail_on=None):
    if rank == fail_on:
        raise ValueError(f"rank {rank} fails as asked")
    if fail_on is not None:
        threading.Event().wait()  # for good, as a rank may wait on a failed one
    return os.getpid()


def test_the_ranks_take_one_call_after_another_and_a_failure_starts_new_ones():
    # tests/ranks.py: a second call runs on the same processes; after one fails, on new ones, the old ones ended.
    first = run_ranks(_pid_worker, 2)
    assert len(set(first)) == 2 and run_ranks(_pid_worker, 2) == first
    with pytest.raises(AssertionError, match="rank 1 fails as asked"):
        run_ranks(_pid_worker, 2, 1)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in first)
    assert not set(run_ranks(_pid_worker, 2)) & set(first)
    with pytest.raises(AssertionError, match="Can't pickle"):  # said at once, not at the deadline
        run_ranks(_unpicklable_worker, 2)


def _unpicklable_worker(rank, world):
    return lambda: rank
