"""PMDLAMB and LAMB: the ``torch.optim.Optimizer`` front end of every backend.

This file owns what is common to all backends: argument checks, optimizer
state, GradScaler's ``grad_scale``/``found_inf``, and global gradient-norm clipping.
The step cache (step_cache.py) sorts the tensors into (device, dtype) buckets across
param groups; the update itself happens in a backend chosen by
:mod:`largedet_kernels.dispatch`; sharding.py holds what FSDP2's DTensors need.

NOTE [master weights]
    PMD-LAMB moves each tensor by η·α of its norm per step (1.2e-5 of it at η = 1e-3, α = 0.012),
    and a bf16 number only changes when it moves by about 2⁻⁹ of itself: rounded to nearest, most
    updates of a bf16 parameter vanish. ``master_weights`` keeps an fp32 copy of each fp16/bf16
    parameter in its state (``state["master"]``, a DTensor sharded like its parameter under FSDP2):
    the step reads and writes the master, forms the trust ratio from ‖master‖, and writes the
    parameter as the master rounded to nearest. A skipped step (GradScaler's found_inf) leaves it as
    it is. The masters are in state_dict(); a checkpoint without them starts them from the
    parameters. A parameter written by anything but the optimizer between two steps
    (``model.load_state_dict``, an in-place re-initialisation: its version counter moved; a write
    through ``p.data`` is not seen) hands its new value to its master at the next step, so the
    master never writes an old value back over it.
    ``"auto"`` keeps masters for fp16/bf16 parameters unless stochastic_rounding is asked for,
    which keeps bf16 parameters without them (NOTE [stochastic rounding] in rounding.py).
    ``moment_dtype=torch.bfloat16`` stores both moments in bf16 (math in fp32, stores rounded to
    nearest, r formed from the stored values): 4 B per parameter instead of 8.
"""

import itertools
import math
import numbers
import operator
from types import ModuleType
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch.optim import Optimizer

from . import dispatch, rounding, telemetry
from .sharding import local, reduce_per_key, state_like
from .step_cache import Entry, StepCache
from .telemetry import TrustRatios

# What step() reads from a param group: a change of any re-validates them and refreshes the hyper tables.
HYPER_KEYS = ("lr", "betas", "eps", "weight_decay", "alpha", "cycle_length", "bias_correction", "eps_inside_sqrt",
              "grad_averaging", "adam_w_mode", "use_nvlamb", "max_grad_norm", "stochastic_rounding",
              "seed", "maximize", "adapt", "trust_ratio_bounds")  # fmt: skip
# Hyper-parameters of the whole optimizer: a param group may not differ from the defaults in them.
OPTIMIZER_WIDE = ("max_grad_norm", "stochastic_rounding", "seed")
# Settings of the constructor only, kept as attributes (and by pickling), never in a param group.
CONSTRUCTOR_ONLY = ("backend", "master_weights", "moment_dtype", "telemetry")
# Keys a param group may hold beside its hyper-parameters: torch.optim's parameter names, and what lr
# schedulers read (torch's initial_lr, timm's lr_scale).
GROUP_EXTRAS = ("params", "param_names", "initial_lr", "lr_scale")
# torch.optim's keywords that choose an implementation, and what to use here instead.
TORCH_KEYWORDS = {
    "foreach": "backend= chooses the implementation here ('torch' is the foreach one)",
    "fused": "backend= chooses the implementation here ('cuda', 'triton' and 'cpu' are fused)",
    "capturable": "the fused backends are capturable as they are (docs/backends.md)",
    "differentiable": "the step is not differentiable",
}

# NOTE [state format] (docs/state-format.md)
#     The param-group keys added since the first release of the state format, with the release that added
#     each: a state_dict without one takes the optimizer's setting (__setstate__, which load_state_dict
#     calls, as torch's optimizers do). A per-tensor state key added since ("master", v2) is likewise
#     started when absent (_init_group). tests/checkpoints/ holds checkpoints of every release.
STATE_FORMAT = 3
FORMAT_HISTORY = {"stochastic_rounding": "v2", "seed": "v2", "maximize": "v3", "adapt": "v3",
                  "trust_ratio_bounds": "v3"}  # fmt: skip

