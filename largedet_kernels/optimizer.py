"""PMDLAMB and LAMB: the ``torch.optim.Optimizer`` front end of every backend.

This file owns what is common to all backends: argument checks, optimizer
state, sorting tensors into (device, dtype) buckets across param groups,
GradScaler's ``grad_scale``/``found_inf``, and global gradient-norm clipping.
The update itself happens in a backend chosen by :mod:`largedet_kernels.dispatch`.

NOTE [sharded norms]
    Under FSDP2 (``fully_shard``) a parameter is a DTensor of which each rank holds
    a shard, so the trust ratio's ‖x‖ and ‖u‖ (and the clipping norm ‖g‖) need every
    rank's sums. Backends get the local tensors (``to_local()``; the state stays
    DTensor, so checkpoints see it sharded). Buckets of shards are stepped in two
    halves: pass 1 and each tensor's local Σx², Σu² (``begin_step``), then one
    ``all_reduce`` of all those sums stacked together per process group, then pass 2
    (``finish``). Clipping likewise stacks every bucket's Σg² into one all-reduce. A
    rank with an empty shard still takes part; replicated placements need no
    collective; a mesh sharded along several dimensions takes one per dimension.

NOTE [step cache]
    A fused step's device work is a few launches, so its host side must cost next to nothing
    per tensor. Everything step() derives from the parameter set (the buckets and their state
    lists, the backends' kernel/torch split and device tables) lives in a _StepCache and is
    rebuilt only when something it was built from changed. Each step checks that at C speed: the
    param groups (identity, and the values of HYPER_KEYS: a change re-validates them and refreshes
    only the hyper tables), then, in one call of csrc/cpu/step_cache.cpp (or map() passes over
    flat lists without the CPU extension), the parameters (identity, local tensor, address and
    layout: ``p.data = ...`` changes them) and the gradients (present or not as before, and their
    addresses, dtypes and layouts). A new gradient address refreshes only the pointer tables;
    anything else rebuilds the cache. Gradients are not held between steps:
    ``zero_grad(set_to_none=True)`` frees them. Under torch.compile the cache is bypassed and the
    buckets are built as the graph is traced.

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
import torch.distributed as dist
from torch.optim import Optimizer

from . import _extensions, dispatch, rounding
from .backends import Bucket

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed support has no DTensors to step
    DTensor = ()  # type: ignore[assignment,misc]

# The process groups over which a bucket's tensors are sharded; () when they are whole.
ShardKey = Tuple[Any, ...]


def _shard_key(p: torch.Tensor) -> ShardKey:
    """(mesh, sharded mesh dims) of a DTensor parameter; () for whole tensors (NOTE [sharded norms])."""
    if not isinstance(p, DTensor):
        return ()
    if any(pl.is_partial() for pl in p.placements):
        raise ValueError(f"a parameter with a Partial placement has no well-defined value: {p.placements}")
    dims = tuple(d for d, pl in enumerate(p.placements) if pl.is_shard())
    return (p.device_mesh, dims) if dims else ()


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor itself, a plain tensor as it is. (``to_local()`` would return a new
    view of it for a parameter each call, at ten times the cost; step() runs under no_grad.)"""
    return t._local_tensor if isinstance(t, DTensor) else t


# What step() reads from a param group: a change of any re-validates them and refreshes the hyper tables.
HYPER_KEYS = ("lr", "betas", "eps", "weight_decay", "alpha", "cycle_length", "bias_correction", "eps_inside_sqrt",
              "grad_averaging", "adam_w_mode", "use_nvlamb", "max_grad_norm", "stochastic_rounding",
              "seed")  # fmt: skip
# Hyper-parameters of the whole optimizer: a param group may not differ from the defaults in them.
OPTIMIZER_WIDE = ("max_grad_norm", "stochastic_rounding", "seed")

LOW_PRECISION = (torch.float16, torch.bfloat16)
MASTER_DTYPE = torch.float32
MOMENT_DTYPES = (torch.float32, torch.bfloat16)
MASTER_WEIGHTS = ("auto", True, False)
_HYPERS = operator.itemgetter(*HYPER_KEYS)


