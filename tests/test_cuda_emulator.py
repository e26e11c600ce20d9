"""The emulator of tests/cuda_emulator: it runs the CUDA C++ kernels as a GPU would and reports
what a GPU would get wrong, so that csrc/'s kernels passing on it (tests/test_gpu.py) means
something; and the kernels' chunk walk, vector path and schedules that only it can show on CPU."""

import re

import pytest
import torch

import cuda_emulator
from cuda_emulator import TEST_SCHEDULES
from harness import (
    FP32_MATH_RTOL, SHAPES, ReferenceRun, assert_close_to_reference, make_bucket, make_params, random_grads,
    run_against_reference,
)

from largedet_kernels import PMDLAMB
from largedet_kernels.backends import chunk_plan, cuda

pytestmark = pytest.mark.emulator

# --- The emulator itself.


def _bit_equal(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal bits, but any NaN for a NaN (a GPU makes its own canonical NaN)."""
    nan = want.isnan()
    width = torch.int16 if want.element_size() == 2 else torch.int32
    same = torch.equal(got[~nan].view(width), want[~nan].view(width))
    return same and bool(got[nan].isnan().all())


def test_16_bit_conversions_match_torch_bit_for_bit(cuda_emulator):
    every_pattern = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    # float32 patterns across every exponent, the halfway cases of both formats, and the edges.
    sweep = torch.arange(0, 2**32, 4093, dtype=torch.int64).to(torch.int32).view(torch.float32)
    halfway = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8, 65504, 65519.99, 65520, 2**-24,
                            2**-25, 1.5 * 2**-25, 2**-14 - 2**-25, 3e38, 1e-40, 0.0, -0.0],
                           dtype=torch.float32)  # fmt: skip
    floats = torch.cat([sweep, halfway, -halfway, torch.tensor([float("inf"), -float("inf"), float("nan")])])
    for dtype in (torch.float16, torch.bfloat16):
        values = every_pattern.view(dtype)
        assert _bit_equal(torch.ops.largedet_emulator.widen_float(values), values.float())
        assert _bit_equal(torch.ops.largedet_emulator.narrow_float(floats, dtype), floats.to(dtype))


def test_the_launch_rewrite_knows_every_launch():
    source = (cuda_emulator.CSRC / "pmd_lamb_launch.cu").read_text()
    assert cuda_emulator.emulated_launch_source(source).count("::largedet_emu::launch(") == 4
    extra = source + "\nvoid more() { another_kernel<float><<<1, 32, 0, nullptr>>>(nullptr); }\n"
    with pytest.raises(RuntimeError, match="expected 4 <<<>>> launches to rewrite, rewrote 5"):
        cuda_emulator.emulated_launch_source(extra)
    binding = (cuda_emulator.CSRC / "binding.cpp").read_text()
    with pytest.raises(RuntimeError, match="expected 1 of 'device.is_cuda\\(\\)', found 0"):
        cuda_emulator.emulated_binding_source(binding.replace("device.is_cuda()", "device.is_cuda_like()"))


@pytest.mark.parametrize("schedule", sorted({*TEST_SCHEDULES, "threads"}))
@pytest.mark.parametrize(
    "kernel,error",
    [
        ("divergent_barrier", r"divergent __syncthreads: this thread is at .*selftest.cpp:\d+, \d+ wait at .*selftest"),
        ("early_exit", r"(after 1 of the threads it waits for exited|exited while \d+ threads wait at __syncthreads)"),
        ("half_warp_shuffle", r"(exited while \d+ lanes of its warp wait|after \d+ of the threads it waits for)"),
    ],
    ids=["divergent-barrier", "early-exit", "half-warp-shuffle"],
)
def test_broken_kernels_are_reported(cuda_emulator, schedule, kernel, error):
    cuda_emulator.configure(schedule)
    try:
        with pytest.raises(RuntimeError, match=f"kernel failed in block 0 of 1, thread \\d+: .*{error}"):
            torch.ops.largedet_emulator.selftest(kernel, 1.0)
        assert torch.equal(torch.ops.largedet_emulator.selftest("broadcast", 2.0), torch.full((64,), 2.0))
    finally:
        cuda_emulator.configure(cuda_emulator.DEFAULT_SCHEDULE)


fibers_only = pytest.mark.skipif(cuda_emulator.SANITIZER is not None, reason="fiber schedules (not sanitized)")


@fibers_only
def test_a_missing_barrier_shows_under_one_of_the_schedules(cuda_emulator):
    # Thread 0 writes shared memory that the others read: without the barrier, the reverse
    # schedule lets them read first and see what the previous launch left there.
    try:
        for schedule in ("forward", "reverse"):
            cuda_emulator.configure(schedule)
            torch.ops.largedet_emulator.selftest("broadcast", 1.0)
            assert torch.equal(torch.ops.largedet_emulator.selftest("broadcast", 2.0), torch.full((64,), 2.0))
        cuda_emulator.configure("forward")
        assert torch.equal(torch.ops.largedet_emulator.selftest("broadcast_unsynced", 3.0), torch.full((64,), 3.0))
        cuda_emulator.configure("reverse")
        stale = torch.ops.largedet_emulator.selftest("broadcast_unsynced", 4.0)
        assert stale[0] == 4.0 and bool((stale[1:] == 3.0).all())
    finally:
        cuda_emulator.configure(cuda_emulator.DEFAULT_SCHEDULE)


def _bucket_and_plan(xs):
    group = PMDLAMB([torch.zeros(1)]).param_groups[0]
    bucket = make_bucket(xs, group)
    for g in bucket.grads:
        g.normal_()
    return bucket, chunk_plan.plan_for(bucket, cuda.CHUNK)


def test_a_vector_access_past_a_tensor_is_reported(emulated_cuda):
    bucket, plan = _bucket_and_plan([torch.randn(16)])
    plan.pointers(bucket)
    bucket.grads[0] = torch.randn(8)  # the tables still say 16 elements: the second group lies past its end
    plan.address_key = ()
    with pytest.raises(RuntimeError, match=r"grad_sumsq launch failed: kernel failed in block 0 of 1, thread 1: "
                                           r"16-byte load at 0x[0-9a-f]+ outside every live allocation"):  # fmt: skip
        cuda.KERNELS.grad_sumsq(bucket, plan)


def test_a_misaligned_vector_access_is_reported(cuda_emulator):
    with pytest.raises(RuntimeError, match=r"kernel failed in block 0 of 1, thread 0: 16-byte load at 0x[0-9a-f]+ "
                                           r"is misaligned \(a GPU faults\)"):  # fmt: skip
        torch.ops.largedet_emulator.selftest("misaligned_load", 1.0)


# --- What only the emulator shows of the kernels on CPU.

# Buckets whose streams differ in width: fp16/bf16 parameters read as their fp32 masters (the parameter
# only written in pass 2), moments of bf16.
VECTOR_SETTINGS = {
    "fp32": dict(dtype=torch.float32),
    "bf16": dict(dtype=torch.bfloat16, master_weights=False),
    "bf16-masters": dict(dtype=torch.bfloat16, master_weights="auto"),
    "fp16-masters-bf16-moments": dict(dtype=torch.float16, master_weights="auto", moment_dtype=torch.bfloat16),
    "fp32-bf16-moments": dict(dtype=torch.float32, moment_dtype=torch.bfloat16),
}


def _misaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """t's values in a view one element into its storage, as a gradient viewing a DDP bucket."""
    view = torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape)
    assert view.data_ptr() % 16 != 0
    return view.copy_(t)


