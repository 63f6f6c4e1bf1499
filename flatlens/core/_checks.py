"""Argument checks shared by every layer, and the one seed -> ``torch.Generator`` rule.

Each check returns the value in its canonical type or raises a ``TypeError`` (wrong kind of
value) or ``ValueError`` (right kind, out of range) whose message names the argument, the
range it must lie in and the value given. ``bool`` is never accepted as a number.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = [
    "check_finite",
    "check_fraction",
    "check_nonnegative",
    "check_positive",
    "check_positive_int",
    "check_rho",
    "floating_dtype",
    "make_generator",
]


def _real(name: str, value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what}, not {type(value).__name__}")
    return float(value)


def check_finite(name: str, value: object) -> float:
    """``value`` as a float, unless it is not a finite real number."""
    number = _real(name, value, "a finite number")
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


def check_nonnegative(name: str, value: object) -> float:
    """``value`` as a float, unless it is not a finite number >= 0."""
    number = _real(name, value, "a number >= 0")
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def check_positive(name: str, value: object) -> float:
    """``value`` as a float, unless it is not a finite number > 0."""
    number = _real(name, value, "a number > 0")
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def check_fraction(name: str, value: object) -> float:
    """``value`` as a float, unless it does not lie in [0, 1]."""
    number = check_nonnegative(name, value)
    if number > 1:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return number


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` as an int, unless it is not an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_rho(rho: object, name: str = "rho") -> float:
    """The radius of a ball as a float, unless it is not a finite number > 0."""
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real):
        raise TypeError(f"{name} must be a real number > 0, not {type(rho).__name__}")
    value = float(rho)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0 (the ball's radius), got {rho!r}")
    return value


def make_generator(seed: int | torch.Generator) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or ``seed`` itself when it is a generator.

    Raises:
        TypeError: ``seed`` is neither an integer (``True``/``False`` are refused) nor a
            ``torch.Generator``.
    """
    if isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or a torch.Generator, not {type(seed).__name__}")
    return torch.Generator().manual_seed(int(seed))


def floating_dtype(value: object, name: str = "dtype") -> torch.dtype | None:
    """``value`` as a floating torch dtype: a dtype, or its name (``"bfloat16"``, or
    ``"torch.float32"`` as JSON holds it); ``None`` stays ``None``."""
    if value is None:
        return None
    dtype = getattr(torch, value.removeprefix("torch."), value) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"{name} must be a floating torch dtype (float32, bfloat16, ...), not {value!r}"
        )
    return dtype
