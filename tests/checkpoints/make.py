"""Writes the checkpoints of one release of the state format (docs/state-format.md), with the package of
that release first on sys.path:

    git worktree add /tmp/release <commit>
    PYTHONPATH=/tmp/release python tests/checkpoints/make.py v<N> <commit>

For PMDLAMB and LAMB, each with two param groups that differ from the defaults and from each other and every
setting the release's constructor takes set away from its default, the torch backend steps a few tensors
N_BEFORE times and the checkpoint keeps the parameters, the optimizer's state_dict, the gradients of N_AFTER
more steps and the parameters those steps gave. tests/test_state_format.py loads each with today's package.
"""

import inspect
import sys
from pathlib import Path

import torch

import largedet_kernels
from largedet_kernels import LAMB, PMDLAMB

N_BEFORE, N_AFTER = 3, 3
SHAPES = [(5, 3), (7,), (4, 2, 3), (6,)]

# Settings by optimizer: its constructor's (where the release has them) and its two groups'.
SETTINGS = {
    "PMDLAMB": dict(
        optimizer=dict(lr=0.5, betas=(0.8, 0.99), eps=1e-7, weight_decay=1e-3, alpha=0.02, cycle_length=4,
                       bias_correction=True, eps_inside_sqrt=False, grad_averaging=False, max_grad_norm=3.0,
                       master_weights=True, moment_dtype=torch.bfloat16, trust_ratio_bounds=(0.05, 5.0)),  # fmt: skip
        groups=(dict(), dict(lr=0.2, weight_decay=0.0, cycle_length=None, alpha=0.05, adapt=False)),
        dtypes=(torch.float32, torch.bfloat16, torch.float32, torch.float32),
    ),
    "LAMB": dict(
        optimizer=dict(lr=0.05, bias_correction=False, betas=(0.85, 0.995), eps=1e-5, weight_decay=0.02,
                       adam_w_mode=False, grad_averaging=False, max_grad_norm=0.5, use_nvlamb=False,
                       master_weights=False, stochastic_rounding=True, seed=12345, maximize=True),  # fmt: skip
        groups=(dict(adapt=True), dict(lr=0.01, weight_decay=0.0, trust_ratio_bounds=(0.5, 2.0))),
        dtypes=(torch.float32, torch.bfloat16, torch.float32, torch.float32),
    ),
}


def make(name: str) -> dict:
    cls = {"PMDLAMB": PMDLAMB, "LAMB": LAMB}[name]
    setting = SETTINGS[name]
    accepted = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in setting["optimizer"].items() if k in accepted}
    # The settings of param groups that the release has (an older one would keep an unknown key unread).
    known = cls([torch.zeros(1, requires_grad=True)], backend="torch", **kwargs).defaults
    group_settings = [{k: v for k, v in g.items() if k in known} for g in setting["groups"]]
    gen = torch.Generator().manual_seed(len(name))
    params = [torch.randn(s, generator=gen).to(d).requires_grad_() for s, d in zip(SHAPES, setting["dtypes"])]
    groups = [{"params": params[:2], **group_settings[0]}, {"params": params[2:], **group_settings[1]}]
    opt = cls(groups, backend="torch", **kwargs)
    grads = [[torch.randn(p.shape, generator=gen).to(p.dtype) for p in params] for _ in range(N_BEFORE + N_AFTER)]

    def steps(which):
        for step_grads in which:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()

    steps(grads[:N_BEFORE])
    checkpoint = dict(
        optimizer=name, kwargs=kwargs, groups=group_settings,
        params=[p.detach().clone() for p in params], state_dict=opt.state_dict(), grads_after=grads[N_BEFORE:],
    )  # fmt: skip
    checkpoint["state_dict"] = torch.utils._pytree.tree_map(
        lambda v: v.clone() if isinstance(v, torch.Tensor) else v, checkpoint["state_dict"]
    )
    steps(grads[N_BEFORE:])
    checkpoint["params_after"] = [p.detach().clone() for p in params]
    return checkpoint


if __name__ == "__main__":
    release, commit = sys.argv[1], sys.argv[2]
    print(f"state format {release} from {largedet_kernels.__file__} at {commit}")
    torch.save(dict(release=release, commit=commit, torch=str(torch.__version__),
                    checkpoints={name: make(name) for name in SETTINGS}),
               Path(__file__).resolve().parent / f"{release}.pt")  # fmt: skip
