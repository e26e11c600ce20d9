"""Non-finite hyper-parameters are refused wherever they enter, naming themselves and their param group; the
optimizer says which backend steps each device."""

import math
import subprocess
import sys

import pytest
import torch
from conftest import CPU_BACKENDS

from largedet_kernels import LAMB, PMDLAMB, dispatch, optimizer

NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
# Every numeric hyper-parameter of a param group (optimizer.HYPER_KEYS), betas and trust ratio bounds by element.
NUMERIC = ["lr", "beta1", "beta2", "eps", "weight_decay", "alpha", "cycle_length", "max_grad_norm", "seed",
           "trust_ratio_min", "trust_ratio_max"]  # fmt: skip
# The constructor arguments of each optimizer among them; the others are set through param groups.
ARGUMENTS = {PMDLAMB: set(NUMERIC), LAMB: set(NUMERIC) - {"alpha", "cycle_length"}}


def _params(n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(3 + 2 * i, generator=gen)) for i in range(n)]


def _with(settings, key, value):
    """``settings`` (kwargs or a param group) with hyper-parameter ``key`` set to ``value``."""
    if key in ("beta1", "beta2"):
        betas = list(settings.get("betas", (0.9, 0.999)))
        betas[key == "beta2"] = value
        return {**settings, "betas": tuple(betas)}
    if key in ("trust_ratio_min", "trust_ratio_max"):
        bounds = [0.01, 10.0]
        bounds[key == "trust_ratio_max"] = value
        return {**settings, "trust_ratio_bounds": tuple(bounds)}
    return {**settings, key: value}


def _name(key):
    return "betas" if key.startswith("beta") else "trust_ratio_bounds" if key.startswith("trust_ratio") else key


def _grads(params, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def test_every_numeric_hyper_parameter_is_covered():
    keys = {_name(k) for k in NUMERIC}
    group = PMDLAMB(_params()).param_groups[0]
    numeric = {k for k in optimizer.HYPER_KEYS if not isinstance(group[k], bool)}
    assert keys == numeric


@pytest.mark.parametrize("value", NON_FINITE.values(), ids=NON_FINITE.keys())
@pytest.mark.parametrize("key", NUMERIC)
@pytest.mark.parametrize("cls", [PMDLAMB, LAMB])
def test_refused_at_construction(cls, key, value):
    if key in ARGUMENTS[cls]:
        with pytest.raises(ValueError, match=rf"Invalid {_name(key)}: "):
            cls(_params(), **_with({}, key, value))
    a, b = _params(), _params(seed=1)
    with pytest.raises(ValueError, match=rf"Invalid {_name(key)} in param group 1: "):
        cls([dict(params=a), _with(dict(params=b), key, value)])


@pytest.mark.parametrize("value", NON_FINITE.values(), ids=NON_FINITE.keys())
@pytest.mark.parametrize("key", NUMERIC)
@pytest.mark.parametrize("cls", [PMDLAMB, LAMB])
def test_refused_when_changed_before_a_step(cls, key, value):
    a, b = _params(), _params(seed=1)
    opt = cls([dict(params=a), dict(params=b)], lr=0.1)
    _grads(a + b)
    opt.step()  # the step cache is built: the next step only compares the hyper-parameters
    before = [p.detach().clone() for p in a + b]
    good = dict(opt.param_groups[1])
    opt.param_groups[1].update(_with(good, key, value))
    with pytest.raises(ValueError, match=rf"Invalid {_name(key)} in param group 1: "):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a + b, before)), "a refused step changed a parameter"
    opt.param_groups[1].update(good)
    opt.step()
    assert not any(torch.equal(p, q) for p, q in zip(a + b, before))


