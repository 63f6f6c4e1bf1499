"""Thick-restart Lanczos over a matrix-free operator ``v -> A v`` (flat torch vectors).

:func:`lanczos_eigsh` is thick-restart Lanczos (Wu & Simon, 2000) with full, twice-applied
(DGKS) reorthogonalization, inner products accumulated in float64, and a final certificate
from the true residual of every returned pair. Calls go one way: this driver applies the
operator, feeds the products to the Krylov state (``_krylov``), which orthogonalizes them
against its basis (``_basis``), and hands the checked products to the certificate
(``_certificate``), which only computes.
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

from flatlens.core._sharding import global_size
from flatlens.measures._basis import max_abs_sign
from flatlens.measures._certificate import (
    ROUNDING_FACTOR,
    ROUNDING_SCALE,
    Certificate,
    Neighbours,
    allowance,
    blocked_by_rounding,
    bound,
    error_bounds,
    known_allowance,
    rayleigh,
    spread,
    tolerance_limit,
)
from flatlens.measures._krylov import KrylovState, RitzPairs, Storage
from flatlens.measures._operators import Operator

Which = Literal["LA", "SA", "LM"]
MatVec = Callable[[Tensor], Tensor]
F64 = torch.float64

STOP_MARGIN = 0.9
"""Lanczos stops when the bounds it will report, computed from the recurrence residuals and
an estimate of the rounding allowance, are this fraction of tol: the true residuals equal
the recurrence ones up to rounding, so the check then meets tol (else it refines)."""
MAX_REFINEMENTS = 3
"""Restarts from the returned vectors when their true residual misses tol."""

__all__ = ["EigshOutput", "fix_signs", "lanczos_eigsh"]


@dataclass
class EigshOutput:
    """Raw output of the eigensolvers (float64 CPU values, vectors on the device).

    ``rounding`` is the allowance delta for the operator's rounding in each bound,
    ``basis_vectors`` the most vectors of length n the basis held at once, ``certificate``
    the final certificate (in the output's order, products signed like the vectors), for
    re-bounding.
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
    certificate: Certificate | None = None


def order(values: Tensor, which: Which) -> Tensor:
    """Indices of values from most to least wanted."""
    if which == "LA":
        return torch.argsort(values, descending=True)
    if which == "SA":
        return torch.argsort(values)
    return torch.argsort(values.abs(), descending=True)


def fix_signs(vecs: Tensor) -> Tensor:
    """Make each row's largest-magnitude entry positive, so results are reproducible."""
    return vecs * max_abs_sign(vecs).to(vecs.dtype)[:, None]


@dataclass(frozen=True)
class _Settings:
    k: int
    m: int
    which: Which
    tol: float
    rounding: float | None
    work: Storage
    basis: Storage

    @property
    def exact_basis(self) -> bool:
        """The basis stores at least the operator's precision. Below it, the basis adds its
        own rounding to V T y, which would be taken for the operator's: the rounding is then
        measured with one more product instead."""
        return torch.finfo(self.basis.dtype).eps <= torch.finfo(self.work.dtype).eps


def _iterate(state: KrylovState, op: Operator, s: _Settings, stop_at: int, delta) -> RitzPairs:
    """Lanczos steps until the recurrence bounds meet tol, stagnate below the rounding
    allowance, the space is exhausted, or ``op.count`` reaches ``stop_at``."""
    eps_b = max(torch.finfo(s.work.dtype).eps, torch.finfo(s.basis.dtype).eps)
    while True:
        if not state.exhausted:
            w = op.matvec(state.frontier())
            # absorb works in place: copy unless the product is a new tensor of the operator's
            state.absorb(w.to(state.basis.device, copy=not op.fresh))
        if state.processed >= s.k:
            pairs = state.ritz()
            scale = float(pairs.values.abs().max())
            # The allowance the check will measure, before it is known: about
            # 4 sqrt(p) eps ||A|| (the distance of V T y from fresh products).
            guess = ROUNDING_FACTOR * math.sqrt(state.processed) * eps_b * scale
            known = delta or (s.rounding * scale if s.rounding is not None else 0.0)
            d = max(known, guess)
            want = order(pairs.values, s.which)[: s.k]
            limit_fn = partial(tolerance_limit, tol=s.tol, scale=scale)
            bounds = error_bounds(pairs.values, pairs.residuals, d, limit_fn)
            limit = tolerance_limit(pairs.values[want], s.tol, scale)
            met = bool((bounds[want] <= STOP_MARGIN * limit).all())
            met = met or bool((pairs.residuals[want] <= 0.5 * max(known, 2 * eps_b * scale)).all())
            if (met and (not state.broke or state.processed == s.m)) or state.exhausted:
                return pairs
            if op.count >= stop_at:
                return pairs
        if state.processed == s.m:
            ranked = order(pairs.values, s.which)
            state.restart(pairs, ranked[: min(s.m - 1, s.k + (s.m - s.k) // 2)])


def _check(
    op: Operator,
    state: KrylovState,
    pairs: RitzPairs,
    s: _Settings,
    delta: float | None,
    stop_at: int,
) -> tuple[Tensor, Certificate]:
    """One product per returned pair and its certificate: returns the unit vectors u (on
    the operator's device) and the certificate.

    With no allowance yet (``delta`` and ``rounding`` None) the rounding is measured: from
    the distance of the fresh products to the ones assembled from the Lanczos products
    (V T y), or, when the basis is stored below the operator's precision, or when that
    distance (which also carries the basis arithmetic) keeps a pair from converging, from
    one more product fl(A(3 u_1)) / 3 against fl(A u_1).
    """
    ranked = order(pairs.values, s.which)
    want, rest = ranked[: s.k], ranked[s.k :]
    y = pairs.coefficients[:, want]
    u, norms = state.ritz_vectors(y)
    measure = delta is None and s.rounding is None
    predicted = None
    if measure and s.exact_basis:
        predicted = state.assembled_products(y, norms).to(s.work.device)
    u = u.to(s.work.device)
    neighbours = Neighbours(pairs.values[rest], pairs.residuals[rest])
    scaled = measure and predicted is None
    w = op.matmat(torch.cat([u, ROUNDING_SCALE * u[:1]]) if scaled else u)
    if scaled:
        measured, w = spread(w[:1], w[s.k :], ROUNDING_SCALE), w[: s.k]
    elif measure:
        measured = spread(w, predicted)
    del predicted
    values, residuals = rayleigh(u, w)
    eps = torch.finfo(op.dtype).eps
    if measure:
        delta = allowance(eps, values, neighbours, measured, op.n, w)
    elif delta is None:
        delta = known_allowance(s.rounding, values, neighbours, op.n, w)
    cert = bound(values, residuals, w, delta, neighbours, s.tol)
    if measure and not scaled and not bool(cert.converged.all()) and op.count < stop_at:
        # V T y also carries the float32 arithmetic of the basis (about sqrt(p) eps ||A||
        # after restarts): measure the operator's own rounding with one more product.
        one = op.matvec(ROUNDING_SCALE * u[0])
        measured = spread(w[:1], one[None], ROUNDING_SCALE)
        delta = allowance(eps, values, neighbours, measured, op.n, w)
        cert = bound(values, residuals, w, delta, neighbours, s.tol)
    return u, cert


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
    * delta = 4 max_i ||w_i - V T y_i||: the same product assembled from the Lanczos
      products (A V = V T) rounds differently from the fresh one, so their distance
      measures the rounding at no extra product. V T y also carries the float32 basis
      arithmetic (about sqrt(p) eps ||A|| after restarts): when that keeps a pair from
      converging, and for a basis stored below the operator's precision, one more product
      measures it instead, delta = 4 ||fl(A(3u_1))/3 - w_1||. At least 2 eps ||A|| (||A||
      ~ max |Ritz value|), or ``rounding * ||A||`` when given; plus sqrt(n) eps64 ||w|| for
      the float64 sums (Higham & Mary, 2019);
    * bound = min(r + delta, (r + delta)^2 / (gap - delta) + delta): Weyl, and Kato-Temple
      once the nearest other Ritz value theta_l has met tol itself and r_l + delta <=
      |lambda - theta_l| / 10, with gap = |lambda - theta_l| - r_l - delta.

    ||fl(A u) - A u|| <= delta makes both bounds hold for the exact operator. delta is an
    estimate, not a proof: rounding that does not change with u (a cached forward pass, the
    float32 operator's systematic distance from the exact one) is not seen;
    :func:`~flatlens.measures.hessian_eigenvalues` covers it by re-evaluating the pairs in
    float64. A pair that misses ``tol`` is refined (Lanczos restarted from the returned
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
    n = global_size(v0.numel())  # on a sharded objective the vectors hold a part of n
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
        op = Operator(matvec, v0.numel(), v0.dtype, v0.device, matmat=mm)
    work = Storage(op.device, op.dtype)
    basis = Storage(
        torch.device(basis_device) if basis_device else op.device, basis_dtype or op.dtype
    )
    s = _Settings(k, m, which, tol, rounding, work, basis)
    least = 2 * k + (rounding is None and not s.exact_basis)
    if budget < least:
        raise ValueError(
            f"max_matvecs (max_hvps) must be at least {least}: k Lanczos steps and k residual "
            "checks" + ("" if least == 2 * k else " and one rounding check")
        )
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    bar = tqdm(desc="lanczos", unit="matvec", disable=not progress, leave=False)
    op.on_product, start_count = bar.update, op.count
    stop_at = start_count + budget
    state = KrylovState(op.n, min(n, m + 1), work, basis, gen)
    state.start(v0.to(basis.device, work.dtype))
    delta: float | None = None
    peak, restarts, rounds, worst = 0, 0, 0, math.inf
    best: tuple[Certificate, Tensor] | None = None
    try:
        while True:
            reserve = k + (delta is None and rounding is None and not s.exact_basis)
            pairs = _iterate(state, op, s, stop_at - reserve, delta)
            peak, restarts = max(peak, state.basis.allocated), restarts + state.restarts
            u, cert = _check(op, state, pairs, s, delta, stop_at)
            state = None  # free the basis before a refinement allocates another
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
            state = KrylovState(op.n, min(n, m + k), work, basis, gen)
            if not state.load(u, cert.products, delta / ROUNDING_FACTOR):
                break
    finally:
        op.on_product = None
        bar.close()
    assert best is not None
    cert, u = best
    idx = order(cert.values, which)
    signs = max_abs_sign(u[idx]).to(u.dtype)
    cert = cert.reordered(idx, signs)
    return EigshOutput(
        eigenvalues=cert.values,
        eigenvectors=u[idx] * signs[:, None],
        residuals=cert.residuals,
        error_bounds=cert.bounds,
        converged=cert.converged,
        num_matvecs=op.count - start_count,
        num_restarts=restarts,
        rounding=cert.delta,
        basis_vectors=peak,
        num_refinements=rounds,
        certificate=cert,
    )
