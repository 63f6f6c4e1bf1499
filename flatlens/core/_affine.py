"""Parameter points as the landscape has them: theta + sum_j c_kj d_j, one row per point.

A line's or a plane's grid is a family of affine combinations of the centre and one or two
directions. :class:`AffinePoints` holds the family; the evaluators either materialize a
chunk of it as a ``(C, n)`` matrix or write one row at a time into a model's flat parameter
buffer, with the same bits either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AffinePoints", "WriteBuffers", "as_rows"]


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

    def writer(self, buffers: WriteBuffers | None = None) -> _AffineWriter:
        """A callable ``write(k, out)`` that puts row k into the flat tensor ``out``.

        Args:
            buffers: Work memory kept by a caller that writes many chunks (so that no chunk
                allocates parameter-sized memory, and products are reused); new if None.
        """
        return _AffineWriter(self, buffers or WriteBuffers(self.center))


class WriteBuffers:
    """Work memory for writing affine points, kept across chunks.

    Two parameter-sized tensors, and the products c d_m of the last direction with each
    coefficient c met, while they fit in ``product_bytes`` (a plane's columns repeat along
    every row: with the product kept, a point costs one sum). Products are keyed by the bits
    of c, so a reused product is the one :meth:`AffinePoints.materialize` computes.
    """

    def __init__(self, like: Tensor, product_bytes: int = 32 << 20) -> None:
        self.tmp = torch.empty_like(like)
        self.partial = torch.empty_like(like)
        self.max_products = product_bytes // max(like.numel() * like.element_size(), 1)
        self.products: dict[tuple[float, float], Tensor] = {}
        self.direction: Tensor | None = None

    def product(self, direction: Tensor, coef: Tensor, key: float) -> Tensor:
        """``direction * coef`` (``key`` is ``float(coef)``), kept when there is room."""
        if direction is not self.direction:
            self.products.clear()
            self.direction = direction
        kept = self.products.get((key, math.copysign(1.0, key)))
        if kept is not None:
            return kept
        if len(self.products) < self.max_products:
            kept = self.products[(key, math.copysign(1.0, key))] = torch.mul(direction, coef)
            return kept
        return torch.mul(direction, coef, out=self.tmp)


class _AffineWriter:
    """Writes row k of :class:`AffinePoints` into a buffer with one or two vector operations.

    The partial sum theta + c_k1 d_1 + ... + c_k(m-1) d_(m-1) is kept while the leading
    coefficients repeat (along a plane's rows), so a point costs one product (or none, when
    :class:`WriteBuffers` holds it) and one sum. The coefficients are 0-dim CPU tensors of
    theta's dtype (cheaper to dispatch than Python floats), used as scalars on any device:
    each product is rounded in theta's dtype, as in :meth:`AffinePoints.materialize`.
    """

    def __init__(self, points: AffinePoints, buffers: WriteBuffers) -> None:
        self.center, self.directions = points.center, points.directions
        coef = points.coefficients.to(device="cpu", dtype=self.center.dtype)
        keys = coef.tolist()
        m = len(self.directions)
        flat = coef.reshape(-1).unbind(0)  # one call for all the 0-dim coefficients
        self.rows = [flat[k * m : (k + 1) * m] for k in range(len(keys))]
        # Per row, whether its leading coefficients differ from the previous row's (the
        # partial sum is recomputed there; always at the first row of a chunk).
        self.new_lead = [
            m > 1 and (k == 0 or keys[k][:-1] != keys[k - 1][:-1]) for k in range(len(keys))
        ]
        self.keys = [key[-1] for key in keys]
        self.buffers = buffers
        self.partial = self.center if m == 1 else buffers.partial

    def __call__(self, k: int, out: Tensor) -> None:
        row = self.rows[k]
        if self.new_lead[k]:
            tmp = self.buffers.tmp
            torch.mul(self.directions[0], row[0], out=tmp)
            torch.add(self.center, tmp, out=self.partial)
            for c, d in zip(row[1:-1], self.directions[1:-1], strict=True):
                torch.mul(d, c, out=tmp)
                self.partial.add_(tmp)
        product = self.buffers.product(self.directions[-1], row[-1], self.keys[k])
        torch.add(self.partial, product, out=out)


def as_rows(points: Tensor | AffinePoints) -> Tensor:
    """The ``(C, n)`` matrix of the points (a tensor of points is returned as it is)."""
    return points.materialize() if isinstance(points, AffinePoints) else points
