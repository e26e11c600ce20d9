"""Registers :class:`~largedet_kernels.PMDLAMB` and :class:`~largedet_kernels.LAMB` in mmengine's ``OPTIMIZERS``, and
:class:`TrustRatioHook` in its ``HOOKS``.

Importing this module is enough, from Python or from a config::

    custom_imports = dict(imports=["largedet_kernels.integrations.mmengine"])
    optim_wrapper = dict(optimizer=dict(type="PMDLAMB", lr=1e-3, weight_decay=5e-4, telemetry=True))
    custom_hooks = [dict(type="TrustRatioHook", interval=50)]

Registration is idempotent. A name that another package already registered for a
different class is left to it, with a warning: pass the class itself as ``type`` then.
"""

import warnings
from typing import Optional, Sequence

# mmengine.optim registers torch's and the optional packages' optimizers (bitsandbytes has a LAMB) on import:
# registering after it makes the outcome independent of import order.
import mmengine.optim  # noqa: F401
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS, OPTIMIZERS

from ..optimizer import LAMB, PMDLAMB

__all__ = ["TrustRatioHook", "register"]


class TrustRatioHook(Hook):
    """Logs the min, median and max trust ratio of each module every ``interval`` iterations, as
    ``train/trust_ratio/<module>/<statistic>`` scalars of the message hub (the text log and every visualizer
    backend), and ``train/trust_ratio/grad_norm`` where the optimizer clips. The optimizer needs
    ``telemetry=True``. Modules are the names' first ``depth`` components, or ``prefixes``
    (:meth:`largedet_kernels.telemetry.TrustRatios.by_module`). Reading the records waits for the step:
    that is the cost of each logged iteration, and none of the others."""

    priority = "NORMAL"  # before LoggerHook (BELOW_NORMAL), which writes what the message hub holds

    def __init__(self, interval: int = 50, prefixes: Optional[Sequence[str]] = None, depth: int = 1) -> None:
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"TrustRatioHook: interval must be an integer >= 1, got {interval!r}")
        self.interval, self.prefixes, self.depth = interval, prefixes, depth

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if not self.every_n_train_iters(runner, self.interval):
            return
        optimizer = runner.optim_wrapper.optimizer
        if not getattr(optimizer, "telemetry", False):
            raise RuntimeError("TrustRatioHook needs the optimizer's records: add telemetry=True to the optimizer's "
                               f"config (it is {type(optimizer).__name__})")  # fmt: skip
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        ratios = optimizer.trust_ratios().with_names(model.named_parameters())
        scalars = ratios.scalars("train/trust_ratio", self.prefixes, self.depth)
        runner.message_hub.update_scalars(scalars)


def register() -> None:
    """Register the optimizers under their class names, and the hook; already done on import."""
    if HOOKS.module_dict.get("TrustRatioHook") is None:
        HOOKS.register_module(name="TrustRatioHook", module=TrustRatioHook)
    for cls in (PMDLAMB, LAMB):
        name = cls.__name__
        existing = OPTIMIZERS.module_dict.get(name)
        if existing is None:
            OPTIMIZERS.register_module(name=name, module=cls)
        elif existing is not cls:
            warnings.warn(
                f"mmengine's OPTIMIZERS already has {name!r} ({existing.__module__}.{existing.__qualname__}); "
                f"left as it is: pass type=largedet_kernels.{name} to build this package's {name}",
                stacklevel=2,
            )


register()
