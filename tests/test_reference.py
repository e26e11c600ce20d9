"""The judge is checked too: against plain-Python arithmetic written from the paper."""

import math

import pytest
import torch

from largedet_kernels import reference


def test_xi_follows_eq3():
    T = 4
    assert [reference.xi(t, T) for t in range(1, 9)] == pytest.approx(
        [math.cos(math.pi / 2 * k / 4) for k in (1, 2, 3, 0, 1, 2, 3, 0)]
    )
    assert reference.xi(T, T) == 1.0  # a new cycle starts with the full history
    assert reference.xi(7, None) == 1.0


def _python_step(x, g, m, v, t, lr, b1, b2, eps, wd, alpha, T):
    """Algorithm 1 lines 5–9 on plain Python lists."""
    xi = math.cos(math.pi / 2 * (t % T) / T)
    m = [xi * b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
    v = [xi * b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
    u = [mi / math.sqrt(vi + eps) + wd * xi_ for mi, vi, xi_ in zip(m, v, x)]
    x_norm, u_norm = math.sqrt(sum(a * a for a in x)), math.sqrt(sum(a * a for a in u))
    ratio = x_norm / u_norm if x_norm > 0 and u_norm > 0 else 1.0
    return [xi_ - lr * alpha * ratio * ui for xi_, ui in zip(x, u)], m, v


@pytest.mark.parametrize("x0", [[0.5, -1.25, 2.0], [0.0, 0.0, 0.0]], ids=["random", "zero-norm"])
def test_reference_matches_plain_python(x0):
    hp = dict(lr=0.3, b1=0.8, b2=0.95, eps=1e-3, wd=0.1, alpha=0.05, T=3)
    x, m, v = list(x0), [0.0] * 3, [0.0] * 3
    tx = torch.tensor(x0, dtype=torch.float64)
    tm, tv = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for t in range(1, 8):
        g = [math.sin(t + i) for i in range(3)]
        x, m, v = _python_step(x, g, m, v, t, **hp)
        reference.pmd_lamb_step(
            tx, torch.tensor(g, dtype=torch.float64), tm, tv, t, lr=hp["lr"], beta1=hp["b1"], beta2=hp["b2"],
            eps=hp["eps"], weight_decay=hp["wd"], alpha=hp["alpha"], cycle_length=hp["T"],
        )  # fmt: skip
        assert tx.tolist() == pytest.approx(x, rel=1e-12, abs=1e-15)
        assert tm.tolist() == pytest.approx(m, rel=1e-12)
        assert tv.tolist() == pytest.approx(v, rel=1e-12)
    assert any(a != 0 for a in x), "a zero-initialised tensor must still train"


def test_one_element_step_is_a_signed_step_of_size_lr_alpha_abs_x():
    # For one element ‖x‖/‖u‖ = |x|/|u|, so x moves by η·α·|x| against sign(u).
    x = torch.tensor([2.0], dtype=torch.float64)
    reference.pmd_lamb_step(
        x, torch.tensor([0.3], dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
        torch.zeros(1, dtype=torch.float64), 1, lr=0.5, beta1=0.9, beta2=0.99, eps=1e-8,
        weight_decay=0.0, alpha=0.1, cycle_length=10,
    )  # fmt: skip
    assert x.item() == pytest.approx(2.0 - 0.5 * 0.1 * 2.0)


def test_clip_factor():
    grads = [torch.tensor([3.0, 0.0], dtype=torch.float64), torch.tensor([4.0], dtype=torch.float64)]
    assert reference.clip_factor(grads, 1.0).item() == pytest.approx(0.2)
    assert reference.clip_factor(grads, 10.0).item() == 1.0
    assert reference.clip_factor(grads, None).item() == 1.0
