"""The fused backends against the float64 reference, in halves as shards are, and through
GradScaler's skipped steps: every fused backend on a real GPU (skipped without one), and the
CUDA C++ kernels also on the CPU in every run, through the emulator of tests/cuda_emulator
under both of its fiber schedules (marked ``emulator``). On a GPU only: a CUDA graph, no host
synchronisation, grouped SyncBN. benchmarks/gpu_check.sh runs the GPU ones."""

import copy
from typing import Callable, NamedTuple, Optional, Tuple

import pytest
import torch

from cuda_emulator import TEST_SCHEDULES
from harness import (
    FP32_MATH_RTOL, SHAPES, assert_records, check_halves_equal_step, check_sharded_halves, make_params,
    run_against_reference,
)

from largedet_kernels import LAMB, PMDLAMB, dispatch
from largedet_kernels.backends import Bucket, chunk_plan


class Target(NamedTuple):
    backend: str
    device: str
    schedule: Optional[str] = None  # the emulator's (NOTE [emulated execution] in tests/cuda_emulator/runtime.cpp)


def _on_the_gpu(name: str):
    reason = f"needs a CUDA GPU and the {name} backend"
    missing = not torch.cuda.is_available() or dispatch.unavailable_reason(name, torch.device("cuda")) is not None
    return pytest.param(name, marks=pytest.mark.skipif(missing, reason=reason), id=name)


GPU_BACKENDS = [_on_the_gpu(name) for name in ("cuda", "triton", "torch")]
TARGETS = [pytest.param(Target(p.values[0], "cuda"), marks=p.marks, id=p.id) for p in GPU_BACKENDS] + [
    pytest.param(Target("cuda", "cpu", schedule), marks=pytest.mark.emulator, id=f"cuda-emulated-{schedule}")
    for schedule in TEST_SCHEDULES
]


@pytest.fixture(params=TARGETS)
def target(request) -> Target:
    if request.param.schedule is not None:
        request.getfixturevalue("emulated_cuda").configure(request.param.schedule)
    return request.param


def _shapes(target: Optional[Target] = None):
    # Around the fused backends' chunks (16384) and 128-bit groups, many small tensors, conv weights.
    # Emulated, where a block costs milliseconds, the small ones still take every length mod kILP twice.
    small = range(1, 18) if target is not None and target.schedule is not None else range(1, 60)
    return SHAPES + [(16383,), (16384,), (16385,), (3 * 16384 + 5,), (256, 64, 3, 3)] + [(n,) for n in small]