@pytest.mark.parametrize("value", NON_FINITE.values(), ids=NON_FINITE.keys())
@pytest.mark.parametrize("key", NUMERIC)
@pytest.mark.parametrize("cls", [PMDLAMB, LAMB])
def test_refused_in_an_added_param_group(cls, key, value):
    opt = cls(_params())
    with pytest.raises(ValueError, match=rf"Invalid {_name(key)} in param group 1: "):
        opt.add_param_group(_with(dict(params=_params(seed=1)), key, value))
    assert len(opt.param_groups) == 1


def test_hyper_parameters_are_checked_only_when_they_change(monkeypatch):
    a = _params(5)
    opt = PMDLAMB([dict(params=a[:2]), dict(params=a[2:])], lr=0.1)
    _grads(a)
    opt.step()
    checked = []
    check = optimizer._check_hyper
    monkeypatch.setattr(optimizer, "_check_hyper", lambda group, where="": (checked.append(where), check(group, where)))
    for _ in range(3):
        opt.step()
    assert checked == []
    opt.param_groups[1]["lr"] = 0.05
    opt.step()
    opt.step()
    assert checked == [" in param group 0", " in param group 1"]


BAD_LRS = {"negative-tensor": torch.tensor(-1e-3), "nan-tensor": torch.tensor(float("nan")),
           "integer-tensor": torch.tensor([1], dtype=torch.int64), "beyond-float": 10**400}  # fmt: skip


@pytest.mark.parametrize("value", BAD_LRS.values(), ids=BAD_LRS.keys())
def test_an_lr_that_is_no_finite_number_is_refused(value):
    with pytest.raises(ValueError, match="Invalid lr: "):
        PMDLAMB(_params(), lr=value)
    opt = PMDLAMB(_params())
    opt.param_groups[0]["lr"] = value
    with pytest.raises(ValueError, match="Invalid lr in param group 0: "):
        opt.step()


# --- Which backend steps which device


def test_backends_before_any_step():
    auto = "cpu" if "cpu" in CPU_BACKENDS else "torch"
    cpu, meta = _params(), [torch.nn.Parameter(torch.empty(4, device="meta"))]
    opt = PMDLAMB([dict(params=cpu), dict(params=meta)])
    assert opt.backend == "auto"
    assert opt.backends == {torch.device("cpu"): auto, torch.device("meta"): "torch"}
    assert opt.backend_for("cpu") == auto and opt.backend_for(torch.device("meta")) == "torch"
    with pytest.raises(AttributeError):
        opt.backends = {}


@pytest.mark.parametrize("requested", CPU_BACKENDS)
def test_backends_names_the_backend_that_steps(requested, monkeypatch):
    a = _params(3)
    opt = LAMB(a, backend=requested)
    assert opt.backend == requested and opt.backends == {torch.device("cpu"): requested}
    stepped = []
    for name in dispatch.BACKEND_NAMES:
        if dispatch.unavailable_reason(name, torch.device("cpu")) is None:
            module = dispatch.backend_module(name)
            monkeypatch.setattr(module, "step", lambda *args, name=name, step=module.step: (stepped.append(name),
                                                                                            step(*args)))  # fmt: skip
    _grads(a)
    opt.step()
    assert stepped == [requested]
    assert opt.backends == {torch.device("cpu"): requested}


def test_an_unavailable_backend_for_a_device_is_reported():
    assert PMDLAMB(_params(), backend="torch").backend_for("meta") == "torch"
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("needs the CPU extension")
    with pytest.raises(dispatch.BackendUnavailableError, match="runs on CPU tensors.* on meta"):
        PMDLAMB(_params(), backend="cpu").backend_for("meta")


def test_the_package_exposes_recipe_and_documents_every_backend():
    code = ("import largedet_kernels as lk; assert 'recipe' in lk.__all__; "
            "assert lk.recipe.WarmupMultiStepLR and lk.recipe.param_groups; print('ok')")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    listed = " | ".join(f'"{name}"' for name in dispatch.BACKENDS)
    for cls in (PMDLAMB, LAMB):
        assert listed in " ".join(cls.__doc__.split()), cls.__name__
