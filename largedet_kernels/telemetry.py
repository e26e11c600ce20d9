"""Trust-ratio telemetry: what ``telemetry=True`` records at each step, read back when asked.

The step writes each tensor's record on its device, in the launches it makes anyway (NOTE [trust-ratio records]
in backends/tables.py); nothing here runs in ``step()``. :meth:`TrustRatios.by_module` and
:meth:`TrustRatios.scalars` aggregate the records for a logger (docs/telemetry.md).
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .backends import Bucket
from .backends.tables import RECORD_FIELDS

if TYPE_CHECKING:
    from .optimizer import _LambFamily

STATISTICS = ("min", "median", "max")


@dataclass(frozen=True)
class Record:
    """One tensor's record of the last step that stepped it."""

    step: int  # t of that step
    x_norm: float  # ‖x‖ before the step (the fp32 master's where there is one; the whole tensor's when sharded)
    u_norm: float  # ‖u‖, u = r + λx
    ratio: float  # ‖x‖/‖u‖ as applied: bounded; 1 for a zero norm or no trust ratio; NaN for a non-finite norm


@dataclass
class TrustRatios:
    """The records of the last step, keyed by parameter name where the param groups carry ``param_names``, else
    by parameter; the global gradient norm ‖g‖ (unscaled, before clipping) where ``max_grad_norm`` made the step
    compute it; and whether GradScaler skipped the last step, whose tensors then keep the records of the step
    before (their ``step`` says which)."""

    records: Dict[Union[str, torch.Tensor], Record]
    grad_norm: Optional[float]
    skipped: bool

    def by_module(self, prefixes: Optional[Sequence[str]] = None, depth: int = 1,
                  field: str = "ratio") -> Dict[str, Dict[str, float]]:  # fmt: skip
        """min, median and max of ``field`` (a Record field) over the tensors of each module: of each of
        ``prefixes`` (a name's dotted prefix, e.g. ``"backbone"`` or ``"roi_heads.box_head"``), or else of each
        distinct first ``depth`` components of the names. A NaN among a module's values shows in each statistic."""
        if field not in RECORD_FIELDS or field == "step":
            raise ValueError(f"field must be one of x_norm, u_norm, ratio, got {field!r}")
        if any(not isinstance(name, str) for name in self.records):
            raise ValueError("by_module needs parameter names: pass model.named_parameters(), or param groups "
                             "with 'param_names', to the optimizer")  # fmt: skip
        values: Dict[str, List[float]] = {}
        for name, record in self.records.items():
            module = _module_of(name, prefixes, depth)
            if module is not None:
                values.setdefault(module, []).append(getattr(record, field))
        return {module: _statistics(v) for module, v in values.items()}

    def with_names(self, named_parameters: Iterable[Tuple[str, torch.Tensor]]) -> "TrustRatios":
        """The records keyed by the names of ``named_parameters`` (``model.named_parameters()``), for optimizers
        whose param groups carry no names (mmengine builds one group per parameter)."""
        names = {id(p): name for name, p in named_parameters}
        records = {names.get(id(key), key) if isinstance(key, torch.Tensor) else key: record
                   for key, record in self.records.items()}  # fmt: skip
        return TrustRatios(records, self.grad_norm, self.skipped)

    def scalars(self, tag: str = "trust_ratio", prefixes: Optional[Sequence[str]] = None,
                depth: int = 1) -> Dict[str, float]:  # fmt: skip
        """A flat ``{"<tag>/<module>/<statistic>": value}`` of by_module's ratios, plus ``"<tag>/grad_norm"``
        where recorded: what Lightning's ``log_dict`` and TensorBoard's ``add_scalar`` take."""
        out = {f"{tag}/{module}/{stat}": value for module, stats in self.by_module(prefixes, depth).items()
               for stat, value in stats.items()}  # fmt: skip
        if self.grad_norm is not None:
            out[f"{tag}/grad_norm"] = self.grad_norm
        return out


def _module_of(name: str, prefixes: Optional[Sequence[str]], depth: int) -> Optional[str]:
    if prefixes is None:
        return ".".join(name.split(".")[:depth])
    for prefix in prefixes:
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    return None


def _statistics(values: List[float]) -> Dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return dict(zip(STATISTICS, (t.min().item(), t.median().item(), t.max().item())))


def bucket_records(bucket: Bucket) -> torch.Tensor:
    """The bucket's records in its tensors' order: a fused backend's split keeps one per part."""
    parts = bucket.split
    if parts is None or parts.rest is None:
        return bucket.records
    out = torch.empty_like(bucket.records)
    out[parts.kernel_idx] = parts.kernel_part.records
    out[parts.rest_idx] = parts.rest.records
    return out


def collect(optimizer: "_LambFamily", recorded: List[Tuple[List[torch.Tensor], torch.Tensor]],
            found_inf: Optional[torch.Tensor], grad_norm: Optional[torch.Tensor]) -> TrustRatios:  # fmt: skip
    """TrustRatios from each bucket's (parameters, records): one copy to the host, which waits for the step."""
    names = {id(p): name for group in optimizer.param_groups
             for p, name in zip(group["params"], group.get("param_names", ()))}  # fmt: skip
    tensors = [r.to("cpu", torch.float64) for _, r in recorded]
    records: Dict[Union[str, torch.Tensor], Record] = {}
    for (params, _), host in zip(recorded, tensors):
        for p, (t, x_norm, u_norm, ratio) in zip(params, host.tolist()):
            if t > 0:  # 0: not stepped since the buckets were built
                records[names.get(id(p), p)] = Record(int(t), x_norm, u_norm, ratio)
    skipped = found_inf is not None and bool(found_inf.item() != 0)
    return TrustRatios(records, None if grad_norm is None else grad_norm.item(), skipped)