@pytest.mark.parametrize(
    "dtype,rtol,ulps",
    [(torch.float64, 1e-10, 0)] + [(d, FP32_MATH_RTOL, 1) for d in (torch.float32, torch.float16, torch.bfloat16)],
    ids=["fp64", "fp32", "fp16", "bf16"],
)
@pytest.mark.parametrize(
    "options",
    [dict(), dict(max_grad_norm=1.0, bias_correction=True), dict(eps_inside_sqrt=False, grad_averaging=False)],
    ids=["paper", "clip+bias-correction", "eps-outside+no-averaging"],
)
def test_against_reference(target, dtype, rtol, ulps, options):
    params = make_params(_shapes(target), dtype, zero=(2, 6), device=target.device)
    opt = PMDLAMB(params, lr=0.05, weight_decay=0.01, alpha=0.3, cycle_length=3, backend=target.backend, **options)
    run_against_reference(opt, steps=7, rtol=rtol, ulps=ulps, resync=dtype != torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_float32_gradients_of_low_precision_parameters(target, dtype):
    params = make_params(_shapes(target), dtype, zero=(2,), device=target.device)
    opt = PMDLAMB(params, lr=0.05, weight_decay=0.01, alpha=0.3, cycle_length=3, max_grad_norm=1.0,
                  backend=target.backend)  # fmt: skip
    run_against_reference(opt, steps=4, rtol=FP32_MATH_RTOL, ulps=1, resync=True, grad_dtype=torch.float32)


@pytest.mark.parametrize(
    "options",
    [dict(moment_dtype=torch.bfloat16), dict(stochastic_rounding=True),
     dict(stochastic_rounding=True, moment_dtype=torch.bfloat16)],
    ids=["masters+bf16-moments", "stochastic", "stochastic+bf16-moments"],
)  # fmt: skip
def test_bf16_moments_and_stochastic_rounding(target, options):
    # bf16 parameters with fp32 masters, or without them rounded stochastically (NOTE [stochastic rounding] in
    # largedet_kernels/rounding.py); moments stored in bf16 (NOTE [stored moments] in csrc/pmd_lamb.cuh).
    params = make_params(_shapes(target), torch.bfloat16, zero=(2,), device=target.device)
    opt = PMDLAMB(params, lr=0.05, weight_decay=0.01, alpha=0.3, cycle_length=3, max_grad_norm=1.0,
                  backend=target.backend, **options)  # fmt: skip
    run_against_reference(opt, steps=4, rtol=FP32_MATH_RTOL, ulps=1, resync=True)
    assert all(("master" in opt.state[p]) != bool(options.get("stochastic_rounding")) for p in params)


def test_trust_ratio_records(target):
    # NOTE [trust-ratio records]: pass 2 writes each tensor's t, ‖x‖, ‖u‖ and applied ratio. The first group's
    # bounds bind (‖x‖/‖u‖ is about 1 here), but not on its zero tensor's first step, whose ratio is 1.
    params = make_params(_shapes(target), torch.float32, zero=(2,), device=target.device)
    names = [f"p{i}" for i in range(len(params))]
    half = len(params) // 2
    groups = [{"params": params[:half], "param_names": names[:half], "trust_ratio_bounds": (0.1, 0.5)},
              {"params": params[half:], "param_names": names[half:]}]  # fmt: skip
    opt = PMDLAMB(groups, lr=0.05, weight_decay=0.01, cycle_length=3, backend=target.backend, telemetry=True)
    for step in range(2):
        ref = run_against_reference(opt, steps=1, rtol=FP32_MATH_RTOL, ulps=1, seed=step)
        assert_records(opt, ref, names, 1e-5)
        if step == 0:
            assert opt.trust_ratios().records["p2"].ratio == 1.0  # ‖x‖ = 0
    records = opt.trust_ratios().records
    bounded = [r.x_norm / r.u_norm for r in map(records.get, names[:half]) if r and r.x_norm > 0 and r.u_norm > 0]
    assert min(bounded) < 0.1 or max(bounded) > 0.5  # a bound binds


def test_lamb(target):
    params = make_params(_shapes(target), torch.float32, zero=(2,), device=target.device)
    opt = LAMB([dict(params=params[:5], weight_decay=0.0), dict(params=params[5:])], lr=0.01, backend=target.backend)
    run_against_reference(opt, steps=5, rtol=FP32_MATH_RTOL, ulps=1, resync=True)


@pytest.mark.parametrize(
    "dtype,rtol,ulps",
    [(torch.float64, 1e-10, 0), (torch.float32, FP32_MATH_RTOL, 1), (torch.bfloat16, FP32_MATH_RTOL, 1)],
    ids=["fp64", "fp32", "bf16"],
)
def test_sharded_halves(target, dtype, rtol, ulps):
    # NOTE [sharded norms]: pass 1, per-tensor sums, pass 2 from summed norms.
    check_sharded_halves(target.backend, dtype, target.device, rtol, ulps, shapes=_shapes(target))
    check_halves_equal_step(target.backend, dtype, target.device)


# --- NOTE [two passes]: a plan with a tensor of many chunks reduces each tensor between the passes.

SUMMED_IN_PASS_2 = 4  # ChunkPlan.MAX_CHUNKS_SUMMED_IN_PASS_2 under small_chunks
EMULATED_CHUNK = 64  # eight groups of kILP per block of the emulated kernels


class _CountedKernel:
    """A Triton kernel whose launches add their program counts to a log."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        self.log.append(grid[0])
        return self.kernel[grid]


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.emulator, id="cuda-emulated"),
                        pytest.param("triton", id="triton-interpreted")])  # fmt: skip
def small_chunks(request, monkeypatch) -> Tuple[str, int, Callable[[], Tuple[int, int]]]:
    """A fused backend on CPU tensors with small chunks, blocks of pass 2 summing at most
    SUMMED_IN_PASS_2 of them: (backend, chunk, a function giving (launches, blocks) since its last call)."""
    monkeypatch.setattr(chunk_plan.ChunkPlan, "MAX_CHUNKS_SUMMED_IN_PASS_2", SUMMED_IN_PASS_2)
    if request.param == "cuda":
        from largedet_kernels.backends import cuda

        emulator = request.getfixturevalue("emulated_cuda")
        monkeypatch.setattr(cuda, "CHUNK", EMULATED_CHUNK)
        emulator.reset_counters()

        def emulated() -> Tuple[int, int]:
            counted = emulator.counters()
            emulator.reset_counters()
            return counted["launches"], counted["blocks"]

        return "cuda", EMULATED_CHUNK, emulated
    backend = request.getfixturevalue("triton_backend")
    from largedet_kernels import triton_kernels

    log = []
    for name in ("pmd_lamb_moments_kernel", "tensor_sums_kernel", "pmd_lamb_update_kernel", "grad_sumsq_kernel"):
        monkeypatch.setattr(triton_kernels, name, _CountedKernel(getattr(triton_kernels, name), log))

    def interpreted() -> Tuple[int, int]:
        counted = len(log), sum(log)
        log.clear()
        return counted

    return "triton", backend.CHUNK, interpreted


def _many_chunk_shapes(chunk: int, reduced: bool):
    """Tensors of up to SUMMED_IN_PASS_2 chunks, and with `reduced` one of a chunk more."""
    most = SUMMED_IN_PASS_2 * chunk
    return [(most,), (most - 1,), (7,), (3, 5), (chunk + 1,)] + ([(most + 1,)] if reduced else [])


@pytest.mark.parametrize("reduced", [False, True], ids=["summed-in-pass-2", "reduced-between-passes"])
def test_tensors_of_many_chunks(small_chunks, reduced):
    backend, chunk, launched = small_chunks
    params = make_params(_many_chunk_shapes(chunk, reduced), torch.float32, zero=(3,))
    opt = PMDLAMB(params, lr=0.05, weight_decay=0.01, alpha=0.3, cycle_length=3, max_grad_norm=1.0, backend=backend)
    launched()
    run_against_reference(opt, steps=3, rtol=FP32_MATH_RTOL, ulps=1, resync=True)
    chunks = sum(-(-p.numel() // chunk) for p in params)
    # Σg², pass 1, pass 2 over every chunk, and tensor_sums_kernel's block per tensor between the passes.
    per_step = (4, 3 * chunks + len(params)) if reduced else (3, 3 * chunks)
    assert launched() == (3 * per_step[0], 3 * per_step[1])


@pytest.mark.parametrize("reduced", [False, True], ids=["summed-in-pass-2", "reduced-between-passes"])
def test_tensors_of_many_chunks_in_halves(small_chunks, reduced):
    # NOTE [sharded norms]: a step's norms are those of begin_step/finish bit for bit, either way.
    backend, chunk, _ = small_chunks
    shapes = _many_chunk_shapes(chunk, reduced)
    for dtype in (torch.float32, torch.bfloat16):
        check_halves_equal_step(backend, dtype, "cpu", shapes=shapes)


def test_the_detector_set_takes_two_launches_and_a_huge_tensor_three():
    # From the plan alone (meta tensors): Faster R-CNN's largest tensor has 784 chunks of 16384.
    from benchmarks.step_time import load_shapes

    def plan(shapes) -> chunk_plan.ChunkPlan:
        params = [torch.empty(s, device="meta") for s in shapes]
        return chunk_plan.ChunkPlan(Bucket(torch.device("meta"), params=params), 16384, torch.float32)

    detector = plan(load_shapes("faster_rcnn_r50_fpn"))
    assert (detector.n_tensors, detector.n_chunks, detector.sums_between_passes) == (189, 2675, False)
    assert plan([(3, 3), (1 << 31,)]).sums_between_passes


def _stepped_once(target: Target, telemetry: bool = False):
    """fp32 params and an optimizer that has taken one step (tables built)."""
    params = make_params(_shapes(target), torch.float32, device=target.device)
    opt = PMDLAMB(params, backend=target.backend, max_grad_norm=1.0, telemetry=telemetry)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return params, opt


def test_grad_scaler_skip(target):
    # NOTE [skipped steps]: a step with a non-finite gradient changes no parameter, moment or step count.
    params, opt = _stepped_once(target)
    before = [[p.detach().clone() for p in params]] + [
        [opt.state[p][name].clone() for p in params] for name in ("exp_avg", "exp_avg_sq", "step")
    ]
    scaler = torch.amp.GradScaler(target.device, init_scale=8.0)
    scaler.scale(sum(p.sum() for p in params)).backward()
    params[-1].grad[0] = float("inf")
    scaler.step(opt)
    scaler.update()
    after = [list(params)] + [[opt.state[p][name] for p in params] for name in ("exp_avg", "exp_avg_sq", "step")]
    for was, now in zip(before, after):
        assert all(torch.equal(a, b) for a, b in zip(was, now))
    assert all(opt.state[p]["step"].item() == 1 for p in params)
    assert scaler.get_scale() == 4.0  # the scaler saw the inf


@pytest.mark.parametrize("telemetry", [False, True], ids=["plain", "telemetry"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_step_never_synchronises(backend, telemetry):
    _, opt = _stepped_once(Target(backend, "cuda"), telemetry)  # the first step builds tables; later ones must not wait
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", GPU_BACKENDS[:2])
def test_a_captured_step_replays_like_eager_steps(backend):
    shapes = [(16385,), (64, 3, 7, 7), (1,), (300,)]
    params, twins = make_params(shapes, torch.float32, device="cuda"), make_params(shapes, torch.float32, device="cuda")
    opt, eager = (PMDLAMB(ps, lr=0.05, cycle_length=3, backend=backend) for ps in (params, twins))
    gen = torch.Generator(device="cuda").manual_seed(0)
    for p in params + twins:
        p.grad = torch.zeros_like(p)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: state, tables and kernels exist before capture
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    eager.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(7):  # crosses two ξ cycles
        for p, t in zip(params, twins):
            g = torch.randn(p.shape, device="cuda", generator=gen)
            p.grad.copy_(g)
            t.grad.copy_(g)
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    for p, t in zip(params, twins):
        assert torch.equal(p, t)
        assert torch.equal(opt.state[p]["step"], eager.state[t]["step"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton")])
def test_parameters_on_a_second_gpu(backend):
    if dispatch.unavailable_reason(backend, torch.device("cuda:1")) is not None:
        pytest.skip(f"no {backend} backend")
    params = make_params(SHAPES, torch.float32, device="cuda:1") + make_params(SHAPES, torch.float32, seed=1,
                                                                               device="cuda:0")  # fmt: skip
    with torch.cuda.device(0):  # the current device is not the first bucket's
        opt = PMDLAMB(params, lr=0.05, cycle_length=3, max_grad_norm=1.0, backend=backend)
        run_against_reference(opt, steps=3, rtol=FP32_MATH_RTOL, ulps=1, resync=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's SyncBatchNorm runs on CUDA tensors only")
def test_grouped_sync_batchnorm_forward_and_backward_on_the_gpu(tmp_path):
    import torch.distributed as dist

    from largedet_kernels.recipe import convert_sync_batchnorm

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).cuda()
        synced = convert_sync_batchnorm(copy.deepcopy(plain), group_size=1)
        assert isinstance(synced[1], torch.nn.SyncBatchNorm)
        images = torch.randn(8, 3, 9, 9, device="cuda")
        outs = [model(images) for model in (plain, synced)]
        for out in outs:
            out.square().mean().backward()
        # One rank per group: SyncBN's statistics are the batch's, as BatchNorm's.
        torch.testing.assert_close(outs[1], outs[0])
        for p, q in zip(synced.parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
        torch.testing.assert_close(synced[1].running_var, plain[1].running_var)
    finally:
        dist.destroy_process_group()
