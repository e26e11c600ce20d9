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


def _train(step_of, backend: str, max_grad_norm):
    model = _model()
    opt = PMDLAMB(model.parameters(), lr=1e-2, weight_decay=0.01, cycle_length=2, bias_correction=True,
                  max_grad_norm=max_grad_norm, backend=backend)  # fmt: skip
    step = step_of(opt)
    data = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1))
    for x in data:
        opt.zero_grad()
        model(x).square().mean().backward()
        step()
    return model, opt


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
@pytest.mark.parametrize("backend", COMPILABLE)
def test_compiled_step_matches_eager_without_recompiling(backend, max_grad_norm):
    torch._dynamo.reset()
    counters.clear()
    eager_model, eager_opt = _train(lambda opt: opt.step, backend, max_grad_norm)
    with torch._dynamo.config.patch(error_on_recompile=True):
        model, opt = _train(lambda opt: torch.compile(opt.step, fullgraph=True), backend, max_grad_norm)
    assert counters["stats"]["unique_graphs"] == 1  # three steps, one graph
    for p, q in zip(eager_model.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[q][key], eager_opt.state[p][key], rtol=1e-6, atol=1e-9)


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