LOW_PRECISION = (torch.float16, torch.bfloat16)
MASTER_DTYPE = torch.float32
MOMENT_DTYPES = (torch.float32, torch.bfloat16)
MASTER_WEIGHTS = ("auto", True, False)
_HYPERS = operator.itemgetter(*HYPER_KEYS)


def refuse_torch_keywords(cls: str, kwargs: Dict[str, Any]) -> None:
    """TypeError for each keyword a constructor does not take, saying what to use instead of torch.optim's."""
    for key in kwargs:
        if key in TORCH_KEYWORDS:
            raise TypeError(f"{cls} does not take torch.optim's {key}=: {TORCH_KEYWORDS[key]}")
        raise TypeError(f"{cls}.__init__() got an unexpected keyword argument {key!r}")


def finite_number(value: Any) -> bool:
    """A finite real number: a NaN or infinite hyper-parameter would make every tensor it reaches non-finite."""
    try:
        return isinstance(value, numbers.Real) and math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        return False


def _check_hyper(group: Dict[str, Any], where: str = "") -> None:
    """ValueError naming the argument (and ``where``, its param group) for every out-of-range or non-finite
    hyper-parameter."""
    lr, eps, wd, alpha = group["lr"], group["eps"], group["weight_decay"], group["alpha"]
    if isinstance(lr, torch.Tensor):  # NOTE [tensor lr] in backends/tables.py
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr.is_floating_point():
            raise ValueError(f"Invalid lr{where}: a tensor lr must be floating point, got {lr.dtype}")
        devices = {local(p).device for p in group.get("params", ())}
        if lr.device.type != "cpu" and any(d != lr.device for d in devices):
            on = ", ".join(sorted(map(str, devices)))
            raise ValueError(f"Invalid lr{where}: a tensor lr on {lr.device} for parameters on {on}: put it on "
                             "the CPU or on their device")  # fmt: skip
        lr = lr.item()  # when set or replaced, not at each step
    if not finite_number(lr) or lr < 0:
        raise ValueError(f"Invalid lr{where}: {lr!r} (must be a finite number >= 0, or a 1-element tensor of one)")
    if not finite_number(eps) or eps < 0:
        raise ValueError(f"Invalid eps{where}: {eps!r} (must be finite and >= 0)")
    betas = group["betas"]
    if len(betas) != 2 or not all(finite_number(b) and 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"Invalid betas{where}: {betas!r} (each must be in [0, 1))")
    if not finite_number(wd) or wd < 0:
        raise ValueError(f"Invalid weight_decay{where}: {wd!r} (must be finite and >= 0)")
    if not finite_number(alpha) or not alpha > 0:
        raise ValueError(f"Invalid alpha{where}: {alpha!r} (must be finite and > 0)")
    cycle = group["cycle_length"]
    if cycle is not None and (isinstance(cycle, bool) or not isinstance(cycle, numbers.Integral) or cycle < 1):
        raise ValueError(f"Invalid cycle_length{where}: {cycle!r} (must be an integer >= 1, or None for no decay)")
    max_norm = group["max_grad_norm"]
    if max_norm is not None and (not finite_number(max_norm) or not max_norm > 0):
        raise ValueError(f"Invalid max_grad_norm{where}: {max_norm!r} (must be finite and > 0, or None to disable "
                         "clipping)")  # fmt: skip
    for flag in ("stochastic_rounding", "maximize"):
        if not isinstance(group[flag], bool):
            raise ValueError(f"Invalid {flag}{where}: {group[flag]!r} (must be True or False)")
    adapt = group["adapt"]
    if adapt is not None and not isinstance(adapt, bool):
        raise ValueError(f"Invalid adapt{where}: {adapt!r} (must be True, False, or None for apex's rule)")
    bounds = group["trust_ratio_bounds"]
    if bounds is not None and not (isinstance(bounds, (tuple, list)) and len(bounds) == 2
                                   and all(finite_number(b) and b > 0 for b in bounds) and bounds[0] <= bounds[1]):
        raise ValueError(f"Invalid trust_ratio_bounds{where}: {bounds!r} (must be (lo, hi), finite, 0 < lo <= hi, "
                         "or None)")  # fmt: skip
    seed = group["seed"]
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < rounding.SEED_LIMIT:
        raise ValueError(f"Invalid seed{where}: {seed!r} (must be an integer in [0, 2**32))")


