"""The certificate of returned eigenpairs: true residuals, a rounding allowance, bounds.

For unit vectors u with products w = fl(A u) (float64 sums): lambda = u.w / u.u,
r = ||w - lambda u|| (:func:`rayleigh`) and

    bound = min(r + delta, (r + delta)^2 / (gap - delta) + delta)      (:func:`error_bounds`)

with delta the allowance for the distance between the products used and exact ones
(:func:`allowance`), and the gap estimated from the other Ritz values (:class:`Neighbours`).
Everything here works on numbers and vectors already computed: the solver
(:func:`~flatlens.measures._lanczos.lanczos_eigsh`) applies the operator and passes the
products in, and :mod:`~flatlens.measures._spectrum` re-bounds with float64 products.

What a bound covers is its ``kind``: ``"certified"`` when delta covers the distance between
the products and the exact operator's (products in float64, or re-evaluated in float64),
``"estimate"`` when part of that distance is only estimated (float32 products that share a
systematic rounding, finite-difference products whose truncation is estimated).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import Tensor

from flatlens.core._sharding import global_size
from flatlens.measures._basis import combo_norm64, dot64, norm64

F64 = torch.float64

__all__ = [
    "ROUNDING_FACTOR",
    "ROUNDING_SCALE",
    "Certificate",
    "Neighbours",
    "allowance",
    "blocked_by_rounding",
    "bound",
    "error_bounds",
    "rayleigh",
    "spread",
    "sums_error",
    "tolerance_limit",
]

ROUNDING_FACTOR = 4.0
"""Safety factor on a measured spread between two roundings of one product."""
ROUNDING_SCALE = 3.0
"""The scale s of a rounding check fl(A(s u))/s vs fl(A u): not a power of two."""
NEIGHBOUR_FRACTION = 0.1
"""A neighbouring Ritz value sets the Kato-Temple gap once its radius is at most this
fraction of its distance (and within the tolerance)."""


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
    from any eigenvalue near the value and would overstate the gap. The stop rule of
    Lanczos and the final certificate use this same bound, so a solve stops as soon as the
    bound it will report meets the tolerance.
    """
    rad = res + delta
    pts = values if other is None else torch.cat([values, other])
    prad = rad if other_rad is None else torch.cat([rad, other_rad])
    out = rad.clone()
    j = values.numel()
    if pts.numel() > 1:
        dist = (values[:, None] - pts[None, :]).abs()
        dist[torch.arange(j), torch.arange(j)] = math.inf
        nearest = dist.argmin(dim=1)
        near = dist.gather(1, nearest[:, None]).squeeze(1)
        near_rad = prad[nearest]
        gap = near - near_rad - delta
        ok = (gap > 0) & (near_rad <= NEIGHBOUR_FRACTION * near)
        ok &= near_rad <= limit(pts[nearest])
        out[ok] = torch.minimum(rad[ok], rad[ok] ** 2 / gap[ok] + delta)
    return out


def tolerance_limit(values: Tensor, tol: float, scale: float) -> Tensor:
    """The largest error bound that meets ``tol``: tol * max(|value|, 1e-6 ||A||)."""
    return tol * torch.clamp(values.abs(), min=1e-6 * scale)


@dataclass(frozen=True)
class Neighbours:
    """The Ritz values not returned and their radii (residual plus allowance): where the
    rest of the spectrum is, for the gap of Kato-Temple."""

    values: Tensor
    radii: Tensor

    def widened(self, extra: float) -> Neighbours:
        """The same values with every radius grown by ``extra``."""
        return Neighbours(self.values, self.radii + extra)

    @property
    def scale(self) -> float:
        return float(self.values.abs().max()) if self.values.numel() else 0.0


