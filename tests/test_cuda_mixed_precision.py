"""Mixed precision in the CUDA C++ kernels, run on the CPU through the emulator of tests/cuda_emulator:
fp32 master weights (NOTE [master weights] in largedet_kernels/optimizer.py), moments stored in bf16
(NOTE [stored moments] in csrc/pmd_lamb.cuh) and stochastic rounding (NOTE [stochastic rounding] in
largedet_kernels/rounding.py), against the float64 reference and, bit for bit, against the torch backend."""

import pytest
import torch

from cuda_emulator import TEST_SCHEDULES
from harness import FP32_MATH_RTOL, SHAPES, make_bucket, make_params, random_grads, run_against_reference, ulp

from largedet_kernels import PMDLAMB
from largedet_kernels.backends import chunk_plan, cuda

pytestmark = pytest.mark.emulator

SMALL_CHUNK = 256  # elements per block: a multiple of kILP, as the kernels take, and small so that tensors cross chunks
OPTIONS = dict(lr=0.05, weight_decay=0.01, alpha=0.3, cycle_length=3, max_grad_norm=1.0)

# (PMDLAMB's options with the parameters' dtype, the gradients' dtype or None for the parameters').
SETTINGS = {
    "bf16-masters": (dict(dtype=torch.bfloat16), None),
    "fp16-masters": (dict(dtype=torch.float16), None),
    "bf16-masters-fp32-grads": (dict(dtype=torch.bfloat16), torch.float32),
    "fp16-masters-fp32-grads": (dict(dtype=torch.float16), torch.float32),
    "fp16-masters-bias-correction": (dict(dtype=torch.float16, bias_correction=True, eps_inside_sqrt=False), None),
    "fp32-bf16-moments": (dict(dtype=torch.float32, moment_dtype=torch.bfloat16), None),
    "bf16-masters-bf16-moments": (dict(dtype=torch.bfloat16, moment_dtype=torch.bfloat16), torch.float32),
    "fp16-masters-bf16-moments": (dict(dtype=torch.float16, moment_dtype=torch.bfloat16), None),
    "bf16-bf16-moments": (dict(dtype=torch.bfloat16, master_weights=False, moment_dtype=torch.bfloat16), None),
    "bf16-stochastic": (dict(dtype=torch.bfloat16, stochastic_rounding=True), None),
    "bf16-stochastic-fp32-grads-bf16-moments": (
        dict(dtype=torch.bfloat16, stochastic_rounding=True, moment_dtype=torch.bfloat16), torch.float32),
}  # fmt: skip


def _shapes(chunk: int):
    """Odd sizes, a conv weight, an empty tensor, tensors across chunks, and many small ones."""
    return SHAPES + [(3 * chunk + 5,), (chunk - 1,), (chunk + 1,), (2, chunk + 3)] + [(n,) for n in range(1, 18)]


def _options(setting):
    options = dict(setting)
    return options.pop("dtype"), options