class _LambFamily(Optimizer):
    """PMD-LAMB's update with every option; PMDLAMB and LAMB differ only in defaults."""

    # GradScaler hands us grad_scale/found_inf instead of unscaling and syncing itself.
    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable, defaults: Dict[str, Any], backend: str, master_weights: Any,
                 moment_dtype: torch.dtype, telemetry: bool) -> None:  # fmt: skip
        dispatch.check_backend_name(backend)
        if not isinstance(telemetry, bool):
            raise ValueError(f"Invalid telemetry: {telemetry!r} (must be True or False)")
        _check_hyper(defaults)
        if not any(master_weights is choice for choice in MASTER_WEIGHTS):
            raise ValueError(f"Invalid master_weights: {master_weights!r} (must be 'auto', True or False)")
        if moment_dtype not in MOMENT_DTYPES:
            raise ValueError(f"Invalid moment_dtype: {moment_dtype!r} (must be torch.float32 or torch.bfloat16)")
        if master_weights is True and defaults["stochastic_rounding"]:
            raise ValueError(
                "stochastic_rounding rounds bf16 parameters that have no fp32 master weights, and "
                "master_weights=True gives every one a master: pass master_weights='auto' (masters for fp16 only) "
                "or False"
            )
        self.backend = backend
        self.master_weights = master_weights
        self.moment_dtype = moment_dtype
        self.telemetry = telemetry
        # What trust_ratios() reports beside the records: the last step's found_inf and ‖g‖ (telemetry on).
        self._last_step: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None)
        self._backend_of_device: Dict[torch.device, Tuple[str, ModuleType]] = {}
        self._step_cache = StepCache()
        super().__init__(params, defaults)

    # The attributes a copy keeps beside torch.optim's defaults, state and param groups.
    _SETTINGS: Tuple[str, ...] = CONSTRUCTOR_ONLY

    def __getstate__(self) -> Dict[str, Any]:
        return {**super().__getstate__(), **{name: getattr(self, name) for name in self._SETTINGS}}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """A copy's settings and fresh caches; groups of an earlier state format get the keys added since
        (NOTE [state format])."""
        super().__setstate__(state)
        for group in self.param_groups:
            for key in FORMAT_HISTORY:
                group.setdefault(key, self.defaults[key])
        self.__dict__.setdefault("telemetry", False)  # pickled before telemetry existed
        self._last_step = (None, None)
        self._backend_of_device = {}
        if "_step_cache" in self.__dict__:
            self._step_cache.invalidate()
        else:
            self._step_cache = StepCache()

    def _check_group(self, group: Dict[str, Any], index: int) -> None:
        _check_hyper(group, f" in param group {index}")
        for key in OPTIMIZER_WIDE:
            if group[key] != self.defaults[key]:
                why = "clips the global gradient norm over all param groups" if key == "max_grad_norm" else "is"
                raise ValueError(f"{key} {why} a setting of the whole optimizer: set it on the optimizer, "
                                 f"not per param group (param group {index})")  # fmt: skip

    def _has_master(self, p: torch.Tensor) -> bool:
        """Whether p's step runs on an fp32 master (NOTE [master weights])."""
        if p.dtype not in LOW_PRECISION or self.master_weights is False:
            return False
        return self.master_weights is True or not (self.defaults["stochastic_rounding"] and p.dtype == torch.bfloat16)

    def _moment_dtype(self, p: torch.Tensor) -> torch.dtype:
        """The dtype p's moments are stored in."""
        if p.dtype == torch.float64:
            if self.moment_dtype != torch.float32:
                raise ValueError(f"moment_dtype={self.moment_dtype} is for fp32 math: float64 parameters keep "
                                 "float64 moments; step them with another optimizer, or make them float32")  # fmt: skip
            return torch.float64
        return self.moment_dtype

    def _check_parameter_dtype(self, p: torch.Tensor) -> None:
        self._moment_dtype(p)
        if p.dtype == torch.float16 and self.defaults["stochastic_rounding"] and not self._has_master(p):
            raise ValueError("stochastic_rounding rounds bfloat16 parameters; a float16 parameter without a master "
                             "would be rounded to nearest: pass master_weights='auto' to keep masters for "
                             "float16")  # fmt: skip

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        index = len(self.param_groups)
        for key in param_group:
            if key in self._SETTINGS:
                # ZeroRedundancyOptimizer hands its constructor's arguments to every group: the same are taken.
                mine, theirs = getattr(self, key), param_group[key]
                if theirs != mine:
                    raise ValueError(f"{key} is a setting of the whole optimizer's constructor ({mine!r} here), not "
                                     f"of a param group (param group {index}: {theirs!r})")  # fmt: skip
                continue
            if key not in self.defaults and key not in GROUP_EXTRAS:
                raise ValueError(f"unknown key {key!r} in param group {index}: the keys are "
                                 f"{', '.join(sorted(self.defaults))} and {', '.join(GROUP_EXTRAS)}")  # fmt: skip
        params = param_group["params"]
        if not isinstance(params, (torch.Tensor, set)):  # a set is torch's TypeError
            params = param_group["params"] = list(params)
        if not isinstance(params, (torch.Tensor, set)) and len({id(p) for p in params}) != len(params):
            # Before torch's add_param_group, which only warns (docs/api.md).
            raise ValueError("a parameter appears twice in one param group: it would be stepped twice")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group, index)
            for p in group["params"]:
                if p.is_complex():
                    raise ValueError(f"complex parameters are not supported (got a {p.dtype} parameter)")
                if not p.is_floating_point():
                    raise ValueError(f"parameters must be floating point (got a {p.dtype} parameter)")
                self._check_parameter_dtype(p)
                self._backend(p.device)  # an explicit backend that cannot run raises now, not at the first step
        except Exception:
            self.param_groups.pop()
            raise
        self._step_cache.invalidate()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load param groups and state; state goes to each parameter's device.

        torch's default would cast the moments and masters to the parameter dtype (bf16
        for bf16 parameters) and alias the source tensors; here the moments take this
        optimizer's ``moment_dtype`` (converted when the checkpoint's differs), masters stay
        fp32 (started from the parameters when the checkpoint has none; dropped when this
        optimizer keeps none), ``step`` stays a float32 tensor, and everything is copied.
        """
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        self._step_cache.invalidate()
        ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(ids, params):
            if pid not in saved:
                continue
            s = saved[pid]
            moment = self._moment_dtype(p)
            state = {
                "step": torch.as_tensor(s["step"]).to(device=p.device, dtype=torch.float32, copy=True),
                "exp_avg": state_like(s["exp_avg"], p, moment),
                "exp_avg_sq": state_like(s["exp_avg_sq"], p, moment),
            }
            if "master" in s and self._has_master(p):
                state["master"] = state_like(s["master"], p, MASTER_DTYPE)
            for key in state.keys() - {"step"}:
                if state[key].shape != p.shape:
                    raise ValueError(
                        f"loaded state {key!r} has shape {tuple(state[key].shape)} "
                        f"but its parameter has shape {tuple(p.shape)}"
                    )
            self.state[p] = state

    def trust_ratios(self) -> TrustRatios:
        """The trust-ratio records of the last step (``telemetry=True``): per tensor ‖x‖, ‖u‖ and the ratio
        applied, keyed by name where the param groups carry ``param_names`` (docs/telemetry.md). It waits for
        the step to finish, which step() never does: call it when logging, not every step."""
        if not self.telemetry:
            raise RuntimeError(f"{type(self).__name__} records trust ratios only when constructed with telemetry=True")
        return telemetry.collect(self, self._step_cache.recorded(), *self._last_step)

    @property
    def backends(self) -> Dict[torch.device, str]:
        """The backend that steps each device's parameters: {device: backend name} over the devices of this
        optimizer's parameters, in the order first met. ``backend`` is what was asked for ("auto" included);
        this is what it resolved to (:mod:`largedet_kernels.dispatch`), decided before any step."""
        devices = dict.fromkeys(local(p).device for group in self.param_groups for p in group["params"])
        return {device: self._backend(device)[0] for device in devices}

    def backend_for(self, device: Any) -> str:
        """The name of the backend that steps (or would step) this optimizer's tensors on ``device``; raises
        BackendUnavailableError where the requested backend cannot run there."""
        return self._backend(torch.device(device))[0]

    def _backend(self, device: torch.device) -> Tuple[str, ModuleType]:
        """(name, module) of the backend that steps tensors of ``device``."""
        if device not in self._backend_of_device:
            name = dispatch.resolve(self.backend, device)
            self._backend_of_device[device] = name, dispatch.backend_module(name)
        return self._backend_of_device[device]

    def _init_group(self) -> None:
        """State for every parameter that has a gradient: zeros for a new one, and moved to the parameter's
        device and math dtype after ``p.data = p.data.to(...)``. torch.compile runs a method of this name
        eagerly before it traces step(), so a compiled first step sees the state of the next; it reads the
        state once, after the first call, so one call covers every group."""
        for p in itertools.chain.from_iterable(group["params"] for group in self.param_groups):
            if p.grad is None:
                continue
            state = self.state[p]
            self._check_parameter_dtype(p)
            moment_dtype = self._moment_dtype(p)
            if not state:
                moment = {"dtype": moment_dtype, "memory_format": torch.preserve_format}
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, **moment)
                state["exp_avg_sq"] = torch.zeros_like(p, **moment)
            for key in ("exp_avg", "exp_avg_sq"):
                m = state[key]
                if m.device != p.device or m.dtype != moment_dtype:
                    state[key] = state_like(m, p, moment_dtype)
            if state["step"].device != p.device:
                state["step"] = state["step"].to(p.device)
            # NOTE [master weights]: a new parameter, or a checkpoint without masters, starts them from p.
            if not self._has_master(p):
                state.pop("master", None)
            elif "master" not in state:
                state["master"] = p.detach().to(MASTER_DTYPE, memory_format=torch.preserve_format, copy=True)
            elif state["master"].device != p.device:
                state["master"] = state_like(state["master"], p, MASTER_DTYPE)

    def _hypers(self) -> List[Tuple[Any, ...]]:
        """Every group's hyper-parameters as the step cache compares them (KeyError for a missing one)."""
        return list(map(_HYPERS, self.param_groups))

    def _accept_hypers(self) -> List[Tuple[Any, ...]]:
        """Every group's hyper-parameters, checked, as the step cache compares them."""
        for i, group in enumerate(self.param_groups):
            self._check_group(group, i)
            group["betas"] = tuple(group["betas"])  # compared by value: no list to change in place
            if group["trust_ratio_bounds"] is not None:
                group["trust_ratio_bounds"] = tuple(group["trust_ratio_bounds"])
        return self._hypers()

    def _grad_factor(self, entries: List[Entry]) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """What every gradient is multiplied by: GradScaler's 1/scale × the clip factor; and the global ‖g‖
        (unscaled) where clipping needs it."""
        grad_scale: Optional[torch.Tensor] = getattr(self, "grad_scale", None)
        inv_scale = None if grad_scale is None else grad_scale.double().reciprocal().float()
        max_norm = self.defaults["max_grad_norm"]
        if max_norm is None:
            return inv_scale, None
        device = entries[0].bucket.device
        # NOTE [sharded norms] in sharding.py
        sumsq = reduce_per_key([(e.shard_key, e.backend.grad_sumsq(e.bucket)) for e in entries])
        dtype = torch.float64 if any(s.dtype == torch.float64 for s in sumsq) else torch.float32
        total = sumsq[0].to(dtype) if len(sumsq) == 1 else torch.stack([s.to(device, dtype) for s in sumsq]).sum()
        norm = total.sqrt()
        if inv_scale is not None:
            norm = norm * inv_scale.to(device)
        # An inf ‖g‖ as NaN, so that the factor is NaN, not max/∞ = 0 (NOTE [non-finite gradients] in reference.py).
        norm = torch.nan_to_num(norm, nan=math.nan, posinf=math.nan)
        clip = torch.where(norm <= max_norm, 1.0, max_norm / norm)
        return (clip if inv_scale is None else clip * inv_scale.to(device)), norm

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries = self._step_cache.entries(self)
        if not entries:
            return loss
        factor, grad_norm = self._grad_factor(entries)
        found_inf: Optional[torch.Tensor] = getattr(self, "found_inf", None)
        if self.telemetry:
            self._last_step = (found_inf, grad_norm)
        pending = []
        for e in entries:
            device = e.bucket.device
            args = (
                e.bucket,
                None if factor is None else factor.to(device),
                None if found_inf is None else found_inf.to(device),
            )
            if e.shard_key:
                pending.append((e.shard_key, e.backend.begin_step(*args)))
            else:
                e.backend.step(*args)
        if pending:  # NOTE [sharded norms] in sharding.py
            sums = reduce_per_key([(key, p.sums) for key, p in pending])
            for (_, p), global_sums in zip(pending, sums):
                p.finish(global_sums)
        for e in entries:
            e.bucket.release()
        self._step_cache.after_step()
        return loss


