"""Symmetric eigensolvers over a matrix-free operator ``v -> A v`` (flat torch vectors).

* :func:`lanczos_eigsh`: thick-restart Lanczos (Wu & Simon, 2000) with full, twice-applied
  (DGKS) reorthogonalization. The Krylov basis lives on the operator's device and dtype; the
  small projected matrix T = V^T A V is kept in float64 on the CPU and solved with the
  symmetric eigensolver. Each Ritz pair (theta, u = V y) has residual norm
  ||A u - theta u|| = beta * |y_last|, and its eigenvalue error is bounded by
  min(||r||, ||r||^2 / gap) (Kato-Temple), with gap the distance to the rest of the
  spectrum, estimated from the other Ritz values minus their residuals.
* :func:`lanczos_tridiagonal`: plain Lanczos steps returning the tridiagonal (alpha, beta),
  for stochastic Lanczos quadrature.
* :func:`power_iteration`: power iteration with deflation, for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

Which = Literal["LA", "SA", "LM"]
GUARD = 1
"""Ritz pairs beyond the k wanted that must also converge before Lanczos stops.

Waiting for one more pair makes the gap estimate behind the quadratic bound trustworthy
and lowers the chance of stopping before an eigenvalue of a tight cluster has appeared in
the Krylov space (which no single-vector Krylov method can rule out)."""
MatVec = Callable[[Tensor], Tensor]

__all__ = ["EigshOutput", "lanczos_eigsh", "lanczos_tridiagonal", "power_iteration"]


@dataclass
class EigshOutput:
    """Raw output of the eigensolvers (float64 CPU values, vectors on the device)."""

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    error_bounds: Tensor
    converged: Tensor
    num_matvecs: int
    num_restarts: int


def _order(theta: Tensor, which: Which) -> Tensor:
    """Indices of Ritz values from most to least wanted."""
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "SA":
        return torch.argsort(theta)
    return torch.argsort(theta.abs(), descending=True)


def _orthogonalize(w: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """Remove the span of the orthonormal rows of ``basis`` from ``w`` twice (DGKS)."""
    h = basis @ w
    w = w - basis.T @ h
    h2 = basis @ w
    return w - basis.T @ h2, h + h2


def _error_bounds(theta: Tensor, res: Tensor, floor: float) -> Tensor:
    """Kato-Temple style bound min(r, r^2/gap) for every Ritz value, at least ``floor``.

    The gap to the rest of the spectrum is estimated from the nearest other Ritz value
    theta_l, minus its residual. That estimate is trusted only once theta_l is itself well
    resolved (r_l at most a tenth of the distance); an unconverged neighbour can sit far from
    the eigenvalue it approximates and would overstate the gap, so then the bound is ||r||.
    """
    j = theta.numel()
    bound = res.clone()
    if j > 1:
        dist = (theta[:, None] - theta[None, :]).abs()
        dist.fill_diagonal_(math.inf)
        nearest = dist.argmin(dim=1)
        near_dist = dist.gather(1, nearest[:, None]).squeeze(1)
        near_res = res[nearest]
        gap = near_dist - near_res
        ok = (gap > 0) & (near_res <= 0.1 * near_dist)
        bound[ok] = torch.minimum(res[ok], res[ok] ** 2 / gap[ok])
    return bound.clamp_min(floor)


def _unit(v: Tensor) -> Tensor:
    return v / torch.linalg.vector_norm(v)


def lanczos_eigsh(
    matvec: MatVec,
    v0: Tensor,
    k: int,
    *,
    which: Which = "LA",
    tol: float = 1e-4,
    max_matvecs: int | None = None,
    basis_size: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> EigshOutput:
    """k extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

    Args:
        matvec: ``v -> A v`` for flat vectors like ``v0``.
        v0: Start vector (any nonzero vector; normalized here).
        k: Number of eigenpairs wanted.
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest
            magnitude.
        tol: Stop when every wanted eigenvalue's error bound is at most
            ``tol * max(|theta|, 1e-6 * max_i |theta_i|)``.
        max_matvecs: Budget of operator applications (default ``max(500, 20 * basis)``).
        basis_size: Lanczos basis size before a restart (default ``max(2k + 10, 24)``).
        generator: Random source for a fresh direction after an exact breakdown.
        progress: Show a tqdm bar of operator applications.

    Returns:
        Wanted eigenvalues in ``which`` order, unit eigenvectors as rows, residual norms,
        error bounds and convergence flags.
    """
    n = v0.numel()
    if not 1 <= k < n:
        raise ValueError(f"k must be between 1 and num_params - 1 = {n - 1}, got {k}")
    m = min(n, basis_size or max(2 * k + 10, 24))
    if m <= k:
        raise ValueError(f"basis_size must exceed k={k}, got {m}")
    budget = max_matvecs if max_matvecs is not None else max(500, 20 * m)
    dev, dt = v0.device, v0.dtype
    # Rounding in the operator limits what any eigenvalue can be certified to.
    eps = 10 * torch.finfo(dt).eps
    V = torch.zeros(m + 1, n, device=dev, dtype=dt)
    V[0] = _unit(v0)
    T = torch.zeros(m, m, dtype=torch.float64)
    j, count, restarts = 0, 0, 0
    broke = False  # an exact breakdown happened since the last restart
    beta = 0.0
    theta = res = bounds = Y = None
    bar = tqdm(total=budget, desc="lanczos", disable=not progress, leave=False)
    try:
        while True:
            w = matvec(V[j])
            count += 1
            bar.update(1)
            w, h = _orthogonalize(w, V[: j + 1])
            hc = h.to("cpu", torch.float64)
            T[: j + 1, j] = hc
            T[j, : j + 1] = hc
            beta = float(torch.linalg.vector_norm(w))
            scale = float(T[: j + 1, : j + 1].abs().max()) or 1.0
            if j + 1 >= n:
                beta = 0.0
            elif beta <= 1e-12 * scale * math.sqrt(n):
                # Invariant subspace found: continue from a fresh orthogonal direction.
                beta = 0.0
                broke = True
                fresh = torch.randn(n, generator=generator, dtype=torch.float64).to(dev, dt)
                V[j + 1] = _unit(_orthogonalize(fresh, V[: j + 1])[0])
            else:
                V[j + 1] = w / beta
            j += 1

            if j >= k:
                theta, Y = torch.linalg.eigh(T[:j, :j])
                res = beta * Y[j - 1].abs()
                bounds = _error_bounds(theta, res, eps * float(theta.abs().max()))
                want = _order(theta, which)[: min(k + GUARD, j)]
                floor = 1e-6 * float(theta.abs().max())
                limit = tol * torch.clamp(theta[want].abs(), min=floor)
                done = bool((bounds[want] <= limit).all()) and (not broke or j == m)
                if done or count >= budget or (j == n):
                    break
            if j == m:
                # Thick restart: keep the most wanted Ritz vectors and the residual direction.
                keep = _order(theta, which)[: min(m - 1, k + (m - k) // 2)]
                p = keep.numel()
                U = Y[:, keep].T.to(dev, dt) @ V[:m]
                V[:p] = U
                V[p] = V[m]
                T.zero_()
                T[:p, :p] = torch.diag(theta[keep])
                j = p
                restarts += 1
                broke = False
    finally:
        bar.close()

    want = _order(theta, which)[:k]
    floor = 1e-6 * float(theta.abs().max())
    limit = tol * torch.clamp(theta[want].abs(), min=floor)
    vecs = Y[:, want].T.to(dev, dt) @ V[:j]
    vecs = vecs / torch.linalg.vector_norm(vecs, dim=1, keepdim=True)
    return EigshOutput(
        eigenvalues=theta[want].clone(),
        eigenvectors=_fix_signs(vecs),
        residuals=res[want].clone(),
        error_bounds=bounds[want].clone(),
        converged=bounds[want] <= limit,
        num_matvecs=count,
        num_restarts=restarts,
    )


def _fix_signs(vecs: Tensor) -> Tensor:
    """Make each row's largest-magnitude entry positive, so results are reproducible."""
    idx = vecs.abs().argmax(dim=1)
    signs = torch.sign(vecs.gather(1, idx[:, None]))
    signs[signs == 0] = 1
    return vecs * signs


