"""Symmetric eigensolvers over a matrix-free operator ``v -> A v`` (flat torch vectors).

:func:`lanczos_eigsh` is thick-restart Lanczos (Wu & Simon, 2000) with full, twice-applied
(DGKS) reorthogonalization, inner products accumulated in float64, and a final certificate
from the true residual of every returned pair (``_certificate``; see its docstring). Plain
Lanczos steps for SLQ and power iteration live in ``_krylov``.

The basis is a :class:`~flatlens.measures._basis.Basis`: allocated as it grows, on any
device, in any dtype. Its rows and the projected matrix H = V^T A V[:, :p] (float64, CPU)
describe the Krylov state: the first p rows are processed (A v_i is known in the span of
the basis), the rest are the frontier (one row, or up to k after a refinement restart).
A Ritz pair (theta, V y) then has recurrence residual ||H[p:, :p] y||.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flatlens.measures._basis import Basis, norm64
from flatlens.measures._certificate import (
    ROUNDING_FACTOR,
    blocked_by_rounding,
    certify,
    error_bounds,
    rescaled,
    tolerance_limit,
)
from flatlens.measures._operators import Operator

Which = Literal["LA", "SA", "LM"]
MatVec = Callable[[Tensor], Tensor]
F64 = torch.float64

STOP_MARGIN = 0.5
"""Lanczos stops when the recurrence bounds are this fraction of tol, so the true residual
plus the rounding allowance (not known before the checks) meets tol at the first check."""
MAX_REFINEMENTS = 3
"""Restarts from the returned vectors when their true residual misses tol."""

__all__ = ["EigshOutput", "lanczos_eigsh"]


@dataclass
class EigshOutput:
    """Raw output of the eigensolvers (float64 CPU values, vectors on the device).

    ``rounding`` is the allowance delta for the operator's rounding in each bound,
    ``basis_vectors`` the most vectors of length n the basis held at once.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    error_bounds: Tensor
    converged: Tensor
    num_matvecs: int
    num_restarts: int
    rounding: float = 0.0
    basis_vectors: int = 0
    num_refinements: int = 0


def _order(theta: Tensor, which: Which) -> Tensor:
    """Indices of values from most to least wanted."""
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "SA":
        return torch.argsort(theta)
    return torch.argsort(theta.abs(), descending=True)


