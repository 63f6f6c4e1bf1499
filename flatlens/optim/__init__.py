"""Optimizers that seek flat minima: SAM and GAM, wrapping any ``torch.optim`` optimizer."""

from flatlens.optim._gam import GAM
from flatlens.optim._sam import SAM, PerturbationOptimizer

__all__ = ["GAM", "SAM", "PerturbationOptimizer"]
