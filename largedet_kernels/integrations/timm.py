"""Registers :class:`~largedet_kernels.PMDLAMB` and :class:`~largedet_kernels.LAMB` in timm's optimizer registry.

After ``import largedet_kernels.integrations.timm``, ``timm.optim.create_optimizer_v2(model, "pmdlamb", ...)``
and ``"largedetlamb"`` build them, with timm's parameter groups (no weight decay for biases and
norms). timm's own ``"lamb"`` stays timm's; a timm name cannot contain ``_``, which timm reads as
a prefix (``lookahead_``).
"""

from timm.optim import OptimInfo, get_optimizer_info, list_optimizers

# timm (1.0.x) exports no function that registers into the registry create_optimizer_v2 reads.
from timm.optim._optim_factory import default_registry

from ..optimizer import LAMB, PMDLAMB

__all__ = ["register"]

OPTIMIZERS = (
    OptimInfo(name="pmdlamb", opt_class=PMDLAMB, has_betas=True,
              description="LargeDet's Periodical Moments Decay LAMB (largedet_kernels.PMDLAMB)"),
    OptimInfo(name="largedetlamb", opt_class=LAMB, has_betas=True,
              description="LAMB with apex FusedLAMB's defaults (largedet_kernels.LAMB)"),
)  # fmt: skip


def register() -> None:
    """Register the optimizers; already done on import. A name already bound to the same class is left
    alone, as timm warns on every registration of a name it has."""
    for info in OPTIMIZERS:
        if info.name not in list_optimizers() or get_optimizer_info(info.name).opt_class is not info.opt_class:
            default_registry.register(info)


register()
