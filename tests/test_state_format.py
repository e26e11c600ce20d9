"""Checkpoints of every release of the state format load and resume (docs/state-format.md).

tests/checkpoints/v<N>.pt were written by tests/checkpoints/make.py with the package of each release: the
parameters and state_dict of PMDLAMB and LAMB after a few steps of the torch backend, then the gradients of
a few more steps and the parameters those steps gave in that release. Here every backend loads the
state_dict into today's optimizer, steps the same gradients and must move the parameters as the release
did: bit for bit on the torch backend for the release whose update rule is today's, within one step's
rounding (fp32) and one unit in the last place per step (bf16) elsewhere.
"""

from pathlib import Path

import pytest
import torch

from harness import ulp

from largedet_kernels import LAMB, PMDLAMB

CHECKPOINTS = sorted((Path(__file__).resolve().parent / "checkpoints").glob("v*.pt"))
# The releases whose torch backend steps as today's does, bit for bit.
SAME_UPDATE = ("v2", "v3")


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_every_release_of_the_format_has_its_checkpoint():
    from largedet_kernels import optimizer

    assert [p.stem for p in CHECKPOINTS] == [f"v{n}" for n in range(1, optimizer.STATE_FORMAT + 1)]
    assert sorted(set(optimizer.FORMAT_HISTORY.values())) == [p.stem for p in CHECKPOINTS[1:]]


@pytest.mark.parametrize("name", ["PMDLAMB", "LAMB"])
@pytest.mark.parametrize("path", CHECKPOINTS, ids=[p.stem for p in CHECKPOINTS])
def test_a_checkpoint_of_every_release_loads_and_resumes(path, name, every_backend):
    backend = every_backend
    from largedet_kernels import optimizer

    release = _load(path)
    saved = release["checkpoints"][name]
    cls = {"PMDLAMB": PMDLAMB, "LAMB": LAMB}[name]
    params = [p.clone().requires_grad_() for p in saved["params"]]
    # The groups' own settings come from the state_dict; the constructor's are the release's.
    groups = [{"params": params[:2]}, {"params": params[2:]}]
    # A release before master weights stepped every parameter as it is stored.
    kwargs = {"master_weights": False, **saved["kwargs"]}
    opt = cls(groups, backend=backend, **kwargs)
    opt.load_state_dict(saved["state_dict"])
    for group, saved_group, settings in zip(opt.param_groups, saved["state_dict"]["param_groups"], saved["groups"]):
        added = {key for key, since in optimizer.FORMAT_HISTORY.items() if since > release["release"]}
        assert set(group) == set(saved_group) | added
        assert all(group[key] == opt.defaults[key] for key in added)
        assert all(group[key] == value for key, value in settings.items())
    for grads in saved["grads_after"]:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    for p, before, then in zip(params, saved["params"], saved["params_after"]):
        moved, moved_then = (p.detach() - before).double(), (then - before).double()
        steps = len(saved["grads_after"])
        if backend == "torch" and release["release"] in SAME_UPDATE:
            # The same update as the release's: torch's CPU ops may round apart on another CPU than the one that
            # wrote the checkpoint (LAMB's differ by an ulp on an Intel Xeon from the checkpoints' own): an ulp per
            # step.
            assert ((p.detach().double() - then.double()).abs() <= steps * ulp(then.double(), p.dtype)).all()
        elif p.dtype == torch.bfloat16:
            assert ((moved - moved_then).abs() <= steps * ulp(then.double(), torch.bfloat16)).all()
        else:
            torch.testing.assert_close(moved, moved_then, rtol=1e-4, atol=1e-6 * before.abs().max().item())
        assert moved.abs().max() > 0