def lanczos_tridiagonal(matvec: MatVec, v0: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Run ``steps`` Lanczos steps with full reorthogonalization from ``v0``.

    Returns:
        ``(alpha, beta)`` in float64 on the CPU: the diagonal (length s) and off-diagonal
        (length s - 1) of the tridiagonal T = V^T A V, where s <= steps stops early at an
        invariant subspace.
    """
    n = v0.numel()
    steps = min(steps, n)
    V = torch.zeros(steps, n, device=v0.device, dtype=v0.dtype)
    V[0] = _unit(v0)
    alpha, beta = [], []
    for j in range(steps):
        w = matvec(V[j])
        w, h = _orthogonalize(w, V[: j + 1])
        alpha.append(float(h[j]))
        if j + 1 == steps:
            break
        b = float(torch.linalg.vector_norm(w))
        if b <= 1e-12 * max(abs(a) for a in alpha) * math.sqrt(n):
            break
        beta.append(b)
        V[j + 1] = w / b
    return torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64)


def power_iteration(
    matvec: MatVec,
    n: int,
    k: int,
    *,
    which: Which = "LA",
    tol: float = 1e-4,
    max_matvecs: int | None = None,
    make_start: Callable[[], Tensor],
    progress: bool = False,
) -> EigshOutput:
    """k eigenpairs by power iteration with deflation (Hotelling-style projection).

    Each eigenpair is found on the operator P (s A - c I) P, where P projects out the
    eigenvectors already found, s = -1 for ``"SA"`` and c is a shift. For ``"LA"``/``"SA"``
    the dominant eigenvalue is found first; when it has the wrong sign, the iteration is
    rerun with that eigenvalue as the shift so the wanted end of the spectrum dominates.
    Stops when the Rayleigh quotient changes by less than ``tol`` relative, or when the
    budget of ``max_matvecs`` products in all (default 1000 k) is spent; one product per
    pair checks its residual and is part of the budget.
    """
    if not 1 <= k < n:
        raise ValueError(f"k must be between 1 and num_params - 1 = {n - 1}, got {k}")
    budget = 1000 * k if max_matvecs is None else max_matvecs
    if budget < k:
        raise ValueError(f"max_matvecs must be >= k = {k} (one check per pair), got {budget}")
    sign = -1.0 if which == "SA" else 1.0
    found: list[Tensor] = []
    values: list[float] = []
    residuals: list[float] = []
    converged: list[bool] = []
    count = 0

    def deflate(v: Tensor) -> Tensor:
        for u in found:
            v = v - (u @ v) * u
        return v

    bar = tqdm(total=k, desc="power", disable=not progress, leave=False)
    for _ in range(k):
        shift = 0.0
        for _attempt in range(2):
            v = _unit(deflate(make_start()))
            lam, ok = 0.0, False
            while count + (k - len(found)) < budget:
                w = deflate(sign * matvec(v) - shift * v)
                count += 1
                new = float(v @ w)
                nw = torch.linalg.vector_norm(w)
                if nw == 0:
                    lam, ok = new, True
                    break
                v = _unit(deflate(w / nw))
                if abs(new - lam) <= tol * abs(new):
                    lam, ok = new, True
                    break
                lam = new
            if which == "LM" or lam >= 0 or shift != 0.0:
                break
            shift = lam
        av = matvec(v)
        count += 1
        value = float(v @ av)
        found.append(v)
        values.append(value)
        residuals.append(float(torch.linalg.vector_norm(av - value * v)))
        converged.append(ok)
        bar.update(1)
    bar.close()
    vecs = torch.stack(found)
    res = torch.tensor(residuals, dtype=torch.float64)
    return EigshOutput(
        eigenvalues=torch.tensor(values, dtype=torch.float64),
        eigenvectors=_fix_signs(vecs),
        residuals=res,
        error_bounds=res.clone(),
        converged=torch.tensor(converged),
        num_matvecs=count,
        num_restarts=0,
    )
