"""largedet-kernels: fused PMD-LAMB and LAMB optimizers for large-batch training."""

from . import recipe
from .dispatch import BackendUnavailableError
from .optimizer import LAMB, PMDLAMB

__all__ = ["PMDLAMB", "LAMB", "BackendUnavailableError", "recipe"]
__version__ = "0.1.0"
