"""LAMB against an independent re-derivation of apex FusedLAMB's update.

``_apex_step`` follows apex's code path (csrc/multi_tensor_lamb.cu and
apex/optimizers/fused_lamb.py), not our reference: the global norm as an L2
norm of per-list norms, ``clipped_global_grad_norm = norm / max`` dividing the
gradient, stage 1 writing the update, stage 2 with ``lr * (‖p‖/‖update‖)``
only when ``use_nvlamb or decay != 0``, and one step counter per group.
"""

import pytest
import torch

from harness import SHAPES, make_params, random_grads

from largedet_kernels import LAMB


def _apex_step(groups, states, max_grad_norm, adam_w_mode, use_nvlamb):
    grads = [p.grad for g in groups for p in g["params"] if p.grad is not None]
    global_grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    clipped = global_grad_norm / max_grad_norm if global_grad_norm > max_grad_norm else 1.0
    for group in groups:
        group["step"] = group.get("step", 0) + 1
        beta1, beta2 = group["betas"]
        bc1 = 1 - beta1 ** group["step"] if group["bias_correction"] else 1.0
        bc2 = 1 - beta2 ** group["step"] if group["bias_correction"] else 1.0
        beta3 = 1 - beta1 if group["grad_averaging"] else 1.0
        decay, eps = group["weight_decay"], group["eps"]
        for p in group["params"]:
            st = states.setdefault(p, {"m": torch.zeros_like(p), "v": torch.zeros_like(p)})
            scaled_grad = p.grad / clipped
            if not adam_w_mode:
                scaled_grad = scaled_grad + decay * p
            st["m"] = st["m"] * beta1 + beta3 * scaled_grad
            st["v"] = st["v"] * beta2 + (1 - beta2) * scaled_grad * scaled_grad
            update = (st["m"] / bc1) / (torch.sqrt(st["v"] / bc2) + eps)
            if adam_w_mode:
                update = update + decay * p
            ratio = group["lr"]
            if use_nvlamb or decay != 0.0:
                param_norm, update_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                if update_norm != 0 and param_norm != 0:
                    ratio = group["lr"] * (param_norm / update_norm)
            p.sub_(ratio * update)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(adam_w_mode=False),
        dict(use_nvlamb=True),
        dict(bias_correction=False, grad_averaging=False),
        dict(max_grad_norm=100.0),
        dict(weight_decay=0.0),
    ],
    ids=["defaults", "l2", "nvlamb", "no-bias-correction-no-averaging", "clip-inactive", "no-decay"],
)
def test_lamb_equals_apex_update(backend, kwargs):
    params = make_params(SHAPES, torch.float64, zero=(2,))
    twins = [p.detach().clone() for p in params]
    groups = [
        dict(params=params[:4], lr=2e-3),
        dict(params=params[4:], weight_decay=0.0 if "weight_decay" not in kwargs else kwargs["weight_decay"]),
    ]
    opt = LAMB(groups, backend=backend, **kwargs)
    apex_groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": twins[:4] if i == 0 else twins[4:]}
        for i, g in enumerate(opt.param_groups)
    ]
    states = {}
    gen = torch.Generator().manual_seed(5)
    for _ in range(6):
        grads = random_grads(params, gen)
        for p, t, g in zip(params, twins, grads):
            p.grad, t.grad = g.clone(), g.clone()
        opt.step()
        with torch.no_grad():
            _apex_step(
                apex_groups, states, opt.defaults["max_grad_norm"], kwargs.get("adam_w_mode", True),
                kwargs.get("use_nvlamb", False),
            )  # fmt: skip
        for p, t in zip(params, twins):
            torch.testing.assert_close(p.detach(), t, rtol=1e-10, atol=1e-12)


def test_lamb_defaults_are_apex_defaults():
    # apex.optimizers.FusedLAMB.__init__'s keyword defaults.
    opt = LAMB([torch.nn.Parameter(torch.zeros(1))])
    d = opt.defaults
    assert (d["lr"], d["bias_correction"], d["betas"], d["eps"], d["weight_decay"]) == (
        1e-3, True, (0.9, 0.999), 1e-6, 0.01,
    )  # fmt: skip
    assert (d["adam_w_mode"], d["grad_averaging"], d["max_grad_norm"], d["use_nvlamb"]) == (True, True, 1.0, False)
    assert opt.set_grad_none