@pytest.mark.parametrize("setting,grad_dtype", SETTINGS.values(), ids=SETTINGS.keys())
def test_against_reference(emulated_cuda, monkeypatch, setting, grad_dtype):
    monkeypatch.setattr(cuda, "CHUNK", SMALL_CHUNK)
    dtype, options = _options(setting)
    params = make_params(_shapes(SMALL_CHUNK), dtype, zero=(2, 6))
    opt = PMDLAMB(params, backend="cuda", **OPTIONS, **options)
    emulated_cuda.reset_counters()
    run_against_reference(opt, steps=4, rtol=FP32_MATH_RTOL, ulps=1, resync=True, grad_dtype=grad_dtype)
    # Σg², pass 1 and pass 2 over every chunk of every tensor: none left to the torch backend.
    chunks = sum(max(1, -(-p.numel() // SMALL_CHUNK)) for p in params)
    assert emulated_cuda.counters()["blocks"] == 4 * 3 * chunks
    masters = dtype != torch.float32 and options.get("master_weights", "auto") == "auto"
    masters = masters and not options.get("stochastic_rounding", False)
    assert all(("master" in opt.state[p]) == masters for p in params)


@pytest.mark.parametrize("schedule", TEST_SCHEDULES)
def test_masters_of_a_tensor_of_more_chunks_than_pass_2_sums(emulated_cuda, monkeypatch, schedule):
    # NOTE [two passes]: a tensor of over MAX_CHUNKS_SUMMED_IN_PASS_2 chunks (chunks of one group each, to
    # stay cheap) makes the step pass 1, tensor_sums_kernel and pass 2, which read and write the masters.
    monkeypatch.setattr(cuda, "CHUNK", 8)
    emulated_cuda.configure(schedule)
    most = chunk_plan.ChunkPlan.MAX_CHUNKS_SUMMED_IN_PASS_2 * 8
    params = make_params([(most + 5,), (7,), (3, 5), (most - 1,)], torch.bfloat16, zero=(2,))
    opt = PMDLAMB(params, backend="cuda", moment_dtype=torch.bfloat16, **OPTIONS)
    emulated_cuda.reset_counters()
    run_against_reference(opt, steps=2, rtol=FP32_MATH_RTOL, ulps=1, resync=True)
    chunks = sum(-(-p.numel() // 8) for p in params)
    # Σg², pass 1, pass 2 over every chunk, and a block per tensor between the passes.
    assert emulated_cuda.counters()["blocks"] == 2 * (3 * chunks + len(params))
    assert all("master" in opt.state[p] for p in params)


# --- Stochastic rounding: the same bits as the torch backend's, for any chunking and schedule.


def _stochastic_params(seed: int = 0):
    """bf16 parameters of some size, one channels_last (its elements indexed by their place in memory)."""
    params = make_params(SHAPES + [(16385,), (3 * SMALL_CHUNK + 5,), (20000,), (64, 3, 3, 3)], torch.bfloat16,
                         zero=(2,), seed=seed)  # fmt: skip
    conv = params[-1]
    conv.data = conv.data.contiguous(memory_format=torch.channels_last)
    return params


def _grads(params, gen):
    """Fresh gradients laid out like their parameters: the channels_last one stays on the kernels' path."""
    grads = random_grads(params, gen)
    return [g.contiguous(memory_format=torch.channels_last) if not p.is_contiguous() else g
            for p, g in zip(params, grads)]  # fmt: skip


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()  # in g's memory format


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A copy of t's bits, in its logical order."""
    width = torch.int16 if t.element_size() == 2 else torch.int32
    return t.detach().clone(memory_format=torch.contiguous_format).view(width)


def test_stochastic_rounding_agrees_with_the_torch_backend(emulated_cuda, monkeypatch):
    monkeypatch.setattr(cuda, "CHUNK", SMALL_CHUNK)
    on_cuda, on_torch = _stochastic_params(), _stochastic_params()
    options = dict(OPTIONS, stochastic_rounding=True, seed=12345)
    opt_cuda, opt_torch = PMDLAMB(on_cuda, backend="cuda", **options), PMDLAMB(on_torch, backend="torch", **options)
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        grads = _grads(on_cuda, gen)
        emulated_cuda.reset_counters()
        for params, opt in ((on_cuda, opt_cuda), (on_torch, opt_torch)):
            _set_grads(params, grads)
            opt.step()
        # Σg², pass 1 and pass 2 over every chunk: the kernels stepped every tensor, the channels_last one too.
        assert emulated_cuda.counters()["blocks"] == 3 * sum(max(1, -(-p.numel() // SMALL_CHUNK)) for p in on_cuda)
        differing = numel = 0
        for a, b in zip(on_cuda, on_torch):
            assert "master" not in opt_cuda.state[a]
            apart = _bits(a) != _bits(b)
            differing += int(apart.sum())
            numel += a.numel()
            # Where they differ (y near a rounding boundary in one of the float32 maths), by one bf16 ulp.
            xa, xb = a.detach().double(), b.detach().double()
            assert bool(((xa - xb).abs() <= ulp(torch.maximum(xa.abs(), xb.abs()), torch.bfloat16)).all())
            b.data.copy_(a.data)  # the next step from the same state
            for key in ("exp_avg", "exp_avg_sq", "step"):
                opt_torch.state[b][key].copy_(opt_cuda.state[a][key])
        assert differing < 1e-3 * numel, f"{differing} of {numel} elements differ"


def _stochastic_run(emulated_cuda, monkeypatch, chunk: int, schedule: str):
    """Three steps of bf16 parameters rounded stochastically; the final parameters and moments."""
    monkeypatch.setattr(cuda, "CHUNK", chunk)
    emulated_cuda.configure(schedule)
    params = _stochastic_params(seed=3)
    # No trust ratio (no weight decay, no use_nvlamb): the update of an element is then its own, whatever the
    # chunks its tensor's norms are summed over; only the dither's index could tell the chunkings apart.
    opt = PMDLAMB(params, backend="cuda", lr=0.05, weight_decay=0.0, cycle_length=3, stochastic_rounding=True,
                  moment_dtype=torch.bfloat16, seed=7)  # fmt: skip
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        _set_grads(params, _grads(params, gen))
        opt.step()
    return [_bits(t) for p in params for t in (p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])]


def test_stochastic_rounding_is_the_same_for_any_chunking_and_schedule(emulated_cuda, monkeypatch):
    runs = [_stochastic_run(emulated_cuda, monkeypatch, chunk, schedule)
            for chunk in (SMALL_CHUNK, 64) for schedule in TEST_SCHEDULES]  # fmt: skip
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


# --- NOTE [skipped steps] with masters: nothing is stored.


@pytest.mark.parametrize("reduced", [False, True], ids=["summed-in-pass-2", "reduced-between-passes"])
@pytest.mark.parametrize(
    "setting",
    [dict(dtype=torch.bfloat16), dict(dtype=torch.float16, moment_dtype=torch.bfloat16),
     dict(dtype=torch.bfloat16, stochastic_rounding=True)],
    ids=["bf16-masters", "fp16-masters-bf16-moments", "bf16-stochastic"],
)  # fmt: skip
def test_a_skipped_step_changes_nothing(emulated_cuda, monkeypatch, setting, reduced):
    monkeypatch.setattr(cuda, "CHUNK", SMALL_CHUNK)
    if reduced:  # the step's halves, pmd_lamb_moments_ and pmd_lamb_update_ (NOTE [two passes])
        monkeypatch.setattr(chunk_plan.ChunkPlan, "MAX_CHUNKS_SUMMED_IN_PASS_2", 2)
    dtype, options = _options(setting)
    params = make_params(_shapes(SMALL_CHUNK), dtype, zero=(2,))
    opt = PMDLAMB(params, backend="cuda", **OPTIONS, **options)
    for p in params:  # one good step first so that masters, moments and steps are non-trivial
        p.grad = torch.randn_like(p)
    opt.step()
    before = [_bits(p) for p in params] + [_bits(t) for p in params for t in opt.state[p].values()]
    assert all(("master" in opt.state[p]) != options.get("stochastic_rounding", False) for p in params)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(sum(p.float().sum() for p in params)).backward()
    params[4].grad[3] = float("inf")
    emulated_cuda.reset_counters()
    scaler.step(opt)
    scaler.update()
    assert emulated_cuda.counters()["launches"] == (4 if reduced else 3)  # the kernels ran, and stored nothing
    after = [_bits(p) for p in params] + [_bits(t) for p in params for t in opt.state[p].values()]
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(before, after))
    assert scaler.get_scale() == 2.0  # the scaler saw the overflow and backed off


# --- NOTE [tensor lists or tables] in largedet_kernels/backends/ops.py: given lists, the ops check them.


def _mixed_bucket():
    """A bucket of bf16 parameters with fp32 masters and bf16 moments, gradients set, and its plan."""
    group = PMDLAMB([torch.zeros(1)], **OPTIONS).param_groups[0]
    xs = [p.detach() for p in make_params([(37,), (3, 5)], torch.bfloat16)]
    bucket = make_bucket(xs, group)
    bucket.masters = [x.float() for x in xs]
    bucket.exp_avgs = [torch.zeros_like(x) for x in xs]
    bucket.exp_avg_sqs = [torch.zeros_like(x) for x in xs]
    gen = torch.Generator().manual_seed(2)
    for g in bucket.grads:
        g.normal_(generator=gen)
    return bucket, chunk_plan.plan_for(bucket, cuda.CHUNK)


def _step_with_lists(bucket, plan, **replaced) -> None:
    """The tensor-list form of the step given the bucket's lists, some of them replaced."""
    lists = dict(params=bucket.params, grads=bucket.grads, exp_avgs=bucket.exp_avgs, exp_avg_sqs=bucket.exp_avg_sqs,
                 steps=bucket.steps, masters=bucket.masters)  # fmt: skip
    lists.update(replaced)
    cuda.KERNELS.ops.step_(*lists.values(), plan.chunks, plan.workspace, plan.chunk, plan.hyper(bucket), plan.one,
                           plan.zero)  # fmt: skip


def test_the_tensor_lists_give_the_tables_step(emulated_cuda):
    with_lists, tables_only = _mixed_bucket(), _mixed_bucket()
    initial = [m.clone() for m in with_lists[0].masters]
    for _ in range(2):
        _step_with_lists(*with_lists)
        cuda.KERNELS.step(*tables_only, tables_only[1].one, tables_only[1].zero)
    for name in ("params", "masters", "exp_avgs", "exp_avg_sqs", "steps"):
        a, b = getattr(with_lists[0], name), getattr(tables_only[0], name)
        assert all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b)), name
    bucket = with_lists[0]
    assert all(s.item() == 2 for s in bucket.steps)
    assert not any(torch.equal(m, m0) for m, m0 in zip(bucket.masters, initial))
    assert all(torch.equal(p, m.bfloat16()) for p, m in zip(bucket.params, bucket.masters))


@pytest.mark.parametrize(
    "replaced,message",
    [
        (lambda b: dict(masters=[m.bfloat16() for m in b.masters]), "masters must be Float, one is BFloat16"),
        (lambda b: dict(masters=b.masters[:1]), "masters has 1 tensors, the tables address 2"),
        (lambda b: dict(grads=[]), "grads is empty"),
        (lambda b: dict(exp_avg_sqs=[m.float() for m in b.exp_avg_sqs]), "exp_avg_sqs must be BFloat16, one is Float"),
        (lambda b: dict(exp_avgs=[m.half() for m in b.exp_avgs], exp_avg_sqs=[m.half() for m in b.exp_avg_sqs]),
         "no kernel for Half moments of BFloat16 parameters"),
        (lambda b: dict(params=[b.params[0], b.params[1].half()]), "params must be BFloat16, one is Half"),
        (lambda b: dict(params=[p.float() for p in b.params], grads=[g.float() for g in b.grads]),
         "fp32 master weights are for float16 and bfloat16 parameters, not Float"),
    ],
    ids=["master-dtype", "master-count", "no-grads", "moment-dtype", "fp16-moments", "param-dtype", "fp32-masters"],
)  # fmt: skip
def test_the_ops_check_the_tensor_lists(emulated_cuda, replaced, message):
    bucket, plan = _mixed_bucket()
    with pytest.raises(RuntimeError, match=message):
        _step_with_lists(bucket, plan, **replaced(bucket))


def test_masters_are_for_16_bit_parameters(emulated_cuda):
    group = PMDLAMB([torch.zeros(1)], **OPTIONS).param_groups[0]
    bucket = make_bucket([torch.randn(9)], group)
    bucket.masters = [torch.randn(9)]
    plan = chunk_plan.plan_for(bucket, cuda.CHUNK)
    with pytest.raises(RuntimeError, match="fp32 master weights are for float16 and bfloat16 parameters, not Float"):
        cuda.KERNELS.step(bucket, plan, plan.one, plan.zero)