def _vector_accesses(widths, vector):
    """16-byte loads and stores of the kernels' vector paths over whole groups of kILP = 8 elements, from the
    streams each kernel moves (NOTE [two passes]) and their bytes per element (`widths`, master 0 when none):
    Σg² reads g; pass 1 reads x (the master when there is one), g, m, v and writes m, v; pass 2 reads x, m, v and
    writes the master and the parameter. `vector`: (numel, whether Σg², pass 1, pass 2 take the vector path)."""
    x_read = widths["master"] or widths["x"]
    loads = dict(sumsq=widths["g"], moments=x_read + widths["g"] + 2 * widths["m"], update=x_read + 2 * widths["m"])
    stores = dict(sumsq=0, moments=2 * widths["m"], update=widths["x"] + widths["master"])
    total_loads = total_stores = 0
    for numel, paths in vector:
        groups = numel // 8  # the partial group of each tensor takes the scalar path
        for kernel, taken in zip(("sumsq", "moments", "update"), paths):
            total_loads += taken * groups * 8 * loads[kernel] // 16
            total_stores += taken * groups * 8 * stores[kernel] // 16
    return total_loads, total_stores


@pytest.mark.parametrize("setting", VECTOR_SETTINGS.values(), ids=VECTOR_SETTINGS.keys())
def test_each_tensor_takes_the_vector_path_when_its_own_streams_are_aligned(emulated_cuda, setting):
    # NOTE [vector and scalar paths]: a kernel moves a tensor's whole groups 128 bits at a time when
    # the streams it moves of that tensor are aligned, whatever the other tensors of the bucket.
    options = dict(setting)
    dtype = options.pop("dtype")
    aligned = make_params([(1,), (7,), (8,), (15,), (16385,), (64, 3, 3, 3)], dtype)
    x_view = torch.nn.Parameter(_misaligned_copy(torch.randn(4096, dtype=dtype)))
    g_view = torch.nn.Parameter(torch.randn(2056, dtype=dtype))  # its gradient will be misaligned
    params = aligned + [x_view, g_view]
    opt = PMDLAMB(params, lr=0.05, weight_decay=0.01, cycle_length=3, max_grad_norm=1.0, backend="cuda", **options)
    masters = dtype != torch.float32 and options.get("master_weights") == "auto"
    moment_dtype = options.get("moment_dtype", torch.float32)
    widths = dict(x=dtype.itemsize, g=dtype.itemsize, m=moment_dtype.itemsize, master=4 if masters else 0)
    # Which kernels take the vector path per tensor: (Σg², pass 1, pass 2). A master (aligned: the optimizer
    # allocates it) stands in for a misaligned parameter in pass 1, which then does not read the parameter.
    vector = [(p.numel(), (True, True, True)) for p in aligned]
    vector += [(x_view.numel(), (True, masters, False)), (g_view.numel(), (False, False, True))]
    loads, stores = _vector_accesses(widths, vector)
    ref, gen = ReferenceRun(opt), torch.Generator().manual_seed(1)
    for _ in range(2):
        ref.resync()
        grads = random_grads(params, gen)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        g_view.grad = _misaligned_copy(grads[-1])
        before = ref.state()
        emulated_cuda.reset_counters()
        opt.step()
        assert emulated_cuda.counters() == dict(launches=3, blocks=3 * 9, vector_loads=loads, vector_stores=stores)
        assert all(("master" in opt.state[p]) == masters for p in params)
        ref.step(grads)
        assert_close_to_reference(opt, ref, before, FP32_MATH_RTOL, ulps=1)


