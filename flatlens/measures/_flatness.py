"""First-order flatness (Zhang et al., CVPR 2023, "Gradient Norm Aware Minimization").

    R1_rho(theta) = rho * max_{||delta||_B <= rho} ||grad L(theta + delta)||_*

with ||.||_* the dual norm of the ball's norm (the Euclidean norm for the paper's l2 ball;
||s g||_2 in the adaptive l2 ball, ||s g||_1 in the (adaptive) l-infinity box), so that the
mean value theorem gives R0_rho <= R1_rho in every geometry. The maximum is found by
:func:`flatlens.measures.projected_ascent` on f(delta) = ||grad L(theta + delta)||_*, whose
gradient is H(theta + delta) d(g) with g = grad L(theta + delta) and d(g) the gradient of the
dual norm (g / ||g|| for l2): one gradient and one Hessian-vector product per step. With a
single in-memory batch the Objective keeps the first-order graph of the gradient, so the HVP
that follows costs one extra backward pass.

At a minimum grad L = 0 and the ascent cannot start from theta: it starts on the sphere,
along +- the top Hessian eigenvectors (where ||grad L(theta + delta)|| ~ rho lambda_max), along
the gradient and at random points, and keeps the best.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from flatlens.core._objective import Objective
from flatlens.core._results import Result
from flatlens.measures._ascent import (
    AscentFn,
    Ball,
    worst_case_ascent,
)
from flatlens.measures._spectrum import EigenResult

__all__ = ["FlatnessResult", "first_order_flatness", "gradient_norm_function"]


@dataclass
class FlatnessResult(Result):
    """First-order flatness R1 and how it was found.

    Attributes:
        value: R1 = rho * max_grad_norm; with ``per_batch`` the batch-weighted mean of the
            per-batch values.
        max_grad_norm: The largest ||grad L(theta + delta)||_* found (batch-weighted mean
            with ``per_batch``).
        grad_norm_at_center: ||grad L(theta)||_* (so R1 >= rho * grad_norm_at_center).
        delta_norm: ||delta||_B of the maximizer (<= rho; the largest over batches).
        delta_l2: Its Euclidean norm (the largest over batches).
        best_start: Which start's run won; empty with ``per_batch``.
        start_values: Best ||grad L||_* reached from each start (single-batch runs only).
        num_losses, num_gradients, num_hvps: Evaluations spent (Lanczos included).
        seconds: Wall-clock time.
        batch_values: Per-batch R1 with ``per_batch``, else ``None``.
        delta: The maximizer (not in ``to_dict``; ``None`` with ``per_batch``).
    """

    value: float
    max_grad_norm: float
    grad_norm_at_center: float
    delta_norm: float
    delta_l2: float
    rho: float
    norm: str
    adaptive: bool
    adaptive_eta: float
    steps: int
    restarts: int
    init: list[str]
    step_size: float
    momentum: float
    per_batch: bool
    seed: int | None
    best_start: str
    start_values: dict[str, float]
    num_losses: int
    num_gradients: int
    num_hvps: int
    seconds: float
    batch_values: list[float] | None = None
    delta: Tensor | None = field(default=None, metadata={"json": False})


def gradient_norm_function(objective: Objective, ball: Ball, theta: Tensor) -> AscentFn:
    """f(delta) = ||grad L(theta + delta)||_* and grad f = H(theta + delta) d(g).

    d(g) = ``ball.steepest(g)`` is the gradient of the dual norm at g = grad L(theta + delta),
    so the chain rule gives grad f = H d(g): one gradient, then one HVP at the same point.
    """

    def fn(delta: Tensor, need_grad: bool) -> tuple[float, Tensor | None]:
        point = theta + delta
        g = objective.gradient(point)
        value = ball.dual_norm(g)
        if not need_grad:
            return value, None
        return value, objective.hvp(ball.steepest(g), at=point)

    return fn


def _gradient_norm_at_center(
    objective: Objective, ball: Ball, theta: Tensor
) -> tuple[float, Tensor]:
    """f(0) = ||grad L(theta)||_* and grad L(theta)."""
    gradient = objective.gradient(theta)
    return ball.dual_norm(gradient), gradient


def first_order_flatness(
    objective: Objective,
    rho: float,
    *,
    norm: Literal["l2", "linf"] = "l2",
    adaptive: bool = False,
    steps: int = 20,
    restarts: int = 1,
    init: Sequence[str] = ("eigen", "gradient"),
    starts: Sequence[Tensor] | None = None,
    eigen: EigenResult | Tensor | None = None,
    per_batch: bool = False,
    adaptive_eta: float = 0.0,
    step_size: float = 2.0,
    momentum: float = 0.25,
    num_eigen: int = 1,
    eigen_tol: float = 1e-3,
    seed: int | torch.Generator = 0,
    progress: bool = False,
) -> FlatnessResult:
    """First-order flatness R1 = rho * max_{||delta||_B <= rho} ||grad L(theta + delta)||_*.

    Projected ascent on ||grad L(theta + delta)||_* (one gradient and one HVP per step) with
    momentum and the Auto-PGD step-size schedule, from several starts on the sphere,
    keeping the best iterate (the center theta competes too). The ascent finds a lower bound
    on the true maximum. At a minimum where L is quadratic in the ball,
    R1 = rho^2 lambda_max for the l2 ball.

    Args:
        objective: The empirical risk L.
        rho: Radius of the ball, > 0.
        norm: ``"l2"`` (the paper's R1) or ``"linf"`` (then the dual norm is l1).
        adaptive: Use the elementwise-scaled ball ||delta / s|| <= rho, s = |theta| + eta,
            and the matching dual norm ||s g||; invariant to rescaling ReLU layers.
        steps: Ascent steps per start (>= 1).
        restarts: Number of random starts on the sphere (>= 0).
        init: Deterministic starts: ``"eigen"`` (+-rho along the top eigenvector(s) of the
            Hessian, of S H S when adaptive; one Lanczos run) and ``"gradient"`` (rho d(g)).
        starts: Extra start perturbations (flat tensors, projected onto the ball), e.g. the
            maximizer of R0.
        eigen: Precomputed eigenvectors for ``"eigen"`` (see
            :func:`flatlens.measures.zeroth_order_sharpness`).
        per_batch: Solve the maximum on every batch separately and combine the per-batch
            values like the risk combines batch losses ("m-sharpness" convention).
        adaptive_eta: eta >= 0 added to |theta| in the adaptive scale.
        step_size: Initial step eta_0 / rho (Auto-PGD: 2).
        momentum: Momentum weight in [0, 1) (Auto-PGD: 0.25).
        num_eigen: Eigenvectors used by ``"eigen"``.
        eigen_tol: Relative tolerance of that Lanczos run.
        seed: Seed or generator for random starts and Lanczos.
        progress: Show a tqdm bar.

    Returns:
        A :class:`FlatnessResult`. The model is left exactly as it was.
    """
    run = worst_case_ascent(
        objective,
        center=_gradient_norm_at_center,
        function=gradient_norm_function,
        desc="R1",
        rho=rho,
        norm=norm,
        adaptive=adaptive,
        steps=steps,
        restarts=restarts,
        init=init,
        starts=starts,
        eigen=eigen,
        per_batch=per_batch,
        adaptive_eta=adaptive_eta,
        step_size=step_size,
        momentum=momentum,
        num_eigen=num_eigen,
        eigen_tol=eigen_tol,
        seed=seed,
        progress=progress,
    )
    norms = [s.ascent.value for s in run.solved]
    max_norm = run.combine(norms)
    return FlatnessResult(
        value=run.config.rho * max_norm,
        max_grad_norm=max_norm,
        grad_norm_at_center=run.combine([s.center for s in run.solved]),
        **run.result_fields(batch_values=[run.config.rho * v for v in norms]),
    )
