"""The Triton backend: boundaries, alignment, device-side tables, and the compiled kernels."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TRITON_TEST_BLOCK as BLOCK, TRITON_TEST_CHUNK as CHUNK
from harness import FP32_MATH_RTOL, make_bucket, make_params, run_against_reference

from largedet_kernels import PMDLAMB

HAVE_TRITON = importlib.util.find_spec("triton") is not None


# Sizes on both sides of every tile and chunk boundary, and 60 tensors in one launch.
BOUNDARY_SIZES = [1, BLOCK - 1, BLOCK, BLOCK + 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + BLOCK - 1, 3 * CHUNK]


@pytest.mark.parametrize("dtype,rtol,ulps", [(torch.float64, 1e-10, 0), (torch.float32, FP32_MATH_RTOL, 1)],
                         ids=["fp64", "fp32"])  # fmt: skip
def test_sizes_around_every_boundary(triton_backend, dtype, rtol, ulps):
    shapes = [(n,) for n in BOUNDARY_SIZES] + [(n % 97 + 1,) for n in range(51)]
    params = make_params(shapes, dtype, zero=(3, 7))
    opt = PMDLAMB(params, lr=0.05, cycle_length=2, max_grad_norm=1.0, backend="triton")
    run_against_reference(opt, steps=3, rtol=rtol, ulps=ulps, resync=dtype != torch.float64)


@pytest.mark.parametrize("master_weights", ["auto", False], ids=["masters", "no-masters"])
def test_bf16_params_and_grads(triton_backend, master_weights):
    # 1 ulp of bf16 allowed, not ½: fp32 and fp64 math may round a value near a tie apart.
    params = make_params([(CHUNK + 3,), (5, 7), (BLOCK,)], torch.bfloat16, zero=(1,))
    opt = PMDLAMB(params, lr=0.05, cycle_length=2, max_grad_norm=1.0, backend="triton", master_weights=master_weights)
    run_against_reference(opt, steps=4, rtol=FP32_MATH_RTOL, ulps=1, resync=True)


def test_misaligned_and_strided_tensors(triton_backend):
    # Offsets by one element break 16-byte alignment (that tensor's unhinted path);
    # a strided view cannot be indexed flat (its tensors go to the torch backend).
    storage = torch.randn(4 * CHUNK, dtype=torch.float64)
    odd = torch.nn.Parameter(storage[1 : CHUNK + 2].clone().as_strided((CHUNK + 1,), (1,), 0))
    views = [torch.nn.Parameter(torch.randn(2 * CHUNK + 1, dtype=torch.float64)[1:]),
             torch.nn.Parameter(torch.randn(3, 2 * BLOCK, dtype=torch.float64)[:, ::2])]  # fmt: skip
    assert views[0].data_ptr() % 16 != 0 and not views[1].is_contiguous()
    opt = PMDLAMB([odd, *views], lr=0.05, cycle_length=3, backend="triton")
    run_against_reference(opt, steps=3, rtol=1e-10)


def test_tables_are_cached_and_refreshed(triton_backend):
    params = make_params([(CHUNK + 1,), (9,)], torch.float64)
    opt = PMDLAMB(params, lr=0.05, cycle_length=3, backend="triton")
    run_against_reference(opt, steps=1, rtol=1e-10)
    plan = opt._step_cache.kept_tables()[0].plan
    chunk_table, table = plan.chunk_tensor, plan.table
    # New gradient tensors (new addresses) and a new lr: the same plan, new pointer and hyper tables.
    for group in opt.param_groups:
        group["lr"] = 0.01
    run_against_reference(opt, steps=2, rtol=1e-10)
    plan2 = opt._step_cache.kept_tables()[0].plan
    assert plan2 is plan and plan.chunk_tensor is chunk_table and plan.table is not table
    assert plan.table[0, 0].item() == pytest.approx(0.01 * 0.012)


def test_two_launches_per_step_and_one_more_for_clipping(triton_backend, monkeypatch):
    from largedet_kernels import triton_kernels

    launches = []
    for name in ("pmd_lamb_moments_kernel", "pmd_lamb_update_kernel", "grad_sumsq_kernel"):
        kernel = getattr(triton_kernels, name)
        monkeypatch.setattr(triton_kernels, name, _Counting(kernel, name, launches))
    for max_grad_norm, expected in ((None, 2), (1.0, 3)):
        params = make_params([(n,) for n in range(1, 70)], torch.float32)
        opt = PMDLAMB(params, max_grad_norm=max_grad_norm, backend="triton")
        for p in params:
            p.grad = torch.randn_like(p)
        launches.clear()
        opt.step()
        assert len(launches) == expected, launches


def test_three_launches_for_shards(triton_backend, monkeypatch):
    # NOTE [sharded norms]: pass 1, the per-tensor sums, then pass 2 after the all-reduce.
    from largedet_kernels import triton_kernels

    launches = []
    for name in ("pmd_lamb_moments_kernel", "tensor_sums_kernel", "pmd_lamb_update_kernel"):
        monkeypatch.setattr(triton_kernels, name, _Counting(getattr(triton_kernels, name), name, launches))
    group = PMDLAMB([torch.zeros(1)]).param_groups[0]
    bucket = make_bucket(make_params([(n,) for n in range(1, 70)], torch.float32), group)
    pending = triton_backend.begin_step(bucket, None, None)
    assert launches == ["pmd_lamb_moments_kernel", "tensor_sums_kernel"]
    assert pending.sums.shape == (69, 2)
    pending.finish(pending.sums)
    assert launches[2:] == ["pmd_lamb_update_kernel"]


def test_the_tests_interpreter_patches_the_language_once_per_launch(triton_backend, monkeypatch):
    # tests/triton_interpreter.py is in effect: a launch patches triton.language as often whatever its grid,
    # where without it every program of the grid patches it again at each helper call.
    from triton.runtime import interpreter

    assert hasattr(interpreter._patch_lang, "__wrapped__"), "tests/triton_interpreter.py is not in effect"
    patched = []
    patch_core = interpreter._patch_lang_core

    def counting(lang, scope):
        patched.append(lang)
        return patch_core(lang, scope)

    monkeypatch.setattr(interpreter, "_patch_lang_core", counting)

    def patches_per_step(chunks: int) -> int:
        params = make_params([(CHUNK * chunks - 5,), (9,)], torch.float32)
        opt = PMDLAMB(params, backend="triton")
        for p in params:
            p.grad = torch.randn_like(p)
        patched.clear()
        opt.step()
        return len(patched)

    patches_per_step(1)  # the first step of the process also patches what its first launches build once
    assert patches_per_step(1) == patches_per_step(6) > 0
    monkeypatch.setattr(interpreter, "_patch_lang", interpreter._patch_lang.__wrapped__)
    assert patches_per_step(6) > patches_per_step(1)


class _Counting:
    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


AOT = Path(__file__).with_name("triton_aot.py")


@pytest.fixture(scope="module")
def compiled():
    if not HAVE_TRITON:
        pytest.skip("needs Triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(AOT), "80", "90"], capture_output=True, text=True, env=env,
                         cwd=AOT.parent.parent)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines()]


DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}


def _streams(r):
    """The dtypes of the streams of a variant's main loop, (loads, stores): x is read from its fp32 master
    when it has one, and pass 2 writes both (NOTE [two passes])."""
    x = "fp32" if r["masters"] else r["x"]
    return {
        "pmd_lamb_moments_kernel": ([x, r["g"], r["moments"], r["moments"]], [r["moments"], r["moments"]]),
        "pmd_lamb_update_kernel": ([x, r["moments"], r["moments"]], [r["x"], *(["fp32"] if r["masters"] else [])]),
        "grad_sumsq_kernel": ([r["g"]], []),
        "tensor_sums_kernel": ([], []),
    }[r["kernel"].split("[")[0]]


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(compiled):
    assert {r["arch"] for r in compiled} == {"sm_80", "sm_90a"}
    # targets × (dtypes × kernels + the sums for 2 math types + 2 mixed-precision variants × 2 passes)
    assert len(compiled) == 2 * (4 * 3 + 2 + 2 * 2)
    for r in compiled:
        assert r["spill_bytes"] == 0, r


def test_main_loops_use_128_bit_global_loads(compiled):
    from largedet_kernels.backends import triton as backend

    per_thread = backend.BLOCK // (32 * backend.NUM_WARPS)  # elements of a tile each thread moves
    for r in compiled:
        loads, stores = (sum(per_thread * DTYPE_BYTES[d] // 16 for d in ds) for ds in _streams(r))
        assert r["ldg128"] >= loads, r
        assert r["stg128"] >= stores, r


def test_bf16_stores_round_with_the_native_conversion(compiled):
    # NOTE [bf16 bits]: compiled, rounding to nearest is the GPU's cvt; the integer spelling is the interpreter's,
    # but for the NaN of stochastic rounding, in the one kernel that may round stochastically.
    from largedet_kernels.backends import triton as backend

    per_thread = backend.BLOCK // (32 * backend.NUM_WARPS)
    for r in compiled:
        bf16_stores = _streams(r)[1].count("bf16")
        stochastic = r["kernel"].startswith("pmd_lamb_update_kernel") and r["x"] == "bf16" and not r["masters"]
        assert r["cvt_bf16"] >= per_thread * bf16_stores and (r["f2f_bf16"] > 0) == (bf16_stores > 0), r
        assert r["nearest_addend"] == 0 and (r["quiet_nan"] > 0) == stochastic, r