MANY_CHUNK_SETTINGS = {
    "fp32": dict(dtype=torch.float32),
    "bf16-masters": dict(dtype=torch.bfloat16, master_weights="auto"),
    "bf16-stochastic-bf16-moments": dict(dtype=torch.bfloat16, stochastic_rounding=True, moment_dtype=torch.bfloat16),
}


@pytest.mark.parametrize("schedule", TEST_SCHEDULES)
@pytest.mark.parametrize("setting", MANY_CHUNK_SETTINGS.values(), ids=MANY_CHUNK_SETTINGS.keys())
def test_many_chunks_per_tensor(emulated_cuda, monkeypatch, schedule, setting):
    # 64-element chunks: eight groups per block, most threads idle, tensors of up to 65 chunks.
    monkeypatch.setattr(cuda, "CHUNK", 64)
    emulated_cuda.configure(schedule)
    options = dict(setting)
    params = make_params(SHAPES + [(4099,), (64 * 7 + 3,), (63,), (65,)], options.pop("dtype"), zero=(2,))
    opt = PMDLAMB(params, lr=0.05, weight_decay=0.01, alpha=0.3, cycle_length=3, max_grad_norm=1.0, backend="cuda",
                  **options)  # fmt: skip
    emulated_cuda.reset_counters()
    run_against_reference(opt, steps=4, rtol=FP32_MATH_RTOL, ulps=1, resync=True)
    chunks = sum(max(1, -(-p.numel() // 64)) for p in params)
    assert emulated_cuda.counters()["blocks"] == 4 * 3 * chunks  # Σg², pass 1, pass 2 of each step


@fibers_only
def test_a_random_schedule(emulated_cuda):
    emulated_cuda.configure("random", seed=7)
    params = make_params(SHAPES + [(16385,)], torch.float32, zero=(2,))
    opt = PMDLAMB(params, lr=0.05, weight_decay=0.01, alpha=0.3, cycle_length=3, max_grad_norm=1.0, backend="cuda")
    run_against_reference(opt, steps=3, rtol=FP32_MATH_RTOL, ulps=1, resync=True)


def test_the_unknown_schedule_is_refused(cuda_emulator):
    refusal = "schedule must be forward, reverse, random or threads, got sideways"
    with pytest.raises(ValueError, match=re.escape(refusal)):
        cuda_emulator.configure("sideways")
