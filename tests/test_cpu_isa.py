"""The CPU kernels per ISA (largedet_kernels/_extensions.py): the process loads the variant its CPU runs,
or LARGEDET_CPU_ISA's. Every variant this CPU runs agrees with the float64 reference and with the others
within float32 rounding, gives the same bits on 1 and 2 threads, and is the only one in its process; an ISA
the CPU lacks is an error. One subprocess per variant: a process loads one."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CPU_BACKENDS
from harness import FP32_MATH_RTOL, ulp
from largedet_kernels import _extensions
from largedet_kernels.backends import cpu

pytestmark = pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="needs the CPU extension")

TESTS = Path(__file__).resolve().parent

_VARIANT = r"""
import json, sys
import torch
from harness import FP32_MATH_RTOL, make_params, run_against_reference
from largedet_kernels import PMDLAMB, _extensions
from largedet_kernels.backends import cpu

isa, seed, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
# Odd sizes, one across a chunk boundary (cpu.CHUNK), and the vector tails of every width.
SHAPES = [(cpu.CHUNK + 3,), (7, 13), (1,), (65,), (3, 5, 7), (31,)]
OPTIONS = dict(lr=0.05, weight_decay=0.01, alpha=0.3, cycle_length=3, max_grad_norm=1.0, backend="cpu")

for dtype in (torch.float32, torch.bfloat16):
    params = make_params(SHAPES, dtype, seed=seed)
    run_against_reference(PMDLAMB(params, **OPTIONS), steps=3, rtol=FP32_MATH_RTOL, ulps=1, resync=True,
                          seed=seed + 1)

runs = []
for threads in (1, 2):
    torch.set_num_threads(threads)
    params = make_params(SHAPES, torch.float32, seed=seed)
    opt = PMDLAMB(params, **OPTIONS)
    gen = torch.Generator().manual_seed(seed + 2)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    runs.append([p.detach().clone() for p in params] + [opt.state[p]["exp_avg_sq"] for p in params])
same_bits = all(torch.equal(a, b) for a, b in zip(*runs))

# One step from the same values, for the comparison across variants.
params = make_params(SHAPES, torch.float32, seed=seed)
before = [p.detach().clone() for p in params]
gen = torch.Generator().manual_seed(seed + 3)
for p in params:
    p.grad = torch.randn(p.shape, generator=gen)
PMDLAMB(params, **OPTIONS).step()
torch.save(dict(before=before, after=[p.detach() for p in params]), out)

maps = open("/proc/self/maps").read()
loaded = [i for i in _extensions.CPU_ISAS if f"_C_cpu_{i}." in maps or f"largedet_kernels_cpu_{i}." in maps]
print(json.dumps(dict(isa=cpu.ISA, module=_extensions.CPU.module().__name__, loaded=loaded, same_bits=same_bits)))
"""


def _run(isa: str, seed: int, out: Path) -> dict:
    env = dict(os.environ, LARGEDET_CPU_ISA=isa, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    proc = subprocess.run([sys.executable, "-c", _VARIANT, isa, str(seed), str(out)], env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, f"{isa} (seed {seed}): {proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_variant_this_cpu_runs(tmp_path):
    seed = random.SystemRandom().randrange(2**30)
    steps = {}
    for isa in _extensions.cpu_isas_supported():
        result = _run(isa, seed, tmp_path / f"{isa}.pt")
        assert result["isa"] == isa and result["module"].endswith(f"cpu_{isa}"), result
        assert result["loaded"] == [isa], result  # the only variant in the process
        assert result["same_bits"], (isa, seed)
        steps[isa] = torch.load(tmp_path / f"{isa}.pt")
    first, *others = steps
    for isa in others:
        for x0, a, b in zip(steps[first]["before"], steps[first]["after"], steps[isa]["after"]):
            # Each within FP32_MATH_RTOL of the update and an ulp of x of the reference: of each other, twice that.
            bound = 2 * (FP32_MATH_RTOL * (a.double() - x0.double()).abs().max() + ulp(a.double(), torch.float32))
            assert ((a.double() - b.double()).abs() <= bound).all(), (first, isa, seed)


def test_the_default_is_torchs_detection(monkeypatch):
    monkeypatch.delenv("LARGEDET_CPU_ISA", raising=False)
    for capability, isa in (("AVX512", "avx512"), ("AVX2", "avx2"), ("DEFAULT", "generic"), ("NO AVX", "generic")):
        monkeypatch.setattr(_extensions, "_ISA", None)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        assert _extensions.cpu_isa() == isa


def test_a_forced_isa_the_cpu_lacks_is_an_error(monkeypatch):
    monkeypatch.setattr(_extensions, "_ISA", None)
    monkeypatch.setattr(_extensions, "cpu_isas_supported", lambda: ("generic",))
    monkeypatch.setenv("LARGEDET_CPU_ISA", "avx512")
    with pytest.raises(RuntimeError, match="LARGEDET_CPU_ISA=avx512, but this CPU lacks avx512: it runs generic"):
        _extensions.cpu_isa()
    monkeypatch.setenv("LARGEDET_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="LARGEDET_CPU_ISA must be one of"):
        _extensions.cpu_isa()
    monkeypatch.setenv("LARGEDET_CPU_ISA", "generic")
    assert _extensions.cpu_isa() == "generic"


def test_the_process_loaded_its_isa():
    assert cpu.ISA == _extensions.cpu_isa()
    assert _extensions.CPU.module().__name__.endswith(f"cpu_{cpu.ISA}")