# The step cache's check in C++ (csrc/cpu/step_cache.cpp) comes with the CPU extension. _native() takes it
# once the extension is loaded, or loads without a build (a torch-backend step must not wait ~40 s for a
# compiler); until then _NATIVE is _UNRESOLVED. None: the Python check. Its verdicts follow.
_UNRESOLVED: Any = object()
_NATIVE: Any = _UNRESOLVED
_NEW_GRADIENT_ADDRESSES, _REBUILD = 1, 2
_SNAPSHOT_COLUMNS = 8

# Bucket versions, never reused: a table kept across a rebuild must not match a new bucket's
# version by chance (NOTE [step cache]).
_VERSIONS = itertools.count(1)

# Per-tensor attributes read in map() passes (NOTE [step cache]).
_GRAD = operator.attrgetter("grad")
_DTYPE = operator.attrgetter("dtype")
_PARAMS = operator.itemgetter("params")
_DATA_PTR = torch.Tensor.data_ptr
_STRIDE = torch.Tensor.stride


class _StepCache:
    """The buckets of one parameter set and what they were built from (NOTE [step cache])."""

    def __init__(self, buckets: List[Tuple[Bucket, ModuleType, ShardKey]], state: Dict) -> None:
        self.buckets = buckets
        self.state = state
        self.group_ids: List[int] = []
        self.param_ids: List[int] = []
        self.hypers: List[Tuple[Any, ...]] = []
        # Positions in the flat parameter list of the parameters with and without gradients.
        self.with_grad: List[int] = []
        self.without_grad: List[int] = []
        # Of the parameters with gradients, in with_grad order: the tensors whose addresses, dtypes
        # and strides are watched (local tensors of DTensors), and what they were.
        self.xs: List[torch.Tensor] = []
        self.x_ptrs: List[int] = []
        self.grad_ptrs: List[int] = []
        self.grad_dtypes: List[torch.dtype] = []
        self.grad_strides: List[Tuple[int, ...]] = []
        self.x_strides: List[Tuple[int, ...]] = []
        self.x_ids: List[int] = []
        # Per bucket, the positions of its tensors in with_grad order (None: all, in order).
        self.positions: List[Optional[List[int]]] = []
        self.sharded = False
        # The flat parameter list and, where csrc/cpu/step_cache.cpp checks it, its snapshot.
        self.params: List[torch.Tensor] = []
        self.locals: List[torch.Tensor] = []
        self.snapshot: Optional[torch.Tensor] = None
        # Positions of the parameters with masters, and (the Python check's) their version counters.
        self.with_master: List[int] = []
        self.versions: List[int] = []

    def watch(self, grads: List[torch.Tensor]) -> None:
        """Take what the per-step check compares: in C++ (a snapshot) where it can, else as lists."""
        native = _native()
        if native is not None:
            snapshot = torch.empty(len(self.params), _SNAPSHOT_COLUMNS, dtype=torch.int64)
            self.snapshot = snapshot if native.step_cache_snapshot(self.params, snapshot) else None
        if self.snapshot is None:
            xs = self.xs
            self.x_ids = list(map(id, xs))
            self.x_ptrs = list(map(_DATA_PTR, xs))
            self.x_strides = list(map(_STRIDE, xs))
            self.grad_ptrs = list(map(_DATA_PTR, grads))
            self.grad_dtypes = list(map(_DTYPE, grads))
            self.grad_strides = list(map(_STRIDE, grads))

    def record_versions(self) -> None:
        """The version counters of the parameters with masters as this step leaves them (NOTE [master weights]):
        the next check tells writes from outside by them."""
        if self.snapshot is not None:
            _NATIVE.record_versions(self.params, self.snapshot, self.with_master)
        else:
            self.versions = [self.params[i]._version for i in self.with_master]


def _native() -> Optional[ModuleType]:
    """The CPU extension for the step cache's check, or None for the Python check (see _NATIVE)."""
    global _NATIVE
    if _NATIVE is _UNRESOLVED:
        module = _extensions.CPU.module(build=False)
        if module is None:
            return None
        _NATIVE = module
    return _NATIVE


def _all_reduce(key: ShardKey, tensor: torch.Tensor) -> None:
    """Sum ``tensor`` in place over the ranks that hold shards of the same tensors."""
    mesh, dims = key
    for dim in dims:
        dist.all_reduce(tensor, group=mesh.get_group(dim))


