"""The benchmark's cases under pytest-benchmark:

    pytest benchmarks/ --benchmark-only

One case per contender and parameter set (fp32; the first 40 tensors of each set on CPU).
"""

import pytest
import torch

from benchmarks.contenders import CONTENDERS
from benchmarks.step_time import CPU_SETS, GPU_SETS, load_shapes, make_params

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SETS = GPU_SETS if DEVICE.type == "cuda" else CPU_SETS
LIMIT = None if DEVICE.type == "cuda" else 40


@pytest.mark.parametrize("set_name", SETS)
@pytest.mark.parametrize("contender", CONTENDERS, ids=[c.name for c in CONTENDERS])
def test_step(benchmark, contender, set_name):
    reason = contender.unavailable(DEVICE)
    if reason:
        pytest.skip(reason)
    step = contender.make(make_params(load_shapes(set_name, LIMIT), DEVICE, torch.float32))
    step()  # warm-up: state, tables, compilation

    def synced_step():
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(synced_step, rounds=20 if DEVICE.type == "cuda" else 3, warmup_rounds=1)
