"""Projected gradient ascent inside a norm ball: the one engine behind R0 and R1.

The feasible set is B = {delta : ||delta||_B <= rho} with one of four norms,

* ``l2``:               ||delta||_B = ||delta||_2
* ``linf``:             ||delta||_B = max_i |delta_i|
* adaptive ``l2``:      ||delta||_B = ||delta / s||_2   (an axis-aligned ellipsoid)
* adaptive ``linf``:    ||delta||_B = max_i |delta_i / s_i|   (a box)

with s = |theta| + eta elementwise (ASAM's adaptive geometry, Kwon et al. 2021). A
coordinate with s_i = 0 (or s_i < 1e-140) is fixed at delta_i = 0: a zero weight is not
perturbed. Pass ``eta > 0`` to perturb it anyway, at the price of exact scale invariance.

:func:`projected_ascent` maximizes any f(delta) over B given an oracle for f and its
gradient, with the step-size schedule of Auto-PGD (Croce & Hein, ICML 2020): steps of
length eta_k in the steepest-ascent direction of the norm, a momentum term, checkpoints at
which eta_k is halved and the iterate reset to the best one when progress stalls. The best
iterate is returned. Iterates are projected back onto B in the norm's own geometry
(:meth:`Ball.project_scaled`), which for the adaptive l2 ellipsoid differs from the exact
Euclidean projection :meth:`Ball.project` and is the one whose fixed points are the
constrained maxima. :func:`multi_start_ascent` runs it from several starts and keeps the
overall best; :func:`sphere_starts` builds the usual starts (along the gradient, along the
top curvature directions, random points on the sphere).
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flatlens.core._checks import check_positive_int, check_rho, make_generator
from flatlens.core._objective import Objective
from flatlens.core._params import preserved
from flatlens.measures._lanczos import lanczos_eigsh
from flatlens.measures._spectrum import EigenResult

__all__ = [
    "INIT_KINDS",
    "NORMS",
    "AscentConfig",
    "AscentFn",
    "AscentResult",
    "AscentRun",
    "Ball",
    "CenterFn",
    "SolvedBall",
    "WorstCase",
    "apgd_checkpoints",
    "batch_objectives",
    "check_init",
    "check_norm",
    "check_rho",
    "check_steps",
    "combine_batches",
    "count_difference",
    "curvature_directions",
    "make_generator",
    "multi_start_ascent",
    "projected_ascent",
    "run_measure",
    "sphere_starts",
    "worst_case_ascent",
]

S = TypeVar("S")
Norm = Literal["l2", "linf"]
NORMS: tuple[str, ...] = ("l2", "linf")
INIT_KINDS: tuple[str, ...] = ("gradient", "eigen")
_TINY_SCALE = 1e-140

AscentFn = Callable[[Tensor, bool], tuple[float, Tensor | None]]
"""``fn(delta, need_grad) -> (f(delta), grad f(delta) or None when need_grad is False)``."""

CenterFn = Callable[[Objective, "Ball", Tensor], tuple[float, Tensor]]
"""``center(objective, ball, theta) -> (f(0), grad L(theta))``: the ascended function at the
center of the ball and the loss gradient there (for the ``"gradient"`` start)."""


# ---------------------------------------------------------------------------------- checks
def check_steps(steps: object, name: str = "steps", minimum: int = 1) -> int:
    """Return ``steps`` unless it is not an integer >= ``minimum``."""
    return check_positive_int(name, steps, minimum)


def check_norm(norm: object) -> str:
    """Return ``norm`` unless it is not one of :data:`NORMS`."""
    if norm not in NORMS:
        raise ValueError(f"norm must be 'l2' or 'linf', not {norm!r}")
    return str(norm)


# ---------------------------------------------------------------------------------- the ball
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
        """The ball at ``theta``: plain, or adaptive with s = |theta| + eta."""
        if not isinstance(eta, numbers.Real) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"adaptive_eta must be a finite number >= 0, got {eta!r}")
        scale = theta.detach().abs() + float(eta) if adaptive else None
        return cls(rho, norm, scale)

    # -- norms -------------------------------------------------------------------------
    def norm_of(self, delta: Tensor) -> float:
        """||delta||_B (infinite if a fixed coordinate is nonzero)."""
        u = delta
        if self.scale is not None:
            fixed = self.scale == 0
            if bool((delta[fixed] != 0).any()):
                return math.inf
            u = torch.where(fixed, torch.zeros_like(delta), delta / self.scale.where(~fixed, 1))
        p = 2 if self.norm == "l2" else math.inf
        return float(torch.linalg.vector_norm(u.to(torch.float64), ord=p))

    def dual_norm(self, g: Tensor) -> float:
        """The dual norm ||g||_* = max_{||d||_B <= 1} <g, d>: ||s g||_2 or ||s g||_1."""
        v = g if self.scale is None else g * self.scale
        p = 2 if self.norm == "l2" else 1
        return float(torch.linalg.vector_norm(v.to(torch.float64), ord=p))

    def steepest(self, g: Tensor) -> Tensor:
        """The steepest-ascent direction d = argmax_{||d||_B <= 1} <g, d>.

        ``l2``: d = s^2 g / ||s g||_2; ``linf``: d = s sign(g) (s = 1 for the plain norms).
        Zero where g is zero. It is also the gradient of the dual norm ||g||_*.
        """
        s = self.scale
        if self.norm == "linf":
            return torch.sign(g) if s is None else s * torch.sign(g)
        sg = g if s is None else s * g
        n = torch.linalg.vector_norm(sg)
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
        n = torch.linalg.vector_norm(free)
        if n == 0:
            return torch.zeros_like(u)
        return self.rho * (free / n if s is None else s * free / n)

    def random_sphere(
        self, n: int, generator: torch.Generator, *, device=None, dtype=None
    ) -> Tensor:
        """A random point on the sphere: uniform for ``l2``, a random vertex for ``linf``."""
        u = torch.randn(n, generator=generator, dtype=torch.float64).to(device, dtype)
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
            n = float(torch.linalg.vector_norm(z))
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
    if float(torch.linalg.vector_norm(zf / safe)) <= rho:
        return zf.to(z.dtype)
    lo, hi = 0.0, float(torch.linalg.vector_norm(c)) / rho
    mu = 0.0
    for _ in range(max_iter):
        d = a + mu
        u = torch.where(free, c / torch.where(free, d, torch.ones_like(d)), torch.zeros_like(c))
        q = float(u @ u)
        nrm = math.sqrt(q)
        psi = 1.0 / nrm - 1.0 / rho
        if abs(psi) * rho <= 1e-14:
            break
        if psi < 0:
            lo = mu
        else:
            hi = mu
        dq = float((u * u / torch.where(free, d, torch.ones_like(d))).sum())
        step = -psi / (dq / (nrm * q))  # psi'(mu) = q^(-3/2) sum c^2/(a+mu)^3
        new = mu + step
        mu = new if lo < new < hi else 0.5 * (lo + hi)
        if hi - lo <= 1e-15 * max(hi, 1e-300):
            break
    x = torch.where(free, a * zf / torch.where(free, a + mu, torch.ones_like(a)), 0.0)
    excess = float(torch.linalg.vector_norm(x / safe)) / rho
    if excess > 1.0:  # rounding only: shrink by at most a few ulps
        x = x / excess
    return x.to(z.dtype)


# ---------------------------------------------------------------------------------- engine
def apgd_checkpoints(steps: int) -> list[int]:
    """Auto-PGD checkpoints w_j = ceil(p_j * steps) with p_0 = 0, p_1 = 0.22 and
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), below ``steps``."""
    # p in hundredths, so the checkpoints are exact integers (no float drift).
    p_prev, p = 0, 22
    out: list[int] = []
    while p < 100:
        w = -(-p * steps // 100)
        if 0 < w < steps and (not out or w > out[-1]):
            out.append(w)
        p_prev, p = p, p + max(p - p_prev - 3, 6)
    return out


@dataclass
class AscentRun:
    """One run of :func:`projected_ascent`.

    Attributes:
        delta: The best iterate found.
        value: f(delta), the largest value seen.
        values: f at every evaluated iterate, the start first.
        step_halvings: How often the step size was halved.
    """

    delta: Tensor
    value: float
    values: list[float]
    step_halvings: int


def projected_ascent(
    fn: AscentFn,
    ball: Ball,
    start: Tensor,
    steps: int,
    *,
    step_size: float = 2.0,
    momentum: float = 0.25,
    on_step: Callable[[], None] | None = None,
) -> AscentRun:
    """Maximize f over the ball by projected steepest ascent with the Auto-PGD schedule.

    With P the projection in the norm's geometry (:meth:`Ball.project_scaled`), d(g) the
    steepest-ascent direction of the norm and eta_0 = ``step_size * rho``:

        z_{k+1} = P(x_k + eta_k d(grad f(x_k)))
        x_{k+1} = P(x_k + (1 - m)(z_{k+1} - x_k) + m (x_k - x_{k-1}))   (x_1 = z_1)

    At the checkpoints of :func:`apgd_checkpoints`, eta is halved and the iterate reset to
    the best one if f rose in fewer than 75% of the steps since the last checkpoint, or if
    eta was not halved at the last checkpoint and the best value has not improved since.

    Args:
        fn: ``fn(delta, need_grad) -> (f, grad f or None)``.
        ball: The feasible set.
        start: First iterate (projected onto the ball).
        steps: Number of ascent steps (fn is evaluated ``steps + 1`` times; the last
            evaluation asks for no gradient).
        step_size: eta_0 / rho, > 0 (Auto-PGD uses 2).
        momentum: m in [0, 1) (Auto-PGD's 1 - alpha = 0.25).
        on_step: Called after every step (progress bars).

    Returns:
        The best iterate and its value.
    """
    steps = check_steps(steps)
    if not isinstance(step_size, numbers.Real) or not math.isfinite(step_size) or step_size <= 0:
        raise ValueError(f"step_size must be a finite number > 0, got {step_size!r}")
    if not isinstance(momentum, numbers.Real) or not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    x = ball.project_scaled(start)
    f, g = fn(x, True)
    values = [f]
    best_x, best_f, best_g = x, f, g
    x_prev = x
    eta = step_size * ball.rho
    checkpoints = set(apgd_checkpoints(steps))
    last_check, rises, best_at_check, reduced_last = 0, 0, best_f, False
    halvings = 0
    for k in range(steps):
        z = ball.project_scaled(x + eta * ball.steepest(g))
        x_new = (
            z
            if k == 0
            else ball.project_scaled(x + (1 - momentum) * (z - x) + momentum * (x - x_prev))
        )
        f_new, g_new = fn(x_new, k + 1 < steps)
        values.append(f_new)
        rises += f_new > f
        x_prev, x, f, g = x, x_new, f_new, g_new
        if f > best_f:
            best_x, best_f, best_g = x, f, g
        if on_step is not None:
            on_step()
        if k + 1 in checkpoints:
            stalled = rises < 0.75 * (k + 1 - last_check)
            frozen = not reduced_last and best_f <= best_at_check
            reduced_last = stalled or frozen
            if reduced_last:
                eta /= 2
                halvings += 1
                x, f, g, x_prev = best_x, best_f, best_g, best_x
            last_check, rises, best_at_check = k + 1, 0, best_f
    return AscentRun(best_x, best_f, values, halvings)


@dataclass
class AscentResult:
    """The best of several :func:`projected_ascent` runs.

    Attributes:
        delta: The best perturbation over all runs (zero if the center won).
        value: f(delta).
        best_start: Name of the start whose run won (``"center"`` for delta = 0).
        start_values: Best value reached from each start.
        runs: The individual runs, in start order.
    """

    delta: Tensor
    value: float
    best_start: str
    start_values: dict[str, float]
    runs: list[AscentRun] = field(default_factory=list)


def multi_start_ascent(
    fn: AscentFn,
    ball: Ball,
    starts: Sequence[tuple[str, Tensor]],
    steps: int,
    *,
    center_value: float | None = None,
    step_size: float = 2.0,
    momentum: float = 0.25,
    progress: bool = False,
    desc: str = "ascent",
) -> AscentResult:
    """Run :func:`projected_ascent` from each named start and keep the best iterate.

    Args:
        fn: The function ascended (see :func:`projected_ascent`).
        ball: The feasible set.
        starts: ``(name, delta)`` pairs.
        steps: Steps per run.
        center_value: f(0) when known; delta = 0 then competes as ``"center"``.
        step_size, momentum: See :func:`projected_ascent`.
        progress: Show a tqdm bar over all steps.
        desc: The bar's label.
    """
    if not starts:
        raise ValueError("no start points: enable an init kind or set restarts >= 1")
    bar = tqdm(total=len(starts) * steps, desc=desc, disable=not progress, leave=False)
    try:
        runs = [
            projected_ascent(
                fn,
                ball,
                delta,
                steps,
                step_size=step_size,
                momentum=momentum,
                on_step=lambda: bar.update(1),
            )
            for _, delta in starts
        ]
    finally:
        bar.close()
    start_values = {name: run.value for (name, _), run in zip(starts, runs, strict=True)}
    i = max(range(len(runs)), key=lambda j: runs[j].value)
    best = AscentResult(runs[i].delta, runs[i].value, starts[i][0], start_values, runs)
    if center_value is not None and not center_value <= best.value:
        best.delta = torch.zeros_like(best.delta)
        best.value = center_value
        best.best_start = "center"
    return best


# ---------------------------------------------------------------------------------- starts
def curvature_directions(
    objective: Objective,
    theta: Tensor,
    k: int,
    *,
    scale: Tensor | None = None,
    tol: float = 1e-3,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Top-k eigenpairs of S H S (S = diag(scale), or S = I), by Lanczos at ``theta``.

    In the scaled coordinates u = delta / s the Hessian is S H S, so its eigenvectors are
    the directions of largest curvature in the adaptive geometry, and they transform with
    a rescaling of the network exactly as the ball does.

    Returns:
        ``(eigenvalues, eigenvectors)``: float64 values, unit rows.
    """

    def matvec(v: Tensor) -> Tensor:
        if scale is None:
            return objective.hvp(v, at=theta)
        return scale * objective.hvp(scale * v, at=theta)

    v0 = torch.randn(objective.num_params, generator=generator, dtype=torch.float64)
    out = lanczos_eigsh(
        matvec,
        v0.to(objective.device, objective.dtype),
        k,
        which="LA",
        tol=tol,
        generator=generator,
    )
    return out.eigenvalues, out.eigenvectors


def _eigen_rows(eigen: EigenResult | Tensor) -> Tensor:
    rows = eigen.eigenvectors if isinstance(eigen, EigenResult) else eigen
    if not isinstance(rows, Tensor):
        raise TypeError("eigen must be an EigenResult or a tensor of eigenvector rows")
    return rows if rows.dim() == 2 else rows.reshape(1, -1)


def sphere_starts(
    objective: Objective,
    ball: Ball,
    theta: Tensor,
    *,
    init: Sequence[str],
    restarts: int,
    gradient: Tensor | None,
    generator: torch.Generator,
    eigen: EigenResult | Tensor | None = None,
    num_eigen: int = 1,
    eigen_tol: float = 1e-3,
    starts: Sequence[Tensor] | None = None,
) -> list[tuple[str, Tensor]]:
    """Named start points for the ascent, all on the ball's sphere (given ones projected).

    * ``"gradient"`` in ``init``: rho d(g), the one-step SAM point (skipped if g = 0).
    * ``"eigen"`` in ``init``: the sphere points along +-u_i for the top ``num_eigen``
      eigenvectors u_i of S H S (or those of ``eigen``, read as directions u = delta / s).
    * ``restarts`` random points on the sphere.
    * ``starts``: caller-supplied perturbations.
    """
    out: list[tuple[str, Tensor]] = []
    scale = ball.scale
    if "gradient" in init and gradient is not None:
        d = ball.to_sphere(gradient if scale is None else scale * gradient)
        if bool((d != 0).any()):
            out.append(("gradient", d))
    if "eigen" in init:
        if eigen is None:
            _, rows = curvature_directions(
                objective,
                theta,
                num_eigen,
                scale=scale,
                tol=eigen_tol,
                generator=generator,
            )
        else:
            rows = _eigen_rows(eigen)[:num_eigen]
        for i, u in enumerate(rows):
            u = u.to(objective.device, objective.dtype)
            out += [(f"+eigen{i}", ball.to_sphere(u)), (f"-eigen{i}", ball.to_sphere(-u))]
    for i in range(restarts):
        point = ball.random_sphere(
            objective.num_params, generator, device=objective.device, dtype=objective.dtype
        )
        out.append((f"random{i}", point))
    for i, delta in enumerate(starts or ()):
        if not isinstance(delta, Tensor) or delta.shape != (objective.num_params,):
            raise ValueError(f"starts[{i}] must be a flat tensor of length {objective.num_params}")
        out.append(
            (f"given{i}", ball.project_scaled(delta.detach().to(objective.device, objective.dtype)))
        )
    return out


def check_init(init: object, restarts: object, starts: object) -> tuple[tuple[str, ...], int]:
    """Validate ``init`` and ``restarts``; at least one start must result."""
    if isinstance(init, str):
        init = (init,)
    try:
        kinds = tuple(init)  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError(f"init must be a sequence of {INIT_KINDS}, not {init!r}") from err
    unknown = [k for k in kinds if k not in INIT_KINDS]
    if unknown:
        raise ValueError(f"unknown init kind(s) {unknown}; choose from {INIT_KINDS}")
    restarts = check_steps(restarts, "restarts", minimum=0)
    if not kinds and restarts == 0 and not starts:
        raise ValueError("no start points: pass init kinds, restarts >= 1 or starts")
    return kinds, restarts


# ---------------------------------------------------------------------------------- batches
def batch_objectives(objective: Objective) -> Iterator[tuple[Objective, int]]:
    """One :class:`Objective` per batch of ``objective``'s data, with the batch size n_b.

    Batches are produced lazily (one data pass). Each per-batch objective uses the same
    model, loss, parameters, reduction, eval mode and HVP method, caches its first-order
    graph, and reduces over this process only. Combine the per-batch values with
    :func:`combine_batches`.
    """
    for x, y, n in objective.batches():
        child = Objective(
            objective.model,
            objective.loss_fn,
            [(x, y)],
            params=list(objective.space.names),
            reduction=objective.reduction,
            eval_mode=objective.eval_mode,
            hvp_method=objective.hvp_method,
            cache_graph=True,
            check_determinism=False,
            distributed=False,
        )
        yield child, n


def combine_batches(values: Sequence[float], sizes: Sequence[int], reduction: str) -> float:
    """Combine per-batch values like the risk combines per-batch losses.

    ``mean``: sum_b n_b v_b / sum_b n_b; ``sum``: sum_b v_b.
    """
    if not values:
        raise ValueError("data is empty: it yielded no batches")
    if reduction == "sum":
        return float(sum(values))
    return float(sum(n * v for n, v in zip(sizes, values, strict=True)) / sum(sizes))


# ---------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class AscentConfig:
    """Validated settings shared by the worst-case measures (see their docstrings)."""

    rho: float
    norm: str = "l2"
    adaptive: bool = False
    adaptive_eta: float = 0.0
    steps: int = 20
    restarts: int = 1
    init: tuple[str, ...] = ("gradient", "eigen")
    step_size: float = 2.0
    momentum: float = 0.25
    num_eigen: int = 1
    eigen_tol: float = 1e-3

    def __post_init__(self) -> None:
        object.__setattr__(self, "rho", check_rho(self.rho))
        check_norm(self.norm)
        if not isinstance(self.adaptive, bool):
            raise TypeError(f"adaptive must be True or False, not {self.adaptive!r}")
        eta = self.adaptive_eta
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not eta >= 0:
            raise ValueError(f"adaptive_eta must be a finite number >= 0, got {eta!r}")
        object.__setattr__(self, "steps", check_steps(self.steps))
        kinds, restarts = check_init(self.init, self.restarts, True)
        object.__setattr__(self, "init", kinds)
        object.__setattr__(self, "restarts", restarts)
        s = self.step_size
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0 < s < math.inf:
            raise ValueError(f"step_size must be a finite number > 0, got {s!r}")
        m = self.momentum
        if isinstance(m, bool) or not isinstance(m, numbers.Real) or not 0 <= m < 1:
            raise ValueError(f"momentum must be in [0, 1), got {m!r}")
        object.__setattr__(self, "num_eigen", check_steps(self.num_eigen, "num_eigen"))
        if not isinstance(self.eigen_tol, numbers.Real) or not self.eigen_tol > 0:
            raise ValueError(f"eigen_tol must be > 0, got {self.eigen_tol!r}")

    def ball(self, theta: Tensor) -> Ball:
        """The ball of these settings around ``theta``."""
        return Ball.around(theta, self.rho, self.norm, self.adaptive, self.adaptive_eta)


def count_difference(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """``after - before`` for the objective's ``loss``/``gradient``/``hvp`` counters."""
    return {k: after[k] - before.get(k, 0) for k in ("loss", "gradient", "hvp")}


def run_measure(
    objective: Objective, solve: Callable[[Objective], S], *, per_batch: bool
) -> tuple[list[S], list[int], dict[str, int], float]:
    """Run ``solve`` on the whole objective or on each batch, with the model preserved.

    Returns:
        ``(solutions, batch sizes, evaluation counts, seconds)``; one solution (size 1) when
        ``per_batch`` is False. Counts are summed over the per-batch objectives.
    """
    start = time.perf_counter()
    with preserved(objective.model):
        if not per_batch:
            before = dict(objective.counts)
            solved = [solve(objective)]
            return solved, [1], count_difference(before, objective.counts), _since(start)
        solved, sizes = [], []
        counts = {"loss": 0, "gradient": 0, "hvp": 0}
        for child, n in batch_objectives(objective):
            solved.append(solve(child))
            sizes.append(n)
            for key in counts:
                counts[key] += child.counts[key]
        if not solved:
            raise ValueError("data is empty: it yielded no batches")
        return solved, sizes, counts, _since(start)


def _since(start: float) -> float:
    return time.perf_counter() - start


def ascend_from_sphere(
    fn: AscentFn,
    objective: Objective,
    cfg: AscentConfig,
    *,
    ball: Ball,
    theta: Tensor,
    gradient: Tensor,
    center_value: float,
    generator: torch.Generator,
    eigen: EigenResult | Tensor | None,
    starts: Sequence[Tensor] | None,
    progress: bool,
    desc: str,
) -> AscentResult:
    """Build the starts on the sphere (:func:`sphere_starts`) and keep the best ascent.

    This is the shared driver of R0 and R1: they differ only in ``fn`` and ``center_value``.
    """
    points = sphere_starts(
        objective,
        ball,
        theta,
        init=cfg.init,
        restarts=cfg.restarts,
        gradient=gradient,
        generator=generator,
        eigen=eigen,
        num_eigen=cfg.num_eigen,
        eigen_tol=cfg.eigen_tol,
        starts=starts,
    )
    return multi_start_ascent(
        fn,
        ball,
        points,
        cfg.steps,
        center_value=center_value,
        step_size=cfg.step_size,
        momentum=cfg.momentum,
        progress=progress,
        desc=desc,
    )


# ---------------------------------------------------------------------------------- R0 and R1
@dataclass
class SolvedBall:
    """One worst-case ascent in one ball: f(0), the best ascent and the ball."""

    center: float
    ascent: AscentResult
    ball: Ball


@dataclass
class WorstCase:
    """What :func:`worst_case_ascent` found, on the whole data or on each batch.

    Attributes:
        config: The validated settings.
        solved: One :class:`SolvedBall` (or one per batch with ``per_batch``).
        sizes: The batch sizes (``[1]`` without ``per_batch``).
        reduction: The objective's reduction, for :meth:`combine`.
        counts: Loss, gradient and HVP evaluations spent.
        seconds: Wall-clock time.
        per_batch: Whether each batch was solved on its own.
        seed: The integer seed (``None`` when a generator was given).
    """

    config: AscentConfig
    solved: list[SolvedBall]
    sizes: list[int]
    reduction: str
    counts: dict[str, int]
    seconds: float
    per_batch: bool
    seed: int | None

    def combine(self, values: Sequence[float]) -> float:
        """Per-solution values combined like the risk combines batches
        (:func:`combine_batches`)."""
        return combine_batches(values, self.sizes, self.reduction)

    def result_fields(self, batch_values: list[float]) -> dict[str, Any]:
        """The fields :class:`~flatlens.measures.SharpnessResult` and
        :class:`~flatlens.measures.FlatnessResult` share: the perturbation found, the
        settings, the winning start, the counts and the time. ``batch_values`` (the
        per-batch measure) is kept only with ``per_batch``."""
        cfg = self.config
        single = None if self.per_batch else self.solved[0].ascent
        return {
            "delta_norm": max(s.ball.norm_of(s.ascent.delta) for s in self.solved),
            "delta_l2": max(float(torch.linalg.vector_norm(s.ascent.delta)) for s in self.solved),
            "rho": cfg.rho,
            "norm": cfg.norm,
            "adaptive": cfg.adaptive,
            "adaptive_eta": float(cfg.adaptive_eta),
            "steps": cfg.steps,
            "restarts": cfg.restarts,
            "init": list(cfg.init),
            "step_size": float(cfg.step_size),
            "momentum": float(cfg.momentum),
            "per_batch": self.per_batch,
            "seed": self.seed,
            "best_start": "" if single is None else single.best_start,
            "start_values": {} if single is None else single.start_values,
            "num_losses": self.counts["loss"],
            "num_gradients": self.counts["gradient"],
            "num_hvps": self.counts["hvp"],
            "seconds": self.seconds,
            "batch_values": batch_values if self.per_batch else None,
            "delta": None if single is None else single.delta,
        }


def worst_case_ascent(
    objective: Objective,
    *,
    center: CenterFn,
    function: Callable[[Objective, Ball, Tensor], AscentFn],
    desc: str,
    rho: float,
    norm: str,
    adaptive: bool,
    steps: int,
    restarts: int,
    init: Sequence[str],
    starts: Sequence[Tensor] | None,
    eigen: EigenResult | Tensor | None,
    per_batch: bool,
    adaptive_eta: float,
    step_size: float,
    momentum: float,
    num_eigen: int,
    eigen_tol: float,
    seed: int | torch.Generator,
    progress: bool,
) -> WorstCase:
    """The shared body of R0 and R1: check the settings, then maximize f over the ball
    around theta on the whole objective or on each batch, with the model preserved.

    In each ball (see :func:`run_measure` for ``per_batch``) ``center`` gives f(0) and the
    loss gradient at theta, ``function`` gives the oracle of f, and
    :func:`ascend_from_sphere` keeps the best ascent from the starts on the sphere. The
    other arguments are those of :func:`flatlens.measures.zeroth_order_sharpness` and
    :func:`flatlens.measures.first_order_flatness`; ``desc`` labels the progress bar.

    Raises:
        ValueError, TypeError: a setting out of range (see :class:`AscentConfig`), no start
            at all, or ``per_batch`` with precomputed ``eigen`` or ``starts``.
    """
    cfg = AscentConfig(
        rho,
        norm,
        adaptive,
        adaptive_eta,
        steps,
        restarts,
        tuple(init) if not isinstance(init, str) else (init,),
        step_size,
        momentum,
        num_eigen,
        eigen_tol,
    )
    check_init(cfg.init, cfg.restarts, starts)
    if per_batch and (eigen is not None or starts):
        raise ValueError("per_batch=True computes eigenvectors and starts per batch; drop them")
    generator = make_generator(seed)

    def solve(obj: Objective) -> SolvedBall:
        theta = obj.theta
        ball = cfg.ball(theta)
        value, gradient = center(obj, ball, theta)
        best = ascend_from_sphere(
            function(obj, ball, theta),
            obj,
            cfg,
            ball=ball,
            theta=theta,
            gradient=gradient,
            center_value=value,
            generator=generator,
            eigen=eigen,
            starts=starts,
            progress=progress,
            desc=desc,
        )
        return SolvedBall(value, best, ball)

    solved, sizes, counts, seconds = run_measure(objective, solve, per_batch=per_batch)
    return WorstCase(
        config=cfg,
        solved=solved,
        sizes=sizes,
        reduction=objective.reduction,
        counts=counts,
        seconds=seconds,
        per_batch=per_batch,
        seed=seed if isinstance(seed, int) else None,
    )
