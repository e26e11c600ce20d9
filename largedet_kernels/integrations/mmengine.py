"""Registers :class:`~largedet_kernels.PMDLAMB` and :class:`~largedet_kernels.LAMB` in mmengine's ``OPTIMIZERS``.

Importing this module is enough, from Python or from a config::

    custom_imports = dict(imports=["largedet_kernels.integrations.mmengine"])
    optim_wrapper = dict(optimizer=dict(type="PMDLAMB", lr=1e-3, weight_decay=5e-4))

Registration is idempotent. A name that another package already registered for a
different class is left to it, with a warning: pass the class itself as ``type`` then.
"""

import warnings

# mmengine.optim registers torch's and the optional packages' optimizers (bitsandbytes has a LAMB) on import:
# registering after it makes the outcome independent of import order.
import mmengine.optim  # noqa: F401
from mmengine.registry import OPTIMIZERS

from ..optimizer import LAMB, PMDLAMB

__all__ = ["register"]


def register() -> None:
    """Register the optimizers under their class names; already done on import."""
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
