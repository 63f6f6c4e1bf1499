"""The Auto-PGD projected-ascent solver that maximizes a function over a :class:`Ball`.

:func:`projected_ascent` maximizes any f(delta) over B given an oracle for f and its
gradient, with the step-size schedule of Auto-PGD (Croce & Hein, ICML 2020): steps of
length eta_k in the steepest-ascent direction of the norm, a momentum term, checkpoints at
which eta_k is halved and the iterate reset to the best one when progress stalls. The best
iterate is returned. Iterates are projected back onto B in the norm's own geometry
(:meth:`Ball.project_scaled`), which for the adaptive l2 ellipsoid differs from the exact
Euclidean projection :meth:`Ball.project` and is the one whose fixed points are the
constrained maxima. :func:`multi_start_ascent` runs it from several starts and keeps the
overall best.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flatlens.core._checks import check_finite, check_positive, check_positive_int
from flatlens.core._errors import NonFiniteLossError
from flatlens.measures._ball import Ball

__all__ = [
    "AscentFn",
    "AscentResult",
    "AscentRun",
    "apgd_checkpoints",
    "check_momentum",
    "multi_start_ascent",
    "projected_ascent",
]

AscentFn = Callable[[Tensor, bool], tuple[float, Tensor | None]]
"""``fn(delta, need_grad) -> (f(delta), grad f(delta) or None when need_grad is False)``."""


def check_momentum(momentum: object) -> float:
    """``momentum`` as a float, unless it does not lie in [0, 1)."""
    m = check_finite("momentum", momentum)
    if not 0 <= m < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    return m


def _evaluate(fn: AscentFn, delta: Tensor, need_grad: bool, step: int):
    """``fn(delta, need_grad)``, refusing a non-finite value (NaN never wins a comparison,
    so the ascent would otherwise go on silently)."""
    value, grad = fn(delta, need_grad)
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"the ascended function is {value} at step {step} of the ascent; check the "
            "weights and inputs for NaN/inf, or lower rho"
        )
    return value, grad


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

    Raises:
        NonFiniteLossError: f is NaN or infinite at an iterate.
    """
    steps = check_positive_int("steps", steps)
    step_size = check_positive("step_size", step_size)
    momentum = check_momentum(momentum)
    x = ball.project_scaled(start)
    f, g = _evaluate(fn, x, True, 0)
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
        f_new, g_new = _evaluate(fn, x_new, k + 1 < steps, k + 1)
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

    Raises:
        NonFiniteLossError: ``center_value`` or f at an iterate is NaN or infinite.
    """
    if not starts:
        raise ValueError("no start points: enable an init kind or set restarts >= 1")
    if center_value is not None and not math.isfinite(center_value):
        raise NonFiniteLossError(
            f"the ascended function is {center_value} at the center of the ball; check the "
            "weights and inputs for NaN/inf"
        )
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
    if center_value is not None and center_value > best.value:
        best.delta = torch.zeros_like(best.delta)
        best.value = center_value
        best.best_start = "center"
    return best