def _reduce_per_key(values: List[Tuple[ShardKey, torch.Tensor]]) -> List[torch.Tensor]:
    """Each tensor summed over its key's ranks; one collective per key and mesh dim, in first-seen order."""
    keys: Dict[ShardKey, List[int]] = {}
    for i, (key, _) in enumerate(values):
        if key:
            keys.setdefault(key, []).append(i)
    out = [v for _, v in values]
    for key, members in keys.items():
        parts = [values[i][1] for i in members]
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
        flat = torch.cat([p.reshape(-1).to(dtype) for p in parts])
        _all_reduce(key, flat)
        for i, part in zip(members, flat.split([p.numel() for p in parts])):
            out[i] = part.view_as(values[i][1]).to(values[i][1].dtype)
    return out


def _check_grad(p: torch.Tensor, optimizer: str) -> None:
    if p.grad.is_sparse:
        raise RuntimeError(f"{optimizer} does not support sparse gradients")
    if isinstance(p, DTensor) and not (
        isinstance(p.grad, DTensor) and p.grad.device_mesh == p.device_mesh and p.grad.placements == p.placements
    ):
        got = p.grad.placements if isinstance(p.grad, DTensor) else "a plain tensor"
        raise RuntimeError(
            f"the gradient of a DTensor parameter with placements {p.placements} must be a DTensor "
            f"on the same mesh with the same placements, got {got}"
        )


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
    if not finite_number(lr) or lr < 0:
        raise ValueError(f"Invalid lr{where}: {lr!r} (must be a finite Python number >= 0)")
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
    if not isinstance(group["stochastic_rounding"], bool):
        raise ValueError(f"Invalid stochastic_rounding{where}: {group['stochastic_rounding']!r} (must be True or "
                         "False)")  # fmt: skip
    seed = group["seed"]
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < rounding.SEED_LIMIT:
        raise ValueError(f"Invalid seed{where}: {seed!r} (must be an integer in [0, 2**32))")


