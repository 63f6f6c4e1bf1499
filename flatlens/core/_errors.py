"""The errors flatlens raises for a computation that went wrong (not for bad arguments)."""

from __future__ import annotations

__all__ = ["DataChangedError", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """The loss (or a value derived from it) is NaN or infinite.

    Raised by :class:`~flatlens.Objective`, every measure and the trainer, so one
    ``except NonFiniteLossError`` (or ``except FloatingPointError``) catches a diverged
    model, NaN weights or inputs, or a perturbation so large that the loss overflows.
    """


class DataChangedError(ValueError):
    """Two passes over the same data gave different losses."""