@dataclass
class Certificate:
    """Bounds of returned pairs (float64 CPU tensors unless said otherwise).

    Attributes:
        values: Rayleigh quotients lambda_i.
        residuals: True residual norms r_i = ||w_i - lambda_i u_i||.
        bounds: Error bound of each value.
        converged: bound <= limit.
        limit: tol * max(|lambda_i|, 1e-6 ||A||).
        delta: The allowance for the products' distance from exact ones.
        products: The products w_i (rows, on the operator's device).
        neighbours: The other Ritz values used for the gaps.
        kind: ``"certified"`` or ``"estimate"`` (see the module docstring).
    """

    values: Tensor
    residuals: Tensor
    bounds: Tensor
    converged: Tensor
    limit: Tensor
    delta: float
    products: Tensor
    neighbours: Neighbours
    kind: str = "certified"

    @property
    def score(self) -> float:
        """The worst bound relative to its limit (below 1: all converged)."""
        return float((self.bounds / self.limit.clamp_min(1e-300)).max())

    def reordered(self, idx: Tensor, signs: Tensor) -> Certificate:
        """The pairs in the order ``idx``, each product multiplied by ``signs`` (the signs
        the returned vectors were given)."""
        return replace(
            self,
            values=self.values[idx],
            residuals=self.residuals[idx],
            bounds=self.bounds[idx],
            converged=self.converged[idx],
            limit=self.limit[idx],
            products=self.products[idx] * signs.to(self.products.dtype)[:, None],
        )


def rayleigh(u: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Float64 Rayleigh quotients u.w / u.u and residual norms ||w - lambda u|| / ||u||."""
    k = u.shape[0]
    values = torch.tensor([dot64(u[i], w[i]) / dot64(u[i], u[i]) for i in range(k)], dtype=F64)
    res = [combo_norm64(w[i], u[i], float(values[i])) / norm64(u[i]) for i in range(k)]
    return values, torch.tensor(res, dtype=F64)


def spread(w: Tensor, other: Tensor, scale: float = 1.0) -> float:
    """max_i ||w_i - other_i / scale||: two roundings of the same products (``other`` the
    products of ``scale`` times the vectors, or assembled from the Lanczos products)."""
    return max(combo_norm64(other[i], w[i], scale) / scale for i in range(w.shape[0]))


def sums_error(n: int, products: Tensor) -> float:
    """The float64 sums' own error, sqrt(n) eps64 ||w|| (n the global dimension)."""
    return math.sqrt(global_size(n)) * torch.finfo(F64).eps * max(norm64(row) for row in products)


def _scale(values: Tensor, neighbours: Neighbours) -> float:
    """||A|| as the largest |Ritz value| seen."""
    return max(float(values.abs().max()), neighbours.scale)


def allowance(
    eps: float, values: Tensor, neighbours: Neighbours, measured: float, n: int, products: Tensor
) -> float:
    """delta = max(4 * measured spread, 2 eps ||A||) plus the float64 sums' error."""
    floor = 2 * eps * _scale(values, neighbours)
    return max(ROUNDING_FACTOR * measured, floor) + sums_error(n, products)


def known_allowance(
    rounding: float, values: Tensor, neighbours: Neighbours, n: int, products: Tensor
) -> float:
    """delta for a known relative rounding u of the operator: u ||A|| plus the sums' error."""
    return rounding * _scale(values, neighbours) + sums_error(n, products)


def bound(
    values: Tensor,
    residuals: Tensor,
    products: Tensor,
    delta: float,
    neighbours: Neighbours,
    tol: float,
    kind: str = "certified",
) -> Certificate:
    """The certificate of ``values`` with ``residuals`` for the allowance ``delta``; each
    neighbour's radius is widened by delta too."""
    scale = _scale(values, neighbours)
    radii = neighbours.radii + delta
    limit_fn = partial(tolerance_limit, tol=tol, scale=scale)
    bounds = error_bounds(values, residuals, delta, limit_fn, neighbours.values, radii)
    limit = tolerance_limit(values, tol, scale)
    return Certificate(
        values, residuals, bounds, bounds <= limit, limit, delta, products, neighbours, kind
    )


def rebound(cert: Certificate, delta: float, tol: float, kind: str | None = None) -> Certificate:
    """``cert`` with another allowance (its values and residuals kept)."""
    out = bound(cert.values, cert.residuals, cert.products, delta, cert.neighbours, tol, cert.kind)
    return out if kind is None else replace(out, kind=kind)


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
