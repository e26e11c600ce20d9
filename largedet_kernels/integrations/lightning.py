"""Gradient clipping with :class:`~largedet_kernels.PMDLAMB` and :class:`~largedet_kernels.LAMB` in Lightning.

Under ``precision="16-mixed"`` or ``"bf16-mixed"``, Lightning's ``MixedPrecision.clip_gradients``
refuses every optimizer with ``_step_supports_amp_scaling`` (ours: GradScaler hands the
scale to the step, which unscales as it clips and updates), with an error that blames "a
'fused' optimizer". The optimizer cannot change that message: the attribute is what
GradScaler reads, and Lightning raises before the optimizer is called. Clip with the
optimizer's own ``max_grad_norm`` instead of ``Trainer(gradient_clip_val=...)``;
:class:`MaxGradNormClipping` makes the error say so.
"""

from typing import Any, Optional, Union

from lightning.pytorch.plugins.precision import MixedPrecision

from ..optimizer import LAMB, PMDLAMB

__all__ = ["MaxGradNormClipping"]


class MaxGradNormClipping:
    """LightningModule mixin, listed before ``LightningModule``: ``Trainer(gradient_clip_val=...)``
    under mixed precision with PMDLAMB or LAMB raises an error naming ``max_grad_norm``.

    Elsewhere (other optimizers, or precisions whose clipping works with ours) it defers
    to Lightning's ``configure_gradient_clipping``.
    """

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Optional[Union[int, float]] = None,
                                    gradient_clip_algorithm: Optional[str] = None) -> None:  # fmt: skip
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and isinstance(optimizer, (PMDLAMB, LAMB)) and isinstance(plugin, MixedPrecision):
            name = type(optimizer).__name__
            raise RuntimeError(
                f"Trainer(gradient_clip_val={gradient_clip_val}) clips in Lightning, which refuses {name} under "
                f"precision={plugin.precision!r}: drop gradient_clip_val and clip inside the step with "
                f"{name}(..., max_grad_norm={gradient_clip_val}) (it clips the global norm, after unscaling)"
            )
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
