"""Grids of a landscape: axes that hold 0, the flat bookkeeping of values, and the points.

A grid over directions d_1, ..., d_k (k = 1 or 2) with axes a^(1), ..., a^(k) holds the
points theta + sum_j a_j d_j for every combination of coordinates, in row-major order. Every
axis holds 0 exactly, so the centre theta is a grid point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flatlens.core._affine import AffinePoints
from flatlens.core._checks import check_positive_int
from flatlens.core._renames import renamed

__all__ = [
    "Grid",
    "Span",
    "affine_points",
    "check_trajectory",
    "grid_axes",
    "grid_axis",
    "grid_points",
]

Span = tuple[float, float]


@renamed(steps="num_points")
def grid_axis(span: Span, num_points: int) -> np.ndarray:
    """``num_points`` evenly spaced coordinates over ``span`` that hold 0 exactly.

    The point of ``np.linspace(lo, hi, num_points)`` nearest 0 is set to 0 when it is within
    1e-9 of the span's width (odd ``num_points`` over a symmetric span); otherwise 0 is inserted,
    giving ``num_points + 1`` points.

    Raises:
        ValueError: unless lo < hi are finite, lo <= 0 <= hi and num_points is an integer >= 2.
    """
    try:
        lo, hi = (float(v) for v in span)
    except (TypeError, ValueError):
        raise ValueError(f"span must be a pair of numbers (lo, hi), got {span!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"span must be finite with lo < hi, got {span!r}")
    if not lo <= 0.0 <= hi:
        raise ValueError(
            f"span {span!r} must contain 0, the model's own parameters, so the centre is on "
            "the grid; shift the span or move the centre with the direction"
        )
    num_points = check_positive_int("num_points", num_points, minimum=2)
    axis = np.linspace(lo, hi, num_points)
    near = int(np.argmin(np.abs(axis)))
    if abs(axis[near]) <= 1e-9 * (hi - lo):
        axis[near] = 0.0
    else:
        axis = np.sort(np.append(axis, 0.0))
    return axis


def _pair(value: Any, nested: bool) -> tuple[Any, Any]:
    """``value`` per axis: ``(v1, v2)`` when given as a pair (of pairs, for spans), else
    ``(value, value)``."""
    if isinstance(value, Sequence) and len(value) == 2:
        if not nested or isinstance(value[0], Sequence):
            return value[0], value[1]
    return value, value


def grid_axes(
    span: Span | tuple[Span, Span], num_points: int | tuple[int, int], ndim: int
) -> tuple[list[np.ndarray], dict[str, list]]:
    """The axes of a line (``ndim=1``) or plane (``ndim=2``) grid and their settings.

    Args:
        span: ``(lo, hi)``; for a plane also ``((lo1, hi1), (lo2, hi2))``.
        num_points: Points per axis; for a plane also a pair.
        ndim: 1 or 2.

    Returns:
        The coordinate arrays (see :func:`grid_axis`) and ``{"span": [[lo, hi], ...],
        "num_points": [...]}`` as given, for a landscape's settings.
    """
    if ndim == 1:
        spans, step_list = [span], [num_points]
    else:
        spans, step_list = list(_pair(span, nested=True)), list(_pair(num_points, nested=False))
    coords = [grid_axis(s, n) for s, n in zip(spans, step_list, strict=True)]
    return coords, {"span": [[float(v) for v in s] for s in spans], "num_points": step_list}


def check_trajectory(trajectory: Any, ndim: int) -> np.ndarray | None:
    """A finite ``(T, ndim)`` float64 copy of ``trajectory`` (extra columns dropped)."""
    if trajectory is None:
        return None
    arr = np.asarray(trajectory, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < ndim or not np.isfinite(arr).all():
        raise ValueError(
            f"trajectory must be a finite (T, {ndim}) array of coordinates, got shape {arr.shape}"
        )
    return arr[:, :ndim].copy()


class Grid:
    """Flat bookkeeping of a grid: coefficients per point, values, done mask, centre.

    Attributes:
        coords: The axes (float64).
        shape: Points per axis.
        coef: ``(size, ndim)`` coefficients (a_k, b_k) of every point, row-major.
        center_index: Index of the origin per axis; ``center_flat`` its flat index.
        values: Metric name -> flat float64 array (NaN where not evaluated).
        done: Flat mask of evaluated points.
    """

    def __init__(self, coords: Sequence[np.ndarray], metrics: Sequence[str]) -> None:
        self.coords = [np.asarray(c, dtype=np.float64) for c in coords]
        self.shape = tuple(len(c) for c in self.coords)
        mesh = np.meshgrid(*self.coords, indexing="ij")
        self.coef = np.stack([m.reshape(-1) for m in mesh], axis=1)
        self.size = self.coef.shape[0]
        self.center_index = tuple(int(np.flatnonzero(c == 0.0)[0]) for c in self.coords)
        self.center_flat = int(np.ravel_multi_index(self.center_index, self.shape))
        self.values = {m: np.full(self.size, np.nan) for m in metrics}
        self.done = np.zeros(self.size, dtype=bool)

    def others(self) -> np.ndarray:
        """Indices of every point but the centre, in row-major order."""
        idx = np.arange(self.size)
        return idx[idx != self.center_flat]

    def record(self, idx: np.ndarray, values: dict[str, np.ndarray]) -> None:
        """Store the metric values of the points ``idx`` and mark them done."""
        for m, v in values.items():
            self.values[m][idx] = v
        self.done[idx] = True

    def shaped(self) -> dict[str, np.ndarray]:
        """Copies of the values in the grid's shape."""
        return {m: v.reshape(self.shape).copy() for m, v in self.values.items()}


def grid_points(theta: Tensor, directions: Sequence[Tensor], coef: np.ndarray) -> Tensor:
    """Rows theta + a_k d1 (+ b_k d2), elementwise (no GEMM), so each row's bits do not
    depend on which other points share its chunk."""
    return affine_points(theta, directions, coef).materialize()


def affine_points(theta: Tensor, directions: Sequence[Tensor], coef: np.ndarray) -> AffinePoints:
    """The points theta + a_k d1 (+ b_k d2) as :class:`~flatlens.core._affine.AffinePoints`
    (the coefficients rounded to theta's dtype), to materialize or to write one by one."""
    coef_t = torch.as_tensor(np.asarray(coef), dtype=theta.dtype)
    return AffinePoints(theta, tuple(directions), coef_t)