def _state_like(saved: torch.Tensor, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A saved state tensor as a copy on p's device in ``dtype`` (sharded like p when p is a DTensor)."""
    if isinstance(p, DTensor):
        if isinstance(saved, DTensor):
            if saved.device_mesh == p.device_mesh and saved.placements == p.placements:
                return saved.to(dtype=dtype, copy=True)
            saved = saved.full_tensor()
        # A whole tensor, the same on every rank: each rank keeps its own shard of it.
        return distribute_tensor(saved.to(p.device, dtype), p.device_mesh, p.placements, src_data_rank=None)
    if isinstance(saved, DTensor):
        saved = saved.full_tensor()
    return saved.to(device=p.device, dtype=dtype, copy=True)


class _LambFamily(Optimizer):
    """PMD-LAMB's update with every option; PMDLAMB and LAMB differ only in defaults."""

    # GradScaler hands us grad_scale/found_inf instead of unscaling and syncing itself.
    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable, defaults: Dict[str, Any], backend: str, master_weights: Any,
                 moment_dtype: torch.dtype) -> None:  # fmt: skip
        dispatch.check_backend_name(backend)
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
        self._backend_of_device: Dict[torch.device, Tuple[str, ModuleType]] = {}
        self._bucket_caches: Dict[Tuple[Any, ...], Dict[str, Any]] = {}
        self._step_cache: Optional[_StepCache] = None
        super().__init__(params, defaults)

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
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group, len(self.param_groups) - 1)
            if len({id(p) for p in group["params"]}) != len(group["params"]):
                raise ValueError("a parameter appears twice in one param group: it would be stepped twice")
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
        self._step_cache = None

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
        self._step_cache = None
        ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(ids, params):
            if pid not in saved:
                continue
            s = saved[pid]
            moment = self._moment_dtype(p)
            state = {
                "step": torch.as_tensor(s["step"]).to(device=p.device, dtype=torch.float32, copy=True),
                "exp_avg": _state_like(s["exp_avg"], p, moment),
                "exp_avg_sq": _state_like(s["exp_avg_sq"], p, moment),
            }
            if "master" in s and self._has_master(p):
                state["master"] = _state_like(s["master"], p, MASTER_DTYPE)
            for key in state.keys() - {"step"}:
                if state[key].shape != p.shape:
                    raise ValueError(
                        f"loaded state {key!r} has shape {tuple(state[key].shape)} "
                        f"but its parameter has shape {tuple(p.shape)}"
                    )
            self.state[p] = state

    @property
    def backends(self) -> Dict[torch.device, str]:
        """The backend that steps each device's parameters: {device: backend name} over the devices of this
        optimizer's parameters, in the order first met. ``backend`` is what was asked for ("auto" included);
        this is what it resolved to (:mod:`largedet_kernels.dispatch`), decided before any step."""
        devices = dict.fromkeys(_local(p).device for group in self.param_groups for p in group["params"])
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

    def _init_group(self, group: Dict[str, Any]) -> None:
        """State for the group's parameters that have gradients: zeros for a new one, and moved to the
        parameter's device and math dtype after ``p.data = p.data.to(...)``. torch.compile runs a method of
        this name eagerly before it traces step(), so a compiled first step sees the state of the next."""
        for p in group["params"]:
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
                    state[key] = _state_like(m, p, moment_dtype)
            if state["step"].device != p.device:
                state["step"] = state["step"].to(p.device)
            # NOTE [master weights]: a new parameter, or a checkpoint without masters, starts them from p.
            if not self._has_master(p):
                state.pop("master", None)
            elif "master" not in state:
                state["master"] = p.detach().to(MASTER_DTYPE, memory_format=torch.preserve_format, copy=True)
            elif state["master"].device != p.device:
                state["master"] = _state_like(state["master"], p, MASTER_DTYPE)

    def _buckets(self) -> List[Tuple[Bucket, ModuleType, ShardKey]]:
        """This step's buckets: from the step cache when nothing they were built from changed."""
        if torch.compiler.is_compiling():
            buckets = self._build()[0]
            untraceable = sorted({b[1].__name__.rsplit(".", 1)[-1] for b in buckets} & {"triton", "cuda"})
            if untraceable:
                raise RuntimeError(
                    f"torch.compile cannot trace the {untraceable[0]} backend: its kernels address tensors through "
                    "device pointer tables. Step it eagerly (a fused step is a few launches; there is nothing "
                    "left to fuse), or compile with backend='torch'"
                )
            return buckets
        cache = self._step_cache
        groups = self.param_groups
        if cache is None or cache.state is not self.state or list(map(id, groups)) != cache.group_ids:
            return self._rebuild()
        try:
            hypers = list(map(_HYPERS, groups))
        except KeyError:  # a hyper-parameter deleted: the rebuild's checks say which
            return self._rebuild()
        if hypers != cache.hypers:
            cache.hypers = self._accept_hypers()
            for b, _, _ in cache.buckets:
                b.hyper_version = next(_VERSIONS)
        params = list(itertools.chain.from_iterable(map(_PARAMS, groups)))
        if cache.snapshot is not None:
            verdict, grads, written = _NATIVE.check_step_cache(params, cache.params, cache.locals, cache.snapshot)
            new_addresses = verdict == _NEW_GRADIENT_ADDRESSES
            if verdict == _REBUILD:
                return self._rebuild()
        else:
            checked = self._check_in_python(cache, params)
            if checked is None:
                return self._rebuild()
            grads, new_addresses = checked
            versions = [params[i]._version for i in cache.with_master] if cache.versions else []
            written = [i for i, v, was in zip(cache.with_master, versions, cache.versions) if v != was]
            # The fused kernels write x through pointer tables: tell autograd, as an in-place op would.
            torch.autograd.graph.increment_version([params[i] for i in cache.with_grad])
        if written:
            self._refresh_masters([params[i] for i in written])
        if new_addresses:
            for b, _, _ in cache.buckets:
                b.address_version = next(_VERSIONS)
        for (b, _, _), positions in zip(cache.buckets, cache.positions):
            b.grads = grads if positions is None else [grads[i] for i in positions]
        return cache.buckets

    @staticmethod
    def _check_in_python(cache: _StepCache, params: List[torch.Tensor]) -> Optional[Tuple[List[torch.Tensor], bool]]:
        """The step cache's check without the CPU extension, or for DTensors: (this step's gradients, whether an
        address changed), or None when the cache must be rebuilt."""
        if list(map(id, params)) != cache.param_ids:
            return None
        grads = list(map(_GRAD, params))
        if cache.without_grad:
            if any(grads[i] is not None for i in cache.without_grad):
                return None
            grads = [grads[i] for i in cache.with_grad]
        xs = cache.xs
        try:
            if cache.sharded:  # placements are checked by _check_grad on a rebuild
                grads = list(map(_local, grads))
                xs = list(map(_local, params if not cache.without_grad else [params[i] for i in cache.with_grad]))
                if list(map(id, xs)) != cache.x_ids:
                    return None
            if (
                list(map(_DTYPE, grads)) != cache.grad_dtypes
                or list(map(_STRIDE, grads)) != cache.grad_strides
                or list(map(_STRIDE, xs)) != cache.x_strides
                or list(map(_DATA_PTR, xs)) != cache.x_ptrs
            ):
                return None
            grad_ptrs = list(map(_DATA_PTR, grads))
        except (TypeError, RuntimeError, AttributeError):  # a gradient went missing, is sparse, or lost its DTensor
            return None
        new_addresses = grad_ptrs != cache.grad_ptrs
        cache.grad_ptrs = grad_ptrs
        return grads, new_addresses

    def _refresh_masters(self, written: List[torch.Tensor]) -> None:
        """NOTE [master weights]: parameters written from outside since the last step hand their masters the
        value they hold now."""
        for p in written:
            state = self.state.get(p)
            if state and "master" in state:
                state["master"].copy_(p.detach())

    def _accept_hypers(self) -> List[Tuple[Any, ...]]:
        """Every group's hyper-parameters, checked, as the step cache compares them."""
        for i, group in enumerate(self.param_groups):
            self._check_group(group, i)
            group["betas"] = tuple(group["betas"])  # compared by value: no list to change in place
        return list(map(_HYPERS, self.param_groups))

    def _rebuild(self) -> List[Tuple[Bucket, ModuleType, ShardKey]]:
        hypers = self._accept_hypers()
        buckets, cache, grads = self._build()
        cache.hypers = hypers
        self._step_cache = cache
        torch.autograd.graph.increment_version([cache.params[i] for i in cache.with_grad])  # as in _buckets
        cache.watch(grads)  # after the bump: the version counters as this step leaves them
        return buckets

    def _build(self) -> Tuple[List[Tuple[Bucket, ModuleType, ShardKey]], _StepCache, List[torch.Tensor]]:
        """(bucket, backend module, shard key) per (device, param dtype, grad dtype, shard key), state
        initialised, the step cache that describes them, and the local gradients of the parameters with one."""
        groups = self.param_groups
        params = list(itertools.chain.from_iterable(g["params"] for g in groups))
        group_of = [g for g in groups for _ in g["params"]]
        with_grad = [i for i, p in enumerate(params) if p.grad is not None]
        for i in with_grad:  # every check before anything is modified
            _check_grad(params[i], type(self).__name__)
        buckets: Dict[Tuple[Any, ...], Bucket] = {}
        positions: Dict[Tuple[Any, ...], List[int]] = {}
        xs, grads = [], []
        for group in groups:
            self._init_group(group)
        compiling = torch.compiler.is_compiling()
        for n, i in enumerate(with_grad):
            p = params[i]
            state = self.state[p]
            x, grad = _local(p), _local(p.grad)
            xs.append(x)
            grads.append(grad)
            key = (x.device, x.dtype, grad.dtype, _shard_key(p))  # which have masters follows from the dtype
            if key not in buckets:
                # Under torch.compile the tables are built inside the graph: a cache filled by the first
                # compiled step would fail its guards and recompile the second.
                cache = {} if compiling else self._bucket_caches.setdefault(key, {})
                version = None if compiling else next(_VERSIONS)
                buckets[key] = Bucket(x.device, cache=cache, address_version=version, hyper_version=version)
                positions[key] = []
            b = buckets[key]
            positions[key].append(n)
            b.params.append(x)
            b.grads.append(grad)
            b.exp_avgs.append(_local(state["exp_avg"]))
            b.exp_avg_sqs.append(_local(state["exp_avg_sq"]))
            b.steps.append(state["step"])
            b.groups.append(group_of[i])
            if "master" in state:
                b.masters.append(_local(state["master"]))
        result = [(b, self._backend(b.device)[1], key[3]) for key, b in buckets.items()]
        cache = _StepCache(result, self.state)
        cache.group_ids = list(map(id, groups))
        cache.param_ids = list(map(id, params))
        cache.with_grad = with_grad
        cache.without_grad = [i for i, p in enumerate(params) if p.grad is None]
        cache.xs = xs
        cache.sharded = any(key[3] for key in buckets)
        if not compiling:
            cache.params = params
            cache.locals = list(map(_local, params))
            cache.with_master = [i for i in with_grad if "master" in self.state[params[i]]]
        in_order = len(buckets) == 1
        cache.positions = [None if in_order else positions[key] for key in buckets]
        return result, cache, grads

    def _grad_factor(self, buckets: List[Tuple[Bucket, ModuleType, ShardKey]]) -> Optional[torch.Tensor]:
        """What every gradient is multiplied by: GradScaler's 1/scale × the clip factor."""
        grad_scale: Optional[torch.Tensor] = getattr(self, "grad_scale", None)
        inv_scale = None if grad_scale is None else grad_scale.double().reciprocal().float()
        max_norm = self.defaults["max_grad_norm"]
        if max_norm is None:
            return inv_scale
        device = buckets[0][0].device
        local = [(key, backend.grad_sumsq(b)) for b, backend, key in buckets]
        sumsq = _reduce_per_key(local)  # NOTE [sharded norms]
        dtype = torch.float64 if any(s.dtype == torch.float64 for s in sumsq) else torch.float32
        total = sumsq[0].to(dtype) if len(sumsq) == 1 else torch.stack([s.to(device, dtype) for s in sumsq]).sum()
        norm = total.sqrt()
        if inv_scale is not None:
            norm = norm * inv_scale.to(device)
        # An inf ‖g‖ as NaN, so that the factor is NaN, not max/∞ = 0 (NOTE [non-finite gradients] in reference.py).
        norm = torch.nan_to_num(norm, nan=math.nan, posinf=math.nan)
        clip = torch.where(norm <= max_norm, 1.0, max_norm / norm)
        return clip if inv_scale is None else clip * inv_scale.to(device)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets = self._buckets()
        if not buckets:
            return loss
        factor = self._grad_factor(buckets)
        found_inf: Optional[torch.Tensor] = getattr(self, "found_inf", None)
        pending = []
        for bucket, backend, key in buckets:
            args = (
                bucket,
                None if factor is None else factor.to(bucket.device),
                None if found_inf is None else found_inf.to(bucket.device),
            )
            if key:
                pending.append((key, backend.begin_step(*args)))
            else:
                backend.step(*args)
        if pending:  # NOTE [sharded norms]
            sums = _reduce_per_key([(key, p.sums) for key, p in pending])
            for (_, p), global_sums in zip(pending, sums):
                p.finish(global_sums)
        for bucket, _, _ in buckets:
            bucket.release()
        if self._step_cache is not None and self._step_cache.with_master and not torch.compiler.is_compiling():
            self._step_cache.record_versions()
        return loss


