"""The step cache: what step() derives from the parameter set, kept until that set changes.

NOTE [step cache]
    A fused step's device work is a few launches, so its host side must cost next to nothing
    per tensor. Everything step() derives from the parameter set (the buckets and their state
    lists, the backends' kernel/torch split and device tables) lives in a StepCache and is
    rebuilt only when something it was built from changed. Each step checks that at C speed: the
    param groups (identity, and the values of the optimizer's HYPER_KEYS: a change re-validates
    them and refreshes only the hyper tables), then, in one call of the native check
    (csrc/step_cache/step_cache.cpp; map() passes over flat lists without it), the parameters (identity,
    local tensor, address and layout: ``p.data = ...`` changes them) and the gradients (present or
    not as before, and their addresses, dtypes and layouts). A new gradient address refreshes only
    the pointer tables; anything else rebuilds the cache. Gradients are not held between steps:
    ``zero_grad(set_to_none=True)`` frees them. Under torch.compile the cache is bypassed and the
    buckets are built as the graph is traced.
"""

import itertools
import operator
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch

from . import _extensions
from .backends import Bucket, KeptTables
from .backends.tables import RECORD_FIELDS, math_dtype
from .sharding import ShardKey, check_grad, local, shard_key
from .telemetry import bucket_records

if TYPE_CHECKING:
    from .optimizer import _LambFamily

# The native check (csrc/step_cache/step_cache.cpp, _extensions.STEP_CACHE): _UNRESOLVED until it is loaded
# or its build is refused (_Built.watch says when it may be built), None for the Python check.
_UNRESOLVED: Any = object()
_NATIVE: Any = _UNRESOLVED
# Its verdicts, and the columns of its snapshot (csrc/step_cache/step_cache.cpp's Column).
_NEW_GRADIENT_ADDRESSES, _REBUILD = 1, 2
_SNAPSHOT_COLUMNS = 8

# Bucket versions, never reused: a table kept across a rebuild must not match a new bucket's version by chance.
_VERSIONS = itertools.count(1)

# Per-tensor attributes read in map() passes.
_GRAD = operator.attrgetter("grad")
_DTYPE = operator.attrgetter("dtype")
_PARAMS = operator.itemgetter("params")
_DATA_PTR = torch.Tensor.data_ptr
_STRIDE = torch.Tensor.stride


@dataclass
class Entry:
    """One bucket of a step, the backend module that steps it, and the process groups its tensors are sharded
    over (NOTE [sharded norms] in sharding.py)."""

    bucket: Bucket
    backend: ModuleType
    shard_key: ShardKey


def _native(build: bool) -> Optional[ModuleType]:
    """The native check, or None for the Python check (see _NATIVE); with ``build``, built first if need be (once
    per cache, ~10 s), or the Python check for good when it cannot be."""
    global _NATIVE
    if _NATIVE is _UNRESOLVED:
        try:
            module = _extensions.STEP_CACHE.module(build=build)
        except _extensions.ExtensionUnavailable:
            _NATIVE = None
            return None
        if module is None:  # not built yet: a later step may build it
            return None
        _NATIVE = module
    return _NATIVE