class PMDLAMB(_LambFamily):
    r"""Periodical Moments Decay LAMB (LargeDet, Algorithm 1).

    Per parameter tensor x with gradient g at step t (from 1):
    ξ = cos(π/2·(t mod T)/T), m = ξβ1·m + (1−β1)·g, v = ξβ2·v + (1−β2)·g²,
    r = m/√(v+ε), u = r + λx, x ← x − η·α·(‖x‖/‖u‖)·u.

    Args:
        params: parameters or param groups. Every hyper-parameter below can be set per group except
            the optimizer-wide ``max_grad_norm``, ``stochastic_rounding`` and ``seed`` and the
            constructor's ``backend``, ``master_weights``, ``moment_dtype`` and ``telemetry``; any other key in a group
            is a ValueError.
        lr: η. betas: (β1, β2). eps: ε. weight_decay: λ (decoupled: it acts at g = 0 too, where
            u = λx and a step scales x by 1 − η·α).
        alpha: α, the trust-ratio scale (0.012 in the paper).
        cycle_length: T, the ξ cycle in steps; None gives ξ ≡ 1 (plain LAMB moments).
        bias_correction: divide m, v by (1−β1^t), (1−β2^t) before r.
        eps_inside_sqrt: r = m/√(v+ε) (True, the paper) or m/(√v+ε).
        grad_averaging: weight g by (1−β1) in m (True) or by 1.
        max_grad_norm: clip the global gradient norm over all groups to this
            before the moments; None disables clipping. Without GradScaler, an inf or
            NaN gradient makes its tensor NaN, and with clipping every tensor stepped
            (NOTE [non-finite gradients] in largedet_kernels/reference.py).
        backend: ``"auto" | "cuda" | "triton" | "cpu" | "torch"``, kept as ``opt.backend``; the
            ``opt.backends`` property says which one steps each device's parameters.
        master_weights: ``"auto"`` (fp32 masters for fp16/bf16 parameters, but none for
            bf16 ones under stochastic rounding), True or False (NOTE [master weights]).
        moment_dtype: ``torch.float32`` or ``torch.bfloat16``: how m and v are stored.
        stochastic_rounding: round bf16 parameters without masters stochastically, with
            a dither hashed from (seed, step, element): reproducible on every backend.
        seed: the dither's seed, an integer in [0, 2**32).
        maximize: gradient ascent, as torch.optim's flag: the step is taken on −g (per group; the
            kernels fold it into the per-tensor weight of g, so it costs nothing).
        adapt: whether the step of a group's tensors is scaled by the trust ratio ‖x‖/‖u‖ (True: every
            tensor, as the paper does), independent of weight decay; None is apex's rule (no trust
            ratio for tensors without weight decay, unless ``use_nvlamb``).
        trust_ratio_bounds: (lo, hi): ‖x‖/‖u‖ clamped to [lo, hi] before η·α scales it (DeepSpeed's
            (0.01, 10), say); None: unbounded. A zero norm still gives 1, a non-finite one NaN.
        telemetry: record each tensor's ‖x‖, ‖u‖ and applied ratio at every step, on its device, in the
            kernels the step launches anyway; ``trust_ratios()`` reads them (docs/telemetry.md). Off: nothing
            is written.
        lr may be a float or a 0-d (or one-element) tensor, on the CPU or the parameters' device,
        which an lr schedule may write in place (NOTE [tensor lr] in backends/tables.py); the
        other hyper-parameters take numbers.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 5e-4,
        alpha: float = 0.012,
        cycle_length: Optional[int] = 200,
        bias_correction: bool = False,
        eps_inside_sqrt: bool = True,
        grad_averaging: bool = True,
        max_grad_norm: Optional[float] = None,
        backend: str = "auto",
        master_weights: Any = "auto",
        moment_dtype: torch.dtype = torch.float32,
        stochastic_rounding: bool = False,
        seed: int = 0,
        maximize: bool = False,
        adapt: Optional[bool] = True,
        trust_ratio_bounds: Optional[Tuple[float, float]] = None,
        telemetry: bool = False,
        **kwargs: Any,
    ) -> None:
        refuse_torch_keywords("PMDLAMB", kwargs)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha=alpha,
            cycle_length=cycle_length, bias_correction=bias_correction,
            eps_inside_sqrt=eps_inside_sqrt, grad_averaging=grad_averaging,
            max_grad_norm=max_grad_norm, adam_w_mode=True, use_nvlamb=True,
            stochastic_rounding=stochastic_rounding, seed=seed, maximize=maximize, adapt=adapt,
            trust_ratio_bounds=trust_ratio_bounds,
        )  # fmt: skip
        super().__init__(params, defaults, backend, master_weights, moment_dtype, telemetry)


class LAMB(_LambFamily):
    """LAMB with apex ``FusedLAMB``'s constructor, defaults and update.

    It is PMD-LAMB with ξ ≡ 1, α = 1, ε outside the square root and bias
    correction on; ``adam_w_mode=False`` adds λx to the gradient (L2) instead of
    the update; ``use_nvlamb=False`` applies no trust ratio to groups with
    weight_decay 0. Differences from apex, all intentional: ``max_grad_norm=None``
    disables clipping (apex's 0 zeroes every gradient; here 0 is an error),
    gradients are never overwritten (apex writes its update into them), and
    ``max_grad_norm`` cannot differ per param group (apex reads only the default).
    ``backend`` (``"auto" | "cuda" | "triton" | "cpu" | "torch"``), ``master_weights``, ``moment_dtype``,
    ``stochastic_rounding``, ``seed``, ``maximize``, ``trust_ratio_bounds``, ``telemetry`` and a tensor ``lr`` are
    PMDLAMB's;
    ``adapt`` too, whose default None keeps apex's rule (``use_nvlamb``).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        amsgrad: bool = False,
        adam_w_mode: bool = True,
        grad_averaging: bool = True,
        set_grad_none: bool = True,
        max_grad_norm: Optional[float] = 1.0,
        use_nvlamb: bool = False,
        backend: str = "auto",
        master_weights: Any = "auto",
        moment_dtype: torch.dtype = torch.float32,
        stochastic_rounding: bool = False,
        seed: int = 0,
        maximize: bool = False,
        adapt: Optional[bool] = None,
        trust_ratio_bounds: Optional[Tuple[float, float]] = None,
        telemetry: bool = False,
        **kwargs: Any,
    ) -> None:
        refuse_torch_keywords("LAMB", kwargs)
        if amsgrad:
            raise RuntimeError("LAMB does not support the AMSGrad variant.")
        self.set_grad_none = set_grad_none
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha=1.0,
            cycle_length=None, bias_correction=bias_correction, eps_inside_sqrt=False,
            grad_averaging=grad_averaging, max_grad_norm=max_grad_norm,
            adam_w_mode=adam_w_mode, use_nvlamb=use_nvlamb,
            stochastic_rounding=stochastic_rounding, seed=seed, maximize=maximize, adapt=adapt,
            trust_ratio_bounds=trust_ratio_bounds,
        )  # fmt: skip
        super().__init__(params, defaults, backend, master_weights, moment_dtype, telemetry)

    _SETTINGS = (*CONSTRUCTOR_ONLY, "set_grad_none")

    def zero_grad(self, set_to_none: Optional[bool] = None) -> None:
        super().zero_grad(self.set_grad_none if set_to_none is None else set_to_none)