class _Krylov:
    """Basis rows (the first p processed) and H = V^T A V[:, :p] in float64 on the CPU."""

    def __init__(self, n, capacity, work, basis, generator):
        (self.dev, self.dt), (bdev, bdt) = work, basis
        self.n, self.generator = n, generator
        self.basis = Basis(n, capacity, device=bdev, dtype=bdt)
        self.H = torch.zeros(capacity, capacity, dtype=torch.float64)
        self.p, self.restarts, self.broke = 0, 0, False

    def start(self, v0: Tensor) -> None:
        self.basis.append(v0 / norm64(v0))

    def load(self, u: Tensor, w: Tensor, noise: float) -> bool:
        """Restart from unit rows u with known products w = A u (k each): u is
        orthonormalized (u' = C u, w' = C w) and each w' is absorbed as a processed column.
        Returns whether a frontier row was left to continue from."""
        k = u.shape[0]
        c = torch.zeros(k, k, dtype=torch.float64)
        for i in range(k):
            x, h = self.basis.orthogonalize(u[i].to(self.basis.device, self.dt, copy=True))
            nrm = norm64(x)
            if nrm <= 1e-6:
                return False
            e = torch.zeros(k, dtype=torch.float64)
            e[i] = 1.0
            c[i] = (e - h @ c[:i]) / nrm
            self.basis.append(x / nrm)
        w = c.to(w.device, w.dtype) @ w
        for i in range(k):
            self.absorb(w[i].to(self.basis.device, copy=True), noise)
        return self.p < self.basis.size

    def step(self, op: Operator) -> None:
        w = op.matvec(self.basis.row(self.p).to(self.dev, self.dt))
        # absorb works in place: copy unless the product is a new tensor of the operator's
        self.absorb(w.to(self.basis.device, copy=not op.fresh), 0.0)

    def absorb(self, w: Tensor, noise: float) -> None:
        """Record w = A v_p: orthogonalize, fill column p of H, append the remainder."""
        j, n = self.p, self.n
        w, h = self.basis.orthogonalize(w)
        rows = self.basis.size
        self.H[:rows, j] = h
        self.p += 1
        scale = float(self.H[:rows, : self.p].abs().max()) or 1.0
        beta = norm64(w)
        if rows >= n:
            return
        if beta <= max(1e-12 * scale * math.sqrt(n), noise):
            if self.p == rows:  # invariant subspace: go on from a fresh direction
                fresh = torch.randn(n, generator=self.generator, dtype=torch.float64)
                fresh, _ = self.basis.orthogonalize(fresh.to(self.basis.device, self.dt))
                self.basis.append(fresh / norm64(fresh))
                self.broke = True
            return
        self.basis.append(w / beta)
        self.H[rows, j] = beta

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        p, rows = self.p, self.basis.size
        hp = self.H[:p, :p]
        theta, y = torch.linalg.eigh(torch.triu(hp) + torch.triu(hp, 1).T)
        res = torch.linalg.vector_norm(self.H[p:rows, :p] @ y, dim=0)
        return theta, y, res

    def restart(self, theta: Tensor, y: Tensor, keep: Tensor) -> None:
        """Thick restart: keep the Ritz vectors ``keep`` and the frontier rows."""
        p, rows = self.p, self.basis.size
        yk = y[:, keep]
        coupling = self.H[p:rows, :p] @ yk
        self.basis.rotate(yk, p, self.dt)
        q = keep.numel()
        self.H.zero_()
        self.H[:q, :q] = torch.diag(theta[keep])
        self.H[q : q + rows - p, :q] = coupling
        self.p, self.broke = q, False
        self.restarts += 1


