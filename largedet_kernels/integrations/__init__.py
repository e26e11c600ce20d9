"""Adapters for the training frameworks: import the one you use.

- ``largedet_kernels.integrations.mmengine``: registers the optimizers in mmengine's ``OPTIMIZERS``.
- ``largedet_kernels.integrations.lightning``: a LightningModule mixin for gradient clipping.
- ``largedet_kernels.integrations.timm``: registers the optimizers in timm's optimizer registry.

This package imports no framework itself, so importing it costs nothing.
"""
