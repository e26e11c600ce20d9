"""NOTE [sharded norms] without a process group: shards of every tensor stepped in two
halves with their norms summed in between, on this machine's backends (tests/test_gpu.py
runs the same checks on the GPU backends; tests/test_distributed.py on real ranks)."""

import pytest
import torch
from harness import FP32_MATH_RTOL, check_halves_equal_step, check_sharded_halves


@pytest.mark.parametrize("dtype,rtol,ulps", [(torch.float64, 1e-10, 0), (torch.float32, FP32_MATH_RTOL, 1)],
                         ids=["fp64", "fp32"])  # fmt: skip
@pytest.mark.parametrize("options", [dict(), dict(bias_correction=True, eps_inside_sqrt=False)], ids=["paper", "lamb"])
def test_shards_stepped_in_halves_match_the_reference(backend, dtype, rtol, ulps, options):
    check_sharded_halves(backend, dtype, "cpu", rtol, ulps, **options)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_halves_with_local_sums_equal_one_step(backend, dtype):
    check_halves_equal_step(backend, dtype, "cpu")