def _iterate(state, op, *, k, m, which, tol, stop_at, delta) -> tuple[Tensor, Tensor, Tensor]:
    """Lanczos steps until the recurrence bounds meet tol, stagnate below the rounding
    allowance, the space is exhausted, or ``op.count`` reaches ``stop_at``."""
    eps = torch.finfo(state.dt).eps
    eps_b = max(eps, torch.finfo(state.basis.dtype).eps)
    while True:
        if state.p < state.basis.size:
            state.step(op)
        if state.p >= k:
            theta, y, res = state.ritz()
            scale = float(theta.abs().max())
            d = max(delta or 0.0, 2 * eps_b * scale)
            order = _order(theta, which)
            want = order[:k]
            bounds = error_bounds(theta, res, d, partial(tolerance_limit, tol=tol, scale=scale))
            limit = tolerance_limit(theta[want], tol, scale)
            met = bool((bounds[want] <= STOP_MARGIN * limit).all())
            met = met or bool((res[want] <= 0.5 * d).all())
            full = state.p == state.basis.size
            if (met and (not state.broke or state.p == m)) or full or op.count >= stop_at:
                return theta, y, res
        if state.p == m:
            state.restart(theta, y, order[: min(m - 1, k + (m - k) // 2)])


def lanczos_eigsh(
    matvec: MatVec | Operator,
    v0: Tensor,
    k: int,
    *,
    which: Which = "LA",
    tol: float = 1e-4,
    max_matvecs: int | None = None,
    basis_size: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    matmat: MatVec | None = None,
    basis_device: torch.device | str | None = None,
    basis_dtype: torch.dtype | None = None,
    rounding: float | None = None,
) -> EigshOutput:
    """k extreme eigenpairs of a symmetric operator by thick-restart Lanczos, certified.

    Lanczos stops once the recurrence bounds of the k wanted Ritz pairs are within half of
    ``tol`` (no extra guard pair is waited for). Then each returned unit vector u = V y is
    checked with one more product w = fl(A u) (batched through ``matmat`` when given), all
    sums in float64:

    * lambda = u.w / u.u (the float64 Rayleigh quotient), r = ||w - lambda u||;
    * delta = 4 max_i ||w_i - V H y_i||: the same product assembled from the Lanczos
      products (A V = V H) rounds differently from the fresh one, so their distance
      measures the rounding at no extra product. V H y also carries the float32 basis
      arithmetic (about sqrt(p) eps ||A|| after restarts): when that keeps a pair from
      converging, and for a basis stored below the operator's precision, one more product
      measures it instead, delta = 4 ||fl(A(3u_1))/3 - w_1||. At least 2 eps ||A|| (||A||
      ~ max |Ritz value|), or ``rounding * ||A||`` when given; plus sqrt(n) eps64 ||w|| for
      the float64 sums (Higham & Mary, 2019);
    * bound = min(r + delta, (r + delta)^2 / (gap - delta) + delta): Weyl, and Kato-Temple
      once the nearest other Ritz value theta_l has met tol itself and r_l + delta <=
      |lambda - theta_l| / 10, with gap = |lambda - theta_l| - r_l - delta.

    ||fl(A u) - A u|| <= delta makes both bounds hold for the exact operator. delta is an
    estimate, not a proof: rounding that does not change with u (a cached forward pass)
    is not seen. A pair that misses ``tol`` is refined (Lanczos restarted from the returned
    vectors and their products, at most 3 times) unless delta alone is in the way, which
    warns; then ``converged`` says so.

    Args:
        matvec: ``v -> A v`` for flat vectors like ``v0``.
        v0: Start vector (any nonzero vector; normalized here).
        k: Number of eigenpairs wanted.
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest
            magnitude.
        tol: Converged when each bound is at most ``tol * max(|lambda|, 1e-6 ||A||)``.
        max_matvecs: Budget of products, the checks included (default
            ``max(500, 20 * basis_size)``); at least 2k (2k + 1 with a ``basis_dtype``
            below the operator's and no ``rounding``).
        basis_size: Processed Lanczos vectors before a restart (default
            ``max(2k + 10, 24)``). The basis holds at most ``basis_size + 1`` vectors
            (``basis_size + k`` while refining), allocated as it grows.
        generator: Random source for a fresh direction after an exact breakdown.
        progress: Show a tqdm bar of products done.
        matmat: Optional ``rows -> A rows`` for a (b, n) tensor, to batch the checks.
        basis_device: Keep the basis there (e.g. ``"cpu"`` for a GPU operator: saves device
            memory, costs two transfers of n per step); default the operator's device.
        basis_dtype: Store the basis in this dtype (e.g. float32 for a float64 operator,
            bfloat16 to halve float32 memory). Lower precision weakens orthogonality and
            limits the accuracy reachable to about eps(basis_dtype) relative; the
            certificate stays honest.
        rounding: Known relative size u of the operator's rounding, ||fl(A v) - A v|| <=
            u ||A|| ||v|| (0 for exact products), instead of measuring it.

    Returns:
        Wanted eigenvalues in ``which`` order, unit eigenvectors as rows, true residual
        norms, error bounds and convergence flags.
    """
    n = v0.numel()
    if not 1 <= k < n:
        raise ValueError(f"k must be between 1 and num_params - 1 = {n - 1}, got {k}")
    m = min(n, basis_size or max(2 * k + 10, 24))
    if m <= k:
        raise ValueError(f"basis_size must exceed k={k}, got {m}")
    if rounding is not None and not rounding >= 0:
        raise ValueError(f"rounding must be >= 0, got {rounding!r}")
    budget = max_matvecs if max_matvecs is not None else max(500, 20 * m)
    if isinstance(matvec, Operator):
        op = matvec
    else:
        mm = None if matmat is None else (lambda x: matmat(x.T.contiguous()).T)
        op = Operator(matvec, n, v0.dtype, v0.device, matmat=mm)
    dev, dt = op.device, op.dtype
    work = (dev, dt)
    basis = (torch.device(basis_device) if basis_device else dev, basis_dtype or dt)
    # A basis stored below the working precision adds its own rounding to V H y, which would
    # be taken for the operator's: then the rounding check takes one more product instead.
    exact_basis = torch.finfo(basis[1]).eps <= torch.finfo(dt).eps
    least = 2 * k + (rounding is None and not exact_basis)
    if budget < least:
        raise ValueError(
            f"max_matvecs (max_hvps) must be at least {least}: k Lanczos steps and k residual "
            "checks" + ("" if least == 2 * k else " and one rounding check")
        )
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    bar = tqdm(desc="lanczos", unit="matvec", disable=not progress, leave=False)
    op.on_product, start_count = bar.update, op.count
    stop_at = start_count + budget
    state = _Krylov(n, min(n, m + 1), work, basis, gen)
    state.start(v0.to(basis[0], dt))
    delta, peak, restarts, rounds, worst, best = None, 0, 0, 0, math.inf, None
    try:
        while True:
            measure = delta is None and rounding is None
            reserve = k + (measure and not exact_basis)
            theta, y, res = _iterate(
                state, op, k=k, m=m, which=which, tol=tol, stop_at=stop_at - reserve, delta=delta
            )
            order = _order(theta, which)
            u, predicted = _returned(state, y[:, order[:k]], dt, predict=measure and exact_basis)
            u, predicted = u.to(dev), None if predicted is None else predicted.to(dev)
            peak, restarts = max(peak, state.basis.allocated), restarts + state.restarts
            state = None  # free the basis before the checks
            cert = certify(
                op,
                u,
                theta[order[k:]],
                res[order[k:]],
                tol=tol,
                delta=delta,
                rounding=rounding,
                predicted=predicted,
            )
            if predicted is not None and not bool(cert.converged.all()) and op.count < stop_at:
                cert = rescaled(op, u, cert, theta[order[k:]], res[order[k:]], tol)
            predicted = None
            delta = cert.delta
            if best is None or cert.score < best[0].score:
                best = (cert, u)
            failing = ~cert.converged
            if not bool(failing.any()):
                break
            reason = blocked_by_rounding(cert, failing, tol)
            if reason:
                warnings.warn(reason, RuntimeWarning, stacklevel=2)
                break
            now = float(cert.residuals[failing].max())
            room = stop_at - op.count
            if rounds >= MAX_REFINEMENTS or room < k + 2 or now > 0.5 * worst:
                break
            worst, rounds = now, rounds + 1
            state = _Krylov(n, min(n, m + k), work, basis, gen)
            if not state.load(u, cert.products, delta / ROUNDING_FACTOR):
                break
    finally:
        op.on_product = None
        bar.close()
    cert, u = best
    idx = _order(cert.values, which)
    return EigshOutput(
        eigenvalues=cert.values[idx],
        eigenvectors=_fix_signs(u[idx]),
        residuals=cert.residuals[idx],
        error_bounds=cert.bounds[idx],
        converged=cert.converged[idx],
        num_matvecs=op.count - start_count,
        num_restarts=restarts,
        rounding=delta,
        basis_vectors=peak,
        num_refinements=rounds,
    )


def _returned(
    state: _Krylov, y: Tensor, dtype: torch.dtype, *, predict: bool
) -> tuple[Tensor, Tensor | None]:
    """The unit Ritz vectors u = V y / ||V y|| and, with ``predict``, their products as the
    Lanczos products give them: A V[:p] = V[:rows] H[:rows, :p], so A u = V (H y) / ||V y||,
    which rounds differently from a fresh product fl(A u)."""
    u = state.basis.combine(y, dtype)
    norms = torch.tensor([norm64(row) for row in u], dtype=F64)
    u /= norms.to(u.device, dtype)[:, None]
    if not predict:
        return u, None
    rows, p = state.basis.size, state.p
    predicted = state.basis.combine(state.H[:rows, :p] @ y, dtype)
    predicted /= norms.to(u.device, dtype)[:, None]
    return u, predicted


def _fix_signs(vecs: Tensor) -> Tensor:
    """Make each row's largest-magnitude entry positive, so results are reproducible."""
    idx = vecs.abs().argmax(dim=1)
    signs = torch.sign(vecs.gather(1, idx[:, None]))
    signs[signs == 0] = 1
    return vecs * signs
