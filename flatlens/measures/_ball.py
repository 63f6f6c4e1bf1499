"""The feasible set of the worst-case measures: a norm ball around theta.

B = {delta : ||delta||_B <= rho} with one of four norms,

* ``l2``:               ||delta||_B = ||delta||_2
* ``linf``:             ||delta||_B = max_i |delta_i|
* adaptive ``l2``:      ||delta||_B = ||delta / s||_2   (an axis-aligned ellipsoid)
* adaptive ``linf``:    ||delta||_B = max_i |delta_i / s_i|   (a box)

with s = |theta| + eta elementwise (ASAM's adaptive geometry, Kwon et al. 2021). A
coordinate with s_i = 0 (or s_i < 1e-140) is fixed at delta_i = 0: a zero weight is not
perturbed. Pass ``eta > 0`` to perturb it anyway, at the price of exact scale invariance.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from flatlens.core._checks import check_nonnegative, check_rho
from flatlens.core._errors import NonFiniteLossError
from flatlens.core._sharding import any_rank, random_vector, reduce_sum
from flatlens.core._sums import vector_norm

__all__ = ["NORMS", "Ball", "Norm", "check_norm"]

Norm = Literal["l2", "linf"]
NORMS: tuple[str, ...] = ("l2", "linf")
_TINY_SCALE = 1e-140


def check_norm(norm: object) -> str:
    """Return ``norm`` unless it is not one of :data:`NORMS`."""
    if norm not in NORMS:
        raise ValueError(f"norm must be 'l2' or 'linf', not {norm!r}")
    return str(norm)


class Ball:
    """The set {delta : ||delta||_B <= rho} of one of the four norms (see the module doc).

    Args:
        rho: Radius, a finite number > 0.
        norm: ``"l2"`` or ``"linf"``.
        scale: ``None`` for the plain norms, else the elementwise scale s >= 0 (a flat
            tensor): ||delta||_B = ||delta / s||. Coordinates with s_i = 0 are fixed at 0.
    """

    def __init__(self, rho: float, norm: str = "l2", scale: Tensor | None = None) -> None:
        self.rho = check_rho(rho)
        self.norm = check_norm(norm)
        if scale is not None:
            if not isinstance(scale, Tensor) or scale.dim() != 1:
                raise ValueError("scale must be a flat 1-D tensor")
            if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
                raise ValueError("scale must be finite and >= 0 elementwise")
            # Below 1e-140 the secular equation of the ellipsoid projection would overflow
            # in float64; such coordinates may move by at most rho * 1e-140 anyway.
            scale = torch.where(scale.detach() < _TINY_SCALE, 0.0, scale.detach())
        self.scale = scale

    @classmethod
    def around(
        cls, theta: Tensor, rho: float, norm: str = "l2", adaptive: bool = False, eta: float = 0.0
    ) -> Ball:
        """The ball at ``theta``: plain, or adaptive with s = |theta| + eta.

        Raises:
            NonFiniteLossError: ``adaptive`` and theta has a NaN or infinite entry.
        """
        eta = check_nonnegative("adaptive_eta", eta)
        scale = None
        if adaptive:
            scale = theta.detach().abs() + eta
            if not bool(torch.isfinite(scale).all()):
                raise NonFiniteLossError(
                    "the parameters are not finite, so neither is the adaptive scale "
                    "|theta| + eta; check the weights for NaN/inf"
                )
        return cls(rho, norm, scale)

    # -- norms -------------------------------------------------------------------------
    def norm_of(self, delta: Tensor) -> float:
        """||delta||_B (infinite if a fixed coordinate is nonzero)."""
        u = delta
        if self.scale is not None:
            fixed = self.scale == 0
            if any_rank(bool((delta[fixed] != 0).any())):
                return math.inf
            u = torch.where(fixed, torch.zeros_like(delta), delta / self.scale.where(~fixed, 1))
        p = 2 if self.norm == "l2" else math.inf
        return float(vector_norm(u, ord=p))

    def dual_norm(self, g: Tensor) -> float:
        """The dual norm ||g||_* = max_{||d||_B <= 1} <g, d>: ||s g||_2 or ||s g||_1."""
        v = g if self.scale is None else g * self.scale
        p = 2 if self.norm == "l2" else 1
        return float(vector_norm(v, ord=p))

    def steepest(self, g: Tensor) -> Tensor:
        """The steepest-ascent direction d = argmax_{||d||_B <= 1} <g, d>.

        ``l2``: d = s^2 g / ||s g||_2; ``linf``: d = s sign(g) (s = 1 for the plain norms).
        Zero where g is zero. It is also the gradient of the dual norm ||g||_*.
        """
        s = self.scale
        if self.norm == "linf":
            return torch.sign(g) if s is None else s * torch.sign(g)
        sg = g if s is None else s * g
        n = float(vector_norm(sg))
        if n == 0:
            return torch.zeros_like(g)
        return sg / n if s is None else s * sg / n

    # -- points ------------------------------------------------------------------------
    def to_sphere(self, u: Tensor) -> Tensor:
        """A point with ||delta||_B = rho along the scaled direction ``u``.

        ``l2``: delta = rho s u / ||u_free||_2 (on the ellipsoid or sphere); ``linf``: the
        vertex delta = rho s sign(u). ``u`` is a direction in the scaled coordinates
        u = delta / s, so ``to_sphere(s * g)`` is the steepest-ascent point rho * d(g).
        """
        s = self.scale
        if self.norm == "linf":
            return self.rho * (torch.sign(u) if s is None else s * torch.sign(u))
        free = u if s is None else torch.where(s > 0, u, torch.zeros_like(u))
        n = float(vector_norm(free))
        if n == 0:
            return torch.zeros_like(u)
        return self.rho * (free / n if s is None else s * free / n)

    def random_sphere(
        self, n: int, generator: torch.Generator, *, device=None, dtype=None
    ) -> Tensor:
        """A random point on the sphere: uniform for ``l2``, a random vertex for ``linf``."""
        u = random_vector(n, generator, device=device, dtype=dtype)
        return self.to_sphere(u)

    def project(self, z: Tensor) -> Tensor:
        """The Euclidean projection argmin_{||x||_B <= rho} ||x - z||_2.

        ``l2``: z min(1, rho / ||z||); ``linf``: clip(z, -rho s, rho s); adaptive ``l2``:
        x_i = s_i^2 z_i / (s_i^2 + mu) with mu >= 0 the root of ||x(mu) / s||_2 = rho, found
        by safeguarded Newton steps on the secular equation 1/||x(mu)/s|| - 1/rho = 0.
        """
        s = self.scale
        if self.norm == "linf":
            bound = self.rho if s is None else self.rho * s
            return torch.clamp(z, -bound, bound)
        if s is None:
            n = float(vector_norm(z))
            return z if n <= self.rho else z * (self.rho / n)
        return _project_ellipsoid(z, s, self.rho)

    def project_scaled(self, z: Tensor) -> Tensor:
        """The projection in the norm's own inner product <a, b>_s = sum_i a_i b_i / s_i^2.

        It equals :meth:`project` for the plain balls and the boxes; for the adaptive l2
        ellipsoid it is the radial map z min(1, rho / ||z / s||) (fixed coordinates set to
        0), i.e. the Euclidean projection onto the sphere in the coordinates u = delta / s.
        The ascent uses it because the steepest-ascent step s^2 g / ||s g|| is the gradient
        step in that same inner product: only then are the fixed points of
        x -> P(x + eta d(g)) exactly the KKT points of the constrained maximum (with the
        Euclidean projection the maximizer rho d(c) of a linear f = <c, delta> is not a
        fixed point), and only then does the ascent commute with a rescaling of the
        network, like the ball itself.
        """
        s = self.scale
        if s is None or self.norm == "linf":
            return self.project(z)
        free = s > 0
        z = torch.where(free, z, torch.zeros_like(z))
        n = self.norm_of(z)
        return z if n <= self.rho else z * (self.rho / n)

    def __repr__(self) -> str:
        kind = "adaptive " if self.scale is not None else ""
        return f"Ball(rho={self.rho:g}, norm={kind}{self.norm})"


def _project_ellipsoid(z: Tensor, s: Tensor, rho: float, max_iter: int = 100) -> Tensor:
    """Euclidean projection of ``z`` onto {x : ||x / s||_2 <= rho}, x_i = 0 where s_i = 0.

    With a = s^2 and c = s z, x(mu) = a z / (a + mu) and u(mu) = x / s = c / (a + mu), so
    the boundary condition is the trust-region secular equation
    psi(mu) = 1/||u(mu)|| - 1/rho = 0, which is increasing and concave in mu: Newton from
    mu = 0 climbs monotonically to the root. A bracket [lo, hi] with hi = ||c|| / rho
    (where ||u|| <= rho) guards against rounding.
    """
    s64 = s.to(torch.float64)
    a = s64 * s64
    free = s64 > 0
    zf = torch.where(free, z.to(torch.float64), torch.zeros_like(s64))
    c = s64 * zf
    safe = torch.where(free, s64, torch.ones_like(s64))
    if float(vector_norm(zf / safe)) <= rho:
        return zf.to(z.dtype)
    lo, hi = 0.0, float(vector_norm(c)) / rho
    mu = 0.0
    for _ in range(max_iter):
        d = a + mu
        u = torch.where(free, c / torch.where(free, d, torch.ones_like(d)), torch.zeros_like(c))
        q = float(reduce_sum((u @ u).reshape(1))[0])
        nrm = math.sqrt(q)
        psi = 1.0 / nrm - 1.0 / rho
        if abs(psi) * rho <= 1e-14:
            break
        if psi < 0:
            lo = mu
        else:
            hi = mu
        dq = float(
            reduce_sum((u * u / torch.where(free, d, torch.ones_like(d))).sum().reshape(1))[0]
        )
        step = -psi / (dq / (nrm * q))  # psi'(mu) = q^(-3/2) sum c^2/(a+mu)^3
        new = mu + step
        mu = new if lo < new < hi else 0.5 * (lo + hi)
        if hi - lo <= 1e-15 * max(hi, 1e-300):
            break
    x = torch.where(free, a * zf / torch.where(free, a + mu, torch.ones_like(a)), 0.0)
    excess = float(vector_norm(x / safe)) / rho
    if excess > 1.0:  # rounding only: shrink by at most a few ulps
        x = x / excess
    return x.to(z.dtype)
