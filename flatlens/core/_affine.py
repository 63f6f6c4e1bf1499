"""Parameter points as the landscape has them: theta + sum_j c_kj d_j, one row per point.

A line's or a plane's grid is a family of affine combinations of the centre and one or two
directions. :class:`AffinePoints` holds the family; the evaluators either materialize a
chunk of it as a ``(C, n)`` matrix or write one row at a time into a model's flat parameter
buffer, with the same bits either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AffinePoints", "as_rows"]


@dataclass(frozen=True)
class AffinePoints:
    """The points theta + sum_j c_kj d_j, k = 1, ..., C (the rows of a landscape's grid).

    Row k is formed as ((theta + c_k1 d_1) + c_k2 d_2) + ..., each product and sum rounded
    in theta's dtype, whether the rows are materialized (:meth:`materialize`) or written one
    at a time (:meth:`writer`): both give the same bits, and a row's bits do not depend on
    the other rows of its chunk.

    Attributes:
        center: theta, a flat ``(n,)`` tensor.
        directions: d_1, ..., d_m, flat tensors like theta.
        coefficients: ``(C, m)`` coefficients c_kj in theta's dtype (any device).
    """

    center: Tensor
    directions: tuple[Tensor, ...]
    coefficients: Tensor

    def __post_init__(self) -> None:
        m = len(self.directions)
        if self.coefficients.dim() != 2 or self.coefficients.shape[1] != m or m == 0:
            raise ValueError(
                f"coefficients must be (C, {m}) for {m} directions, got "
                f"{tuple(self.coefficients.shape)}"
            )

    def __len__(self) -> int:
        return int(self.coefficients.shape[0])

    def __getitem__(self, rows: slice) -> AffinePoints:
        return AffinePoints(self.center, self.directions, self.coefficients[rows])

    def materialize(self) -> Tensor:
        """The ``(C, n)`` matrix of the points (elementwise: no matrix product)."""
        coef = self.coefficients.to(device=self.center.device, dtype=self.center.dtype)
        out = self.center.expand(len(self), -1)
        for j, d in enumerate(self.directions):
            out = out + coef[:, j : j + 1] * d
        return out

    def writer(self, scratch: tuple[Tensor, Tensor] | None = None) -> _AffineWriter:
        """A callable ``write(k, out)`` that puts row k into the flat tensor ``out``.

        Args:
            scratch: Two tensors like theta to work in (kept by a caller that writes many
                chunks, so that no chunk allocates parameter-sized memory); new ones if None.
        """
        return _AffineWriter(self, scratch)


class _AffineWriter:
    """Writes row k of :class:`AffinePoints` into a buffer with two vector operations.

    The partial sum theta + c_k1 d_1 + ... + c_k(m-1) d_(m-1) is kept while the leading
    coefficients repeat (along a plane's rows), so a point costs one product and one sum.
    The coefficients are 0-dim CPU tensors of theta's dtype (cheaper to dispatch than Python
    floats), used as scalars on any device: each product is rounded in theta's dtype, as in
    :meth:`AffinePoints.materialize`.
    """

    def __init__(self, points: AffinePoints, scratch: tuple[Tensor, Tensor] | None) -> None:
        self.center, self.directions = points.center, points.directions
        coef = points.coefficients.to(device="cpu", dtype=self.center.dtype)
        self.keys = coef.tolist()
        m = len(self.directions)
        flat = coef.reshape(-1).unbind(0)  # one call for all the 0-dim coefficients
        self.rows = [flat[k * m : (k + 1) * m] for k in range(len(self.keys))]
        if scratch is None:
            scratch = (torch.empty_like(self.center), torch.empty_like(self.center))
        self.tmp, partial = scratch
        single = len(self.directions) == 1
        self.partial = self.center if single else partial
        self.lead: list[float] | None = [] if single else None

    def __call__(self, k: int, out: Tensor) -> None:
        *lead, last = self.rows[k]
        key = self.keys[k][:-1]
        if key != self.lead:
            torch.mul(self.directions[0], lead[0], out=self.tmp)
            torch.add(self.center, self.tmp, out=self.partial)
            for c, d in zip(lead[1:], self.directions[1:-1], strict=True):
                torch.mul(d, c, out=self.tmp)
                self.partial.add_(self.tmp)
            self.lead = key
        torch.mul(self.directions[-1], last, out=self.tmp)
        torch.add(self.partial, self.tmp, out=out)


def as_rows(points: Tensor | AffinePoints) -> Tensor:
    """The ``(C, n)`` matrix of the points (a tensor of points is returned as it is)."""
    return points.materialize() if isinstance(points, AffinePoints) else points
