"""A growing Krylov basis of flat vectors, and inner products accumulated in float64.

Float32 dot products of length n ~ 1e7 lose about sqrt(n) eps of accuracy (sequential
accumulation in SIMD lanes), which is enough to shift the Lanczos matrix T by 1e-4
relative. The certificate's inner products and norms (:func:`dot64`, :func:`norm64`,
:func:`combo_norm64`, from :mod:`flatlens.core._sums`) are formed in float64 in two reused
float64 buffers of ``CHUNK_ELEMENTS`` elements, never a float64 copy.
The reorthogonalization's many products with the basis rows (:func:`rows_dot64`) are summed
in float32 within chunks of at most ``PROJECT_ELEMENTS / rows`` (at least 4096) elements and
in float64 across chunks: about 1e-8 relative to ||v|| ||w|| at n = 1.1e7 (a tenth of eps32),
three times faster than casting the rows.

:class:`Basis` stores its rows in blocks allocated as the basis grows (1, 1, 1, 2, 3, 4,
6, ... rows: at most half again what it holds, at most 32 at a time), on any device and in
any dtype; arithmetic on the rows is done in the dtype of the vector they meet (the
operator's dtype).

On a sharded objective (FSDP2) the vectors are this rank's pieces: every float64 sum here
is then summed over the ranks (:func:`flatlens.core._sharding.reduce_sum`), once per call,
so the results are the global inner products, the same bytes on every rank.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from flatlens.core._sharding import reduce_max, reduce_sum
from flatlens.core._sums import CHUNK_ELEMENTS, combo_norm64, dot64, norm64

__all__ = ["Basis", "combo_norm64", "dot64", "max_abs_sign", "norm64", "rows_dot64"]

PROJECT_ELEMENTS = 1 << 18
"""Elements of the rows (all rows together) summed in float32 before a float64 sum."""


def _slices(n: int, rows: int = 1) -> Iterator[slice]:
    step = max(4096, CHUNK_ELEMENTS // max(rows, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def rows_dot64(m: Tensor, w: Tensor, *, reduce: bool = True) -> Tensor:
    """``m @ w`` for rows ``m`` (r, n): sums in the wider of the two dtypes (at least
    float32) over chunks of at most ``max(4096, PROJECT_ELEMENTS / r)`` elements, float64
    across chunks; a float64 CPU tensor (r,). ``reduce=False`` leaves out the sum over
    ranks (the caller reduces several at once) and leaves the result on ``m``'s device."""
    if m.dtype == w.dtype == torch.float64:
        acc = m @ w
    else:
        acc = torch.zeros(m.shape[0], dtype=torch.float64, device=m.device)
        work = torch.promote_types(torch.promote_types(m.dtype, w.dtype), torch.float32)
        step = max(4096, PROJECT_ELEMENTS // max(m.shape[0], 1))
        for start in range(0, w.numel(), step):
            rows, part = m[:, start : start + step], w[start : start + step]
            acc += torch.mv(rows.to(work), part.to(work)).double()
    return reduce_sum(acc).cpu() if reduce else acc


def max_abs_sign(rows: Tensor) -> Tensor:
    """The sign (+1 or -1, +1 for a zero row) of each row's largest-magnitude entry; on a
    sharded space the largest over all ranks (-1 when ranks tie with opposite signs)."""
    idx = rows.abs().argmax(dim=1)
    peak = rows.gather(1, idx[:, None]).squeeze(1).to(torch.float64)
    signs = torch.where(peak < 0, -1.0, 1.0).to(torch.float64)
    top = peak.abs()
    best = reduce_max(top.clone())
    # One rank per row keeps its sign: a rank whose peak is not the maximum sends 0.
    mine = torch.where(top == best, signs, torch.zeros_like(signs))
    first = reduce_max(torch.where(mine != 0, 2.0 - mine, torch.zeros_like(mine)))
    return torch.where(first == 0, 1.0, 2.0 - first).to(rows.device)


class Basis:
    """Orthonormal rows v_0, v_1, ... of length n, allocated block by block.

    Args:
        n: Length of each row.
        capacity: Most rows it will ever hold.
        device: Where the rows live.
        dtype: How they are stored (may be lower than the working precision).
    """

    def __init__(self, n: int, capacity: int, *, device: torch.device, dtype: torch.dtype):
        self.n, self.capacity = n, capacity
        self.device, self.dtype = device, dtype
        self._blocks: list[Tensor] = []
        self.size = 0

    @property
    def allocated(self) -> int:
        """Rows allocated so far (the basis's memory, in vectors of n)."""
        return sum(b.shape[0] for b in self._blocks)

    def _segments(self, start: int, stop: int) -> Iterator[tuple[Tensor, int, int, int]]:
        """``(block, lo, hi, row0)``: rows ``row0 .. row0 + hi - lo`` are ``block[lo:hi]``."""
        base = 0
        for block in self._blocks:
            lo, hi = max(start - base, 0), min(stop - base, block.shape[0])
            if lo < hi:
                yield block, lo, hi, base + lo
            base += block.shape[0]

    def append(self, v: Tensor) -> None:
        """Store ``v`` (any device and dtype) as the next row."""
        if self.size == self.allocated:
            if self.size >= self.capacity:
                raise RuntimeError("basis capacity exceeded")
            rows = min(max(1, self.allocated // 2), 32, self.capacity - self.allocated)
            self._blocks.append(torch.empty(rows, self.n, device=self.device, dtype=self.dtype))
        for block, lo, _hi, _ in self._segments(self.size, self.size + 1):
            block[lo].copy_(v)
        self.size += 1

    def row(self, i: int) -> Tensor:
        """Row ``i`` (a view in the stored dtype)."""
        for block, lo, _hi, _ in self._segments(i, i + 1):
            return block[lo]
        raise IndexError(i)

    def project(self, w: Tensor) -> Tensor:
        """``V w`` over the rows held, in float64 on the CPU (``w`` on the basis's device);
        one reduction over ranks for all rows."""
        parts = [
            rows_dot64(b[lo:hi], w, reduce=False) for b, lo, hi, _ in self._segments(0, self.size)
        ]
        if not parts:
            return torch.zeros(0, dtype=torch.float64)
        return reduce_sum(torch.cat(parts)).cpu()

    def subtract(self, w: Tensor, h: Tensor) -> Tensor:
        """``w - V^T h`` in w's dtype, in place."""
        for b, lo, hi, r0 in self._segments(0, self.size):
            coef = h[r0 : r0 + hi - lo].to(w.device, w.dtype)
            if b.dtype == w.dtype:
                w.addmv_(b[lo:hi].T, coef, alpha=-1.0)
            else:
                for s in _slices(self.n, hi - lo):
                    w[s] -= b[lo:hi, s].to(w.dtype).T @ coef
        return w

    def orthogonalize(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Remove the span of the rows from ``w`` twice (DGKS); returns ``(w, V w)``."""
        h = self.project(w)
        w = self.subtract(w, h)
        h2 = self.project(w)
        return self.subtract(w, h2), h + h2

    def combine(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        """Rows ``y^T V[:r]`` for ``y`` of shape (r, c): a (c, n) tensor in ``dtype``."""
        out = torch.zeros(y.shape[1], self.n, device=self.device, dtype=dtype)
        for b, lo, hi, r0 in self._segments(0, y.shape[0]):
            coef = y[r0 : r0 + hi - lo].T.to(self.device, dtype)
            if b.dtype == dtype:
                out.addmm_(coef, b[lo:hi])
            else:
                for s in _slices(self.n, hi - lo):
                    out[:, s] += coef @ b[lo:hi, s].to(dtype)
        return out

    def rotate(self, y: Tensor, p: int, dtype: torch.dtype) -> None:
        """Replace rows by ``[y^T V[:p]; V[p:size]]`` in place, a chunk of columns at a time."""
        keep, tail = y.shape[1], self.size - p
        coef = y.T.to(self.device, dtype)
        for s in _slices(self.n, self.size):
            old = torch.cat([b[lo:hi, s] for b, lo, hi, _ in self._segments(0, self.size)])
            new = torch.cat([coef @ old[:p].to(dtype), old[p:].to(dtype)])
            for b, lo, hi, r0 in self._segments(0, keep + tail):
                b[lo:hi, s] = new[r0 : r0 + hi - lo]
        self.size = keep + tail
