"""The certificate of returned eigenpairs: true residuals, a rounding allowance, bounds.

For unit vectors u with fresh products w = fl(A u) (float64 sums): lambda = u.w / u.u,
r = ||w - lambda u|| and bound = min(r + delta, (r + delta)^2 / (gap - delta) + delta), with
delta the allowance for the operator's rounding (see :func:`certify`). Used by
:func:`~flatlens.measures._lanczos.lanczos_eigsh`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from flatlens.measures._basis import combo_norm64, dot64, norm64

F64 = torch.float64

__all__ = [
    "ROUNDING_FACTOR",
    "ROUNDING_SCALE",
    "Certificate",
    "blocked_by_rounding",
    "certify",
    "error_bounds",
    "rescaled",
    "tolerance_limit",
]

ROUNDING_FACTOR = 4.0
"""Safety factor on a measured spread between two roundings of one product."""
ROUNDING_SCALE = 3.0
"""The scale s of a rounding check fl(A(s u))/s vs fl(A u) (SLQ): not a power of two."""


def error_bounds(
    values: Tensor,
    res: Tensor,
    delta: float,
    limit: Callable[[Tensor], Tensor],
    other: Tensor | None = None,
    other_rad: Tensor | None = None,
) -> Tensor:
    """min(r + d, (r + d)^2 / (gap - d) + d) per value (Weyl / Kato-Temple with rounding d).

    Weyl (r + d) needs nothing else. Kato-Temple needs the distance to the nearest other
    eigenvalue; it is estimated from the nearest other value (``values`` or ``other``)
    minus its radius (r + d, or ``other_rad``), and used only when that neighbour has met
    the tolerance itself (radius at most ``limit`` of it and a tenth of the distance).
    Lanczos finds extreme eigenvalues from the outside in, so by then the ones in between
    have (with high probability) appeared; an unconverged neighbour can be a mixture far
    from any eigenvalue near the value and would overstate the gap.
    """
    rad = res + delta
    pts = values if other is None else torch.cat([values, other])
    prad = rad if other_rad is None else torch.cat([rad, other_rad])
    bound = rad.clone()
    j = values.numel()
    if pts.numel() > 1:
        dist = (values[:, None] - pts[None, :]).abs()
        dist[torch.arange(j), torch.arange(j)] = math.inf
        nearest = dist.argmin(dim=1)
        near = dist.gather(1, nearest[:, None]).squeeze(1)
        near_rad = prad[nearest]
        gap = near - near_rad - delta
        ok = (gap > 0) & (near_rad <= 0.1 * near) & (near_rad <= limit(pts[nearest]))
        bound[ok] = torch.minimum(rad[ok], rad[ok] ** 2 / gap[ok] + delta)
    return bound


def tolerance_limit(values: Tensor, tol: float, scale: float) -> Tensor:
    """The largest error bound that meets ``tol``: tol * max(|value|, 1e-6 ||A||)."""
    return tol * torch.clamp(values.abs(), min=1e-6 * scale)


@dataclass
class Certificate:
    values: Tensor
    residuals: Tensor
    bounds: Tensor
    converged: Tensor
    limit: Tensor
    delta: float
    products: Tensor

    @property
    def score(self) -> float:
        """The worst bound relative to its limit (below 1: all converged)."""
        return float((self.bounds / self.limit.clamp_min(1e-300)).max())


def blocked_by_rounding(cert: Certificate, failing: Tensor, tol: float) -> str | None:
    """Why refining cannot reach tol: the rounding allowance alone exceeds it."""
    scale = float(cert.values.abs().max()) or 1.0
    limit = cert.limit[failing]
    if bool((limit <= 1.5 * cert.delta).any()):
        return (
            f"the operator's rounding (allowance {cert.delta:.2e}, {cert.delta / scale:.1e} "
            f"relative to ||A||) keeps the certificate above tol={tol}; use a wider dtype or "
            "a looser tol"
        )
    return None


def certify(op, u, other, other_res, *, tol, delta, rounding, predicted) -> Certificate:
    """True residuals, float64 Rayleigh quotients and bounds of the unit rows u.

    With no ``delta`` or ``rounding`` yet, the rounding is measured: from the distance of
    the fresh products to ``predicted`` (the products of u assembled from the Lanczos
    products, V H y), or, without it, from one more product fl(A(s u_1)) / s."""
    k = u.shape[0]
    measure = delta is None and rounding is None
    scaled = measure and predicted is None  # then one more product, fl(A(s u_1)) / s
    w = op.matmat(torch.cat([u, ROUNDING_SCALE * u[:1]]) if scaled else u)
    rho = torch.tensor([dot64(u[i], w[i]) / dot64(u[i], u[i]) for i in range(k)], dtype=F64)
    res = [combo_norm64(w[i], u[i], float(rho[i])) / norm64(u[i]) for i in range(k)]
    res = torch.tensor(res, dtype=F64)
    if scaled:
        spread = combo_norm64(w[k], w[0], ROUNDING_SCALE) / ROUNDING_SCALE
        w = w[:k]
    elif measure:
        spread = max(combo_norm64(w[i], predicted[i], 1.0) for i in range(k))
    if measure:
        delta = _allowance(op, rho, w, other, spread)
    elif delta is None:
        delta = rounding * _scale(rho, other) + _sums(op, w)
    return _bounded(rho, res, w, delta, other, other_res, tol)


def _scale(values: Tensor, other: Tensor) -> float:
    """||A|| as the largest |Ritz value| seen."""
    return max(float(values.abs().max()), float(other.abs().max()) if other.numel() else 0.0)


def _sums(op, w: Tensor) -> float:
    """The float64 sums' own error, sqrt(n) eps64 ||w||."""
    return math.sqrt(op.n) * torch.finfo(F64).eps * max(norm64(row) for row in w)


def _allowance(op, values: Tensor, products: Tensor, other: Tensor, spread: float) -> float:
    """delta = max(4 spread, 2 eps ||A||) plus the float64 sums' error."""
    eps = torch.finfo(op.dtype).eps
    scale = _scale(values, other)
    return max(ROUNDING_FACTOR * spread, 2 * eps * scale) + _sums(op, products)


def _bounded(rho, res, w, delta: float, other, other_res, tol: float) -> Certificate:
    """The certificate of values ``rho`` with residuals ``res`` (products ``w``) for the
    rounding allowance ``delta``."""
    scale = _scale(rho, other)
    bounds = error_bounds(
        rho, res, delta, partial(tolerance_limit, tol=tol, scale=scale), other, other_res + delta
    )
    limit = tolerance_limit(rho, tol, scale)
    return Certificate(rho, res, bounds, bounds <= limit, limit, delta, w)


def rescaled(op, u: Tensor, cert: Certificate, other, other_res, tol: float) -> Certificate:
    """``cert`` with the rounding measured by one more product, fl(A(s u_1)) / s against
    fl(A u_1): V H y also carries the rounding of the basis arithmetic (about sqrt(p) eps
    ||A|| after restarts), which can hide a pair that the operator's own rounding lets pass.
    """
    rho, res, w = cert.values, cert.residuals, cert.products
    spread = combo_norm64(op.matvec(ROUNDING_SCALE * u[0]), w[0], ROUNDING_SCALE) / ROUNDING_SCALE
    delta = _allowance(op, rho, w, other, spread)
    return _bounded(rho, res, w, delta, other, other_res, tol)