class PMDLAMB(_LambFamily):
    r"""Periodical Moments Decay LAMB (LargeDet, Algorithm 1).

    Per parameter tensor x with gradient g at step t (from 1):
    ξ = cos(π/2·(t mod T)/T), m = ξβ1·m + (1−β1)·g, v = ξβ2·v + (1−β2)·g²,
    r = m/√(v+ε), u = r + λx, x ← x − η·α·(‖x‖/‖u‖)·u.

    Args:
        params: parameters or param groups; every hyper-parameter below except
            ``max_grad_norm`` and ``backend`` can be set per group.
        lr: η. betas: (β1, β2). eps: ε. weight_decay: λ (decoupled).
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
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha=alpha,
            cycle_length=cycle_length, bias_correction=bias_correction,
            eps_inside_sqrt=eps_inside_sqrt, grad_averaging=grad_averaging,
            max_grad_norm=max_grad_norm, adam_w_mode=True, use_nvlamb=True,
            stochastic_rounding=stochastic_rounding, seed=seed,
        )  # fmt: skip
        super().__init__(params, defaults, backend, master_weights, moment_dtype)


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
    ``stochastic_rounding`` and ``seed`` are PMDLAMB's.
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
    ) -> None:
        if amsgrad:
            raise RuntimeError("LAMB does not support the AMSGrad variant.")
        self.set_grad_none = set_grad_none
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha=1.0,
            cycle_length=None, bias_correction=bias_correction, eps_inside_sqrt=False,
            grad_averaging=grad_averaging, max_grad_norm=max_grad_norm,
            adam_w_mode=adam_w_mode, use_nvlamb=use_nvlamb,
            stochastic_rounding=stochastic_rounding, seed=seed,
        )  # fmt: skip
        super().__init__(params, defaults, backend, master_weights, moment_dtype)

    def zero_grad(self, set_to_none: Optional[bool] = None) -> None:
        super().zero_grad(self.set_grad_none if set_to_none is None else set_to_none)
