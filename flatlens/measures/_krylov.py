"""The Krylov state of Lanczos: a basis, the projected matrix T, Ritz pairs, restarts.

:class:`KrylovState` holds the basis rows V (a :class:`~flatlens.measures._basis.Basis`)
and the projected matrix T = V^T A V[:, :p] (float64, on the CPU): the first p rows are
*processed* (A v_i is known in the span of the basis), the rest are the *frontier* (one
row, or up to k after a refinement restart). A Ritz pair (ritz value, V y) of the p x p
block then has the recurrence residual ||T[p:, :p] y||, known without another product.
The state is fed products (``absorb``); it never applies the operator itself.

:func:`lanczos_tridiagonal` is plain Lanczos for stochastic Lanczos quadrature: a fixed
number of steps from one start, returning the tridiagonal T.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flatlens.core._sharding import global_size, random_vector
from flatlens.measures._basis import Basis, norm64

__all__ = ["KrylovState", "RitzPairs", "Storage", "lanczos_tridiagonal"]

F64 = torch.float64


@dataclass(frozen=True)
class Storage:
    """Where vectors live and in which dtype."""

    device: torch.device
    dtype: torch.dtype


@dataclass
class RitzPairs:
    """The eigenpairs of the processed block T[:p, :p] (float64, on the CPU).

    Attributes:
        values: Ritz values, ascending.
        coefficients: (p, p) eigenvectors y of T[:p, :p] as columns: Ritz vector i is V y_i.
        residuals: Recurrence residual norms ||T[p:, :p] y_i||.
    """

    values: Tensor
    coefficients: Tensor
    residuals: Tensor


class KrylovState:
    """Basis rows V (the first ``p`` processed) and T = V^T A V[:, :p] in float64.

    Args:
        n: Vector length (this rank's part on a sharded objective).
        capacity: Most rows the basis will hold.
        work: Device and dtype of the operator's vectors.
        basis: Device and dtype the basis rows are stored in.
        generator: Random source for a fresh direction after an exact breakdown.
    """

    def __init__(
        self, n: int, capacity: int, work: Storage, basis: Storage, generator: torch.Generator
    ) -> None:
        self.n, self.work, self.generator = n, work, generator
        self.dim = global_size(n)  # the space's dimension (n on one process)
        self.basis = Basis(n, capacity, device=basis.device, dtype=basis.dtype)
        self.T = torch.zeros(capacity, capacity, dtype=F64)
        self.p, self.restarts, self.broke = 0, 0, False

    @property
    def processed(self) -> int:
        return self.p

    @property
    def exhausted(self) -> bool:
        """Every row is processed: no frontier row to continue from."""
        return self.p == self.basis.size

    def start(self, v0: Tensor) -> None:
        """Begin from the direction ``v0`` (any nonzero vector)."""
        self.basis.append(v0 / norm64(v0))

    def frontier(self) -> Tensor:
        """The next row to multiply, in the operator's device and dtype."""
        return self.basis.row(self.p).to(self.work.device, self.work.dtype)

    def load(self, u: Tensor, w: Tensor, noise: float) -> bool:
        """Restart from unit rows u with known products w = A u (k each): u is
        orthonormalized (u' = C u, w' = C w) and each w' is absorbed as a processed column.
        Returns whether a frontier row was left to continue from."""
        k = u.shape[0]
        c = torch.zeros(k, k, dtype=F64)
        for i in range(k):
            x = u[i].to(self.basis.device, self.work.dtype, copy=True)
            x, h = self.basis.orthogonalize(x)
            nrm = norm64(x)
            if nrm <= 1e-6:
                return False
            e = torch.zeros(k, dtype=F64)
            e[i] = 1.0
            c[i] = (e - h @ c[:i]) / nrm
            self.basis.append(x / nrm)
        w = c.to(w.device, w.dtype) @ w
        for i in range(k):
            self.absorb(w[i].to(self.basis.device, copy=True), noise)
        return not self.exhausted

    def absorb(self, w: Tensor, noise: float = 0.0) -> None:
        """Record w = A v_p (``w`` on the basis's device, modified in place): orthogonalize,
        fill column p of T, append the remainder as the next row."""
        j, n = self.p, self.dim
        w, h = self.basis.orthogonalize(w)
        rows = self.basis.size
        self.T[:rows, j] = h
        self.p += 1
        scale = float(self.T[:rows, : self.p].abs().max()) or 1.0
        beta = norm64(w)
        if rows >= n:
            return
        if beta <= max(1e-12 * scale * math.sqrt(n), noise):
            if self.exhausted:  # invariant subspace: go on from a fresh direction
                fresh = random_vector(self.n, self.generator, device=self.basis.device)
                fresh, _ = self.basis.orthogonalize(fresh.to(self.work.dtype))
                self.basis.append(fresh / norm64(fresh))
                self.broke = True
            return
        self.basis.append(w / beta)
        self.T[rows, j] = beta

    def ritz(self) -> RitzPairs:
        """The Ritz pairs of the processed block and their recurrence residuals."""
        p, rows = self.p, self.basis.size
        tp = self.T[:p, :p]
        values, y = torch.linalg.eigh(torch.triu(tp) + torch.triu(tp, 1).T)
        residuals = torch.linalg.vector_norm(self.T[p:rows, :p] @ y, dim=0)
        return RitzPairs(values, y, residuals)

    def restart(self, pairs: RitzPairs, keep: Tensor) -> None:
        """Thick restart: keep the Ritz vectors ``keep`` (indices into ``pairs``) and the
        frontier rows; T becomes diag(kept values) with their coupling to the frontier."""
        p, rows = self.p, self.basis.size
        yk = pairs.coefficients[:, keep]
        coupling = self.T[p:rows, :p] @ yk
        self.basis.rotate(yk, p, self.work.dtype)
        q = keep.numel()
        self.T.zero_()
        self.T[:q, :q] = torch.diag(pairs.values[keep])
        self.T[q : q + rows - p, :q] = coupling
        self.p, self.broke = q, False
        self.restarts += 1

    def ritz_vectors(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Unit Ritz vectors u = V y / ||V y|| (rows, operator dtype, basis device) for
        coefficient columns ``y``, and the norms ||V y|| (float64 CPU)."""
        u = self.basis.combine(y, self.work.dtype)
        norms = torch.tensor([norm64(row) for row in u], dtype=F64)
        u /= norms.to(u.device, u.dtype)[:, None]
        return u, norms

    def assembled_products(self, y: Tensor, norms: Tensor) -> Tensor:
        """A u as the Lanczos products give it: A V[:p] = V[:rows] T[:rows, :p], so
        A (V y) / ||V y|| = V (T y) / ||V y||; it rounds differently from a fresh product."""
        rows, p = self.basis.size, self.p
        out = self.basis.combine(self.T[:rows, :p] @ y, self.work.dtype)
        out /= norms.to(out.device, out.dtype)[:, None]
        return out


def lanczos_tridiagonal(
    matvec: Callable[[Tensor], Tensor],
    v0: Tensor,
    steps: int,
    *,
    basis_device: torch.device | str | None = None,
    basis_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Run ``steps`` Lanczos steps with full reorthogonalization from ``v0``.

    Inner products are accumulated in float64; the basis grows as needed (at most
    ``steps`` vectors), on ``basis_device`` in ``basis_dtype`` if given.

    Returns:
        ``(alpha, beta)`` in float64 on the CPU: the diagonal (length s) and off-diagonal
        (length s - 1) of the tridiagonal T = V^T A V, where s <= steps stops early at an
        invariant subspace.
    """
    n = v0.numel()
    steps = min(steps, global_size(n))
    dev, dt = v0.device, v0.dtype
    bdev = torch.device(basis_device) if basis_device else dev
    basis = Basis(n, steps, device=bdev, dtype=basis_dtype or dt)
    basis.append(v0 / norm64(v0))
    alpha: list[float] = []
    beta: list[float] = []
    for j in range(steps):
        w = matvec(basis.row(j).to(dev, dt)).to(basis.device, copy=True)
        w, h = basis.orthogonalize(w)
        alpha.append(float(h[j]))
        if j + 1 == steps:
            break
        b = norm64(w)
        if b <= 1e-12 * max(abs(a) for a in alpha) * math.sqrt(global_size(n)):
            break
        beta.append(b)
        basis.append(w / b)
    return torch.tensor(alpha, dtype=F64), torch.tensor(beta, dtype=F64)
