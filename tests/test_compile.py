"""torch.compile(opt.step, fullgraph=True) for the backends whose step dynamo can trace.

The triton and cuda backends address tensors through device pointer tables built from
data_ptr(), which dynamo cannot trace: compiling their step raises and says so.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from largedet_kernels import PMDLAMB
from conftest import CPU_BACKENDS

COMPILABLE = [b for b in CPU_BACKENDS if b in ("torch", "cpu")]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _train(step_of, backend: str, max_grad_norm, dtype=torch.float32, **options):
    model = _model().to(dtype)
    opt = PMDLAMB(model.parameters(), lr=1e-2, weight_decay=0.01, cycle_length=2, bias_correction=True,
                  max_grad_norm=max_grad_norm, backend=backend, **options)  # fmt: skip
    step = step_of(opt)
    data = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1)).to(dtype)
    for x in data:
        opt.zero_grad()
        model(x).square().mean().backward()
        step()
    return model, opt


MIXED = {
    "fp32": (torch.float32, {}),
    "bf16-masters-bf16-moments": (torch.bfloat16, dict(moment_dtype=torch.bfloat16)),
    "bf16-stochastic": (torch.bfloat16, dict(stochastic_rounding=True)),
}


@pytest.mark.parametrize("dtype,options", MIXED.values(), ids=MIXED.keys())
@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
@pytest.mark.parametrize("backend", COMPILABLE)
def test_compiled_step_matches_eager_without_recompiling(backend, max_grad_norm, dtype, options):
    torch._dynamo.reset()
    counters.clear()
    eager_model, eager_opt = _train(lambda opt: opt.step, backend, max_grad_norm, dtype, **options)
    with torch._dynamo.config.patch(error_on_recompile=True):
        model, opt = _train(lambda opt: torch.compile(opt.step, fullgraph=True), backend, max_grad_norm, dtype,
                            **options)  # fmt: skip
    assert counters["stats"]["unique_graphs"] == 1  # three steps, one graph
    ulp = 0 if dtype == torch.float32 else 2.0**-7  # a bf16 parameter may round the other way once
    for p, q in zip(eager_model.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6 + ulp, atol=1e-7)
        assert opt.state[q].keys() == eager_opt.state[p].keys()
        for key in opt.state[q]:
            torch.testing.assert_close(opt.state[q][key], eager_opt.state[p][key], rtol=1e-6 + ulp, atol=1e-9)


def test_compiling_a_pointer_table_backend_says_why_it_cannot(triton_backend):
    # The triton and cuda backends read tensors through data_ptr() tables: refused with the reason, not mistraced.
    torch._dynamo.reset()
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    opt = PMDLAMB([p], backend="triton")
    with pytest.raises(Exception, match="cannot trace the triton backend.*backend='torch'"):
        torch.compile(opt.step, fullgraph=True, backend="eager")()
    opt.step()  # eager still steps
    assert opt.state[p]["step"].item() == 1