class _Built:
    """The entries of one parameter set and what they were built from."""

    def __init__(self, entries: List[Entry], state: Dict, groups: List[Dict], params: List[torch.Tensor],
                 with_grad: List[int], xs: List[torch.Tensor], positions: List[Optional[List[int]]]) -> None:
        self.entries = entries
        self.state = state
        self.group_ids = list(map(id, groups))
        self.hypers: List[Tuple[Any, ...]] = []
        self.param_ids = list(map(id, params))
        # Positions in the flat parameter list of the parameters with and without gradients.
        self.with_grad = with_grad
        self.without_grad = [i for i, p in enumerate(params) if p.grad is None]
        # Per entry, the positions of its tensors in with_grad order (None: all, in order).
        self.positions = positions
        self.sharded = any(e.shard_key for e in entries)
        # The flat parameter list, its local tensors, and the positions of the parameters with masters.
        self.params = params
        self.locals = list(map(local, params))
        self.with_master = [i for i in with_grad if "master" in state[params[i]]]
        # What the check compares: the native check's snapshot, or (the Python check's) lists over the
        # parameters with gradients, in with_grad order, of their local tensors and gradients.
        self.snapshot: Optional[torch.Tensor] = None
        self.xs = xs
        self.x_ids: List[int] = []
        self.x_ptrs: List[int] = []
        self.x_strides: List[Tuple[int, ...]] = []
        self.grad_ptrs: List[int] = []
        self.grad_dtypes: List[torch.dtype] = []
        self.grad_strides: List[Tuple[int, ...]] = []
        self.versions: List[int] = []

    def watch(self, grads: List[torch.Tensor]) -> None:
        """Take what the per-step check compares: a snapshot for the native check where it can, else lists."""
        # The native check is built on first use by a fused backend's step, which compiled or loaded kernels of its
        # own anyway; a step of the torch backend alone, the one that needs no compiler, takes it only once built.
        native = _native(build=any(e.backend.NAME != "torch" for e in self.entries))
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

    def check(self, params: List[torch.Tensor]) -> Optional[Tuple[List[torch.Tensor], bool, List[int]]]:
        """(this step's local gradients, whether an address changed, the positions of the parameters written
        from outside since the last step), or None when the cache must be rebuilt."""
        if self.snapshot is not None:
            verdict, grads, written = _NATIVE.check_step_cache(params, self.params, self.locals, self.snapshot)
            return None if verdict == _REBUILD else (grads, verdict == _NEW_GRADIENT_ADDRESSES, written)
        checked = self._check_in_python(params)
        if checked is None:
            return None
        versions = [params[i]._version for i in self.with_master] if self.versions else []
        written = [i for i, v, was in zip(self.with_master, versions, self.versions) if v != was]
        # The fused kernels write x through pointer tables: tell autograd, as an in-place op would.
        torch.autograd.graph.increment_version([params[i] for i in self.with_grad])
        return (*checked, written)

    def _check_in_python(self, params: List[torch.Tensor]) -> Optional[Tuple[List[torch.Tensor], bool]]:
        """The check without the native module, or for DTensors."""
        if list(map(id, params)) != self.param_ids:
            return None
        grads = list(map(_GRAD, params))
        if self.without_grad:
            if any(grads[i] is not None for i in self.without_grad):
                return None
            grads = [grads[i] for i in self.with_grad]
        xs = self.xs
        try:
            if self.sharded:  # placements are checked by check_grad on a rebuild
                grads = list(map(local, grads))
                xs = list(map(local, params if not self.without_grad else [params[i] for i in self.with_grad]))
                if list(map(id, xs)) != self.x_ids:
                    return None
            if (
                list(map(_DTYPE, grads)) != self.grad_dtypes
                or list(map(_STRIDE, grads)) != self.grad_strides
                or list(map(_STRIDE, xs)) != self.x_strides
                or list(map(_DATA_PTR, xs)) != self.x_ptrs
            ):
                return None
            grad_ptrs = list(map(_DATA_PTR, grads))
        except (TypeError, RuntimeError, AttributeError):  # a gradient went missing, is sparse, or lost its DTensor
            return None
        new_addresses = grad_ptrs != self.grad_ptrs
        self.grad_ptrs = grad_ptrs
        return grads, new_addresses

    def record_versions(self) -> None:
        """The version counters of the parameters with masters as this step leaves them (NOTE [master weights]
        in optimizer.py): the next check tells writes from outside by them."""
        if self.snapshot is not None:
            _NATIVE.record_versions(self.params, self.snapshot, self.with_master)
        else:
            self.versions = [self.params[i]._version for i in self.with_master]


