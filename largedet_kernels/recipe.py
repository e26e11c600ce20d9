"""The LargeDet training recipe around the optimizer (paper, Sec. 3.3 and 4.1).

- :func:`scaled_lr`: the linear scaling rule, lr ∝ batch size.
- :class:`WarmupMultiStepLR`: linear warm-up from a factor, then ×gamma at absolute
  iteration milestones, as a standard ``LRScheduler``.
- :func:`param_groups`: weight decay for weights, none for biases and normalisation
  parameters, as detection codebases do; optionally no trust ratio for some (``no_adapt``).
- :func:`convert_sync_batchnorm`: SyncBN whose statistics are shared by groups of
  ``group_size`` ranks (the paper's "BN size 32").
"""

import itertools
from bisect import bisect_right
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch.optim.lr_scheduler import LRScheduler

from .optimizer import finite_number

NORM_TYPES = (
    torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.LocalResponseNorm,
)  # fmt: skip


def scaled_lr(base_lr: float, base_batch: int, batch: int) -> float:
    """The linear scaling rule: ``base_lr`` was right for ``base_batch``; scale it to ``batch``."""
    if base_lr <= 0 or base_batch <= 0 or batch <= 0:
        raise ValueError(f"base_lr, base_batch and batch must be positive, got {base_lr}, {base_batch}, {batch}")
    return base_lr * batch / base_batch


class WarmupMultiStepLR(LRScheduler):
    """Linear warm-up over ``warmup_iters`` iterations from ``warmup_factor``·lr to lr,
    then lr·gamma^k after the k-th of ``milestones`` (gamma 0: lr 0 from the first milestone on).

    Milestones count iterations from the start of training, warm-up included (unlike
    ``SequentialLR([LinearLR, MultiStepLR])``, whose second scheduler counts from the
    end of the warm-up). Chainable: with ``ChainedScheduler`` its factor multiplies
    the others'.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, milestones: Iterable[int], gamma: float = 0.1,
                 warmup_factor: float = 1.0 / 3, warmup_iters: int = 500, last_epoch: int = -1) -> None:  # fmt: skip
        self.milestones = sorted(milestones)
        if any(m < 0 for m in self.milestones):
            raise ValueError(f"milestones must be >= 0, got {self.milestones}")
        if not (finite_number(warmup_factor) and 0 < warmup_factor <= 1):
            raise ValueError(f"warmup_factor must be in (0, 1], got {warmup_factor}")
        if not (finite_number(gamma) and gamma >= 0):
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
        if warmup_iters < 0:
            raise ValueError(f"warmup_iters must be >= 0, got {warmup_iters}")
        self.gamma, self.warmup_factor, self.warmup_iters = gamma, warmup_factor, warmup_iters
        super().__init__(optimizer, last_epoch)

    def factor(self, iteration: int) -> float:
        """lr / base lr at ``iteration`` (0-based)."""
        warm = 1.0
        if iteration < self.warmup_iters:
            warm = self.warmup_factor + (1 - self.warmup_factor) * iteration / self.warmup_iters
        return warm * self.gamma ** bisect_right(self.milestones, iteration)

    def get_lr(self) -> List[float]:
        t = self.last_epoch
        if t == 0:
            return [group["lr"] * self.factor(0) for group in self.optimizer.param_groups]
        before = self.factor(t - 1)
        # Once 0 (from a milestone with gamma 0) the factor stays 0, and so does lr.
        ratio = self.factor(t) / before if before != 0 else 0.0
        return [group["lr"] * ratio for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self) -> List[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]


Selector = Callable[[str, torch.nn.Module, torch.nn.Parameter], bool]


def norms(name: str, module: torch.nn.Module, param: torch.nn.Parameter) -> bool:
    """Every parameter of a normalisation layer."""
    return isinstance(module, NORM_TYPES)


def biases(name: str, module: torch.nn.Module, param: torch.nn.Parameter) -> bool:
    return name.endswith("bias")


def no_decay_for_biases_and_norms(name: str, module: torch.nn.Module, param: torch.nn.Parameter) -> bool:
    """The default exemption: biases, and every parameter of a normalisation layer."""
    return biases(name, module, param) or norms(name, module, param)


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay: Selector = no_decay_for_biases_and_norms,
                 no_adapt: Optional[Selector] = None) -> List[Dict]:  # fmt: skip
    """Param groups of the trainable parameters: with ``weight_decay``, or with 0 for those ``no_decay``
    exempts; and those ``no_adapt`` names with ``adapt=False``, whose steps take no trust ratio (the
    selectors are called with the parameter's local name, its module and itself: ``norms``, ``biases``,
    ``no_decay_for_biases_and_norms`` or your own). LAMB's authors exclude normalisation layers from both
    and keep decay on biases: ``param_groups(model, wd, no_decay=norms, no_adapt=norms)``."""
    buckets: Dict[Tuple[bool, bool], List[torch.nn.Parameter]] = {}
    seen = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            fixed = no_adapt is not None and no_adapt(name, module, param)
            buckets.setdefault((no_decay(name, module, param), fixed), []).append(param)
    groups = []
    for exempt, fixed in itertools.product((False, True), (False, True)):
        if (exempt, fixed) in buckets:
            groups.append(dict(params=buckets[exempt, fixed], weight_decay=0.0 if exempt else weight_decay))
            if fixed:
                groups[-1]["adapt"] = False
    return groups


def convert_sync_batchnorm(model: torch.nn.Module, group_size: Optional[int] = 32) -> torch.nn.Module:
    """Replace every BatchNorm by ``torch.nn.SyncBatchNorm`` sharing statistics within groups of
    ``group_size`` consecutive ranks (ranks 0..31, 32..63, ... for 32).

    Needs an initialised process group whose world size ``group_size`` divides (``None``,
    or a size at least the world size: all ranks share statistics). Every rank must call it,
    in the same order, as it creates process groups.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("convert_sync_batchnorm needs torch.distributed to be initialised")
    world = dist.get_world_size()
    process_group = None
    if group_size is not None and group_size < world:
        if group_size < 1 or world % group_size:
            raise ValueError(f"group_size {group_size} must divide the world size {world}")
        process_group, _ = dist.new_subgroups(group_size)
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=process_group)
