"""Optimizers that seek flat minima: SAM and GAM, wrapping any ``torch.optim`` optimizer."""

from flatlens.optim._gam import GAM
from flatlens.optim._perturbation import PerturbationOptimizer
from flatlens.optim._sam import SAM

__all__ = ["GAM", "SAM", "PerturbationOptimizer"]