class StepCache:
    """An optimizer's step cache (NOTE [step cache]): ``entries()`` gives each step's buckets."""

    def __init__(self) -> None:
        self._built: Optional[_Built] = None
        # Per bucket key, the device tables kept across rebuilds (a new gradient tensor, a new param group).
        self._kept: Dict[Tuple[Any, ...], KeptTables] = {}

    def invalidate(self) -> None:
        """The param groups or the state were replaced: the next step rebuilds."""
        self._built = None

    @property
    def valid(self) -> bool:
        return self._built is not None

    def kept_tables(self) -> List[KeptTables]:
        """The device tables kept for each bucket key met so far."""
        return list(self._kept.values())

    def entries(self, optimizer: "_LambFamily") -> List[Entry]:
        """This step's entries, each bucket's ``grads`` set: from the cache when nothing they were built from
        changed. Under torch.compile, built afresh as the graph is traced."""
        if torch.compiler.is_compiling():
            if optimizer.telemetry:
                raise RuntimeError("telemetry=True records the steps of eager mode: step eagerly, or construct the "
                                   "optimizer without telemetry to compile its step")  # fmt: skip
            entries = self._build(optimizer, compiling=True)[0]
            untraceable = sorted({e.backend.NAME for e in entries if not e.backend.TRACEABLE})
            if untraceable:
                raise RuntimeError(
                    f"torch.compile cannot trace the {untraceable[0]} backend: its kernels address tensors through "
                    "device pointer tables. Step it eagerly (a fused step is a few launches; there is nothing "
                    "left to fuse), or compile with backend='torch'"
                )
            return entries
        built, groups = self._built, optimizer.param_groups
        if built is None or built.state is not optimizer.state or list(map(id, groups)) != built.group_ids:
            return self._rebuild(optimizer)
        try:
            hypers = optimizer._hypers()
        except KeyError:  # a hyper-parameter deleted: the rebuild's checks say which
            return self._rebuild(optimizer)
        if hypers != built.hypers:
            built.hypers = optimizer._accept_hypers()
            for e in built.entries:
                e.bucket.hyper_version = next(_VERSIONS)
        params = list(itertools.chain.from_iterable(map(_PARAMS, groups)))
        checked = built.check(params)
        if checked is None:
            return self._rebuild(optimizer)
        grads, new_addresses, written = checked
        if written:
            _refresh_masters(optimizer.state, [params[i] for i in written])
        if new_addresses:
            for e in built.entries:
                e.bucket.address_version = next(_VERSIONS)
        for e, positions in zip(built.entries, built.positions):
            e.bucket.grads = grads if positions is None else [grads[i] for i in positions]
        return built.entries

    def recorded(self) -> List[Tuple[List[torch.Tensor], torch.Tensor]]:
        """Each bucket's parameters and trust-ratio records, in its order (telemetry on; none before a step)."""
        built = self._built
        if built is None:
            return []
        stepped = [built.params[i] for i in built.with_grad]
        return [(stepped if positions is None else [stepped[n] for n in positions], bucket_records(e.bucket))
                for e, positions in zip(built.entries, built.positions)]  # fmt: skip

    def after_step(self) -> None:
        """What the next step's check needs from this one."""
        if self._built is not None and self._built.with_master and not torch.compiler.is_compiling():
            self._built.record_versions()

    def _rebuild(self, optimizer: "_LambFamily") -> List[Entry]:
        hypers = optimizer._accept_hypers()
        entries, positions, params, with_grad, xs, grads = self._build(optimizer, compiling=False)
        built = _Built(entries, optimizer.state, optimizer.param_groups, params, with_grad, xs, positions)
        built.hypers = hypers
        self._built = built
        torch.autograd.graph.increment_version([built.params[i] for i in built.with_grad])  # as in check()
        built.watch(grads)  # after the bump: the version counters as this step leaves them
        return built.entries

    def _build(self, optimizer: "_LambFamily", compiling: bool):
        """One entry per (device, param dtype, grad dtype, shard key), state initialised; with, for _Built, each
        entry's positions, the flat parameters, the positions of those with gradients, their local tensors and
        their local gradients."""
        groups = optimizer.param_groups
        params = list(itertools.chain.from_iterable(g["params"] for g in groups))
        group_of = [g for g in groups for _ in g["params"]]
        with_grad = [i for i, p in enumerate(params) if p.grad is not None]
        for i in with_grad:  # every check before anything is modified
            p = params[i]
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(optimizer).__name__} does not support sparse gradients")
            check_grad(p)
        buckets: Dict[Tuple[Any, ...], Bucket] = {}
        positions: Dict[Tuple[Any, ...], List[int]] = {}
        xs, grads = [], []
        optimizer._init_group()
        state = optimizer.state
        for n, i in enumerate(with_grad):
            p = params[i]
            s = state[p]
            x, grad = local(p), local(p.grad)
            xs.append(x)
            grads.append(grad)
            key = (x.device, x.dtype, grad.dtype, shard_key(p))  # which have masters follows from the dtype
            if key not in buckets:
                # Under torch.compile the tables are built inside the graph: tables kept from the first
                # compiled step would fail its guards and recompile the second.
                kept = KeptTables() if compiling else self._kept.setdefault(key, KeptTables())
                version = None if compiling else next(_VERSIONS)
                buckets[key] = Bucket(x.device, kept=kept, address_version=version, hyper_version=version)
                positions[key] = []
            b = buckets[key]
            positions[key].append(n)
            b.params.append(x)
            b.grads.append(grad)
            b.exp_avgs.append(local(s["exp_avg"]))
            b.exp_avg_sqs.append(local(s["exp_avg_sq"]))
            b.steps.append(s["step"])
            b.groups.append(group_of[i])
            if "master" in s:
                b.masters.append(local(s["master"]))
        if optimizer.telemetry:  # NOTE [trust-ratio records] in backends/tables.py
            for b in buckets.values():
                b.records = torch.zeros(len(b.params), len(RECORD_FIELDS), dtype=math_dtype(b.params[0].dtype),
                                        device=b.device)  # fmt: skip
        entries = [Entry(b, optimizer._backend(b.device)[1], key[3]) for key, b in buckets.items()]
        in_order = len(buckets) == 1
        return entries, [None if in_order else positions[key] for key in buckets], params, with_grad, xs, grads


def _refresh_masters(state: Dict, written: List[torch.Tensor]) -> None:
    """NOTE [master weights] in optimizer.py: parameters written from outside since the last step hand their
    masters the value they hold now."""
    for p in written:
        s = state.get(p)
        if s and "master" in s:
            s["master"].copy_(p.detach())
