"""First-order flatness (Zhang et al., CVPR 2023, "Gradient Norm Aware Minimization").

    R1_rho(theta) = rho * max_{||delta||_B <= rho} ||grad L(theta + delta)||_*

with ||.||_* the dual norm of the ball's norm (the Euclidean norm for the paper's l2 ball;
||s g||_2 in the adaptive l2 ball, ||s g||_1 in the (adaptive) l-infinity box), so that the
mean value theorem gives R0_rho <= R1_rho in every geometry. The maximum is found by
projected ascent (:mod:`flatlens.measures._apgd`) on f(delta) = ||grad L(theta + delta)||_*,
whose gradient is H(theta + delta) d(g) with g = grad L(theta + delta) and d(g) the gradient of
the dual norm (g / ||g|| for l2): one gradient and one Hessian-vector product per step. With a
single in-memory batch the Objective keeps the first-order graph of the gradient, so the HVP
that follows costs one extra backward pass.

At a minimum grad L = 0 and the ascent cannot start from theta: it starts on the sphere,
along +- the top Hessian eigenvectors (where ||grad L(theta + delta)|| ~ rho lambda_max), along
the gradient and at random points, and keeps the best.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from flatlens.core._memory import tracks_peak_memory
from flatlens.core._objective import Objective
from flatlens.measures._apgd import AscentFn
from flatlens.measures._ascent import WorstCaseResult, worst_case_ascent
from flatlens.measures._ball import Ball
from flatlens.measures._config import (
    AscentConfig,
    AscentSettings,
    resolve_config,
    rho_from_config,
)
from flatlens.measures._spectrum import EigenResult

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["FlatnessResult", "first_order_flatness", "gradient_norm_function"]


@dataclass(kw_only=True)
class FlatnessResult(WorstCaseResult):
    """First-order flatness R1 and how it was found (the fields it shares with the other
    worst-case measure: :class:`~flatlens.measures.WorstCaseResult`).

    Attributes:
        value: R1 = rho * max_grad_norm; with ``per_batch`` the batch-weighted mean of the
            per-batch values.
        max_grad_norm: The largest ||grad L(theta + delta)||_* found (batch-weighted mean
            with ``per_batch``).
        grad_norm_at_center: ||grad L(theta)||_* (so R1 >= rho * grad_norm_at_center).
    """

    max_grad_norm: float
    grad_norm_at_center: float


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


@rho_from_config
@tracks_peak_memory
def first_order_flatness(
    objective: Objective,
    rho: float,
    *,
    config: AscentConfig | None = None,
    at: Tensor | None = None,
    starts: Sequence[Tensor] | None = None,
    eigen: EigenResult | Tensor | None = None,
    per_batch: bool = False,
    seed: int | torch.Generator = 0,
    progress: bool = False,
    **settings: Unpack[AscentSettings],
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
        config: The other ascent settings at once (see :class:`AscentConfig`), instead of
            keyword settings; its ``rho`` is replaced by ``rho``, so one config serves every
            radius.
        at: Flat parameter vector theta to measure around (default: the model's own).
        starts: Extra start perturbations (flat tensors, projected onto the ball), e.g. the
            maximizer of R0.
        eigen: Precomputed eigenvectors for the ``"eigen"`` start (see
            :func:`flatlens.measures.zeroth_order_sharpness`).
        per_batch: Solve the maximum on every batch separately and combine the per-batch
            values like the risk combines batch losses ("m-sharpness" convention).
        seed: Seed or generator for random starts and Lanczos.
        progress: Show a tqdm bar.
        **settings: The other fields of :class:`AscentConfig`; ``norm="linf"`` makes the
            dual norm l1, and ``init`` defaults to ``("eigen", "gradient")``: +-rho along
            the top eigenvector(s) of H (of S H S when adaptive) and rho d(g).

    Returns:
        A :class:`FlatnessResult`. The model is left exactly as it was.

    Raises:
        TypeError, ValueError: Bad settings, or both ``config`` and keyword settings.
        NonFiniteLossError: The loss or its gradient norm is NaN or infinite in the ball.
    """
    cfg = resolve_config(
        rho, config, settings, default_init=("eigen", "gradient"), measure="first_order_flatness"
    )
    run = worst_case_ascent(
        objective,
        cfg,
        center=_gradient_norm_at_center,
        function=gradient_norm_function,
        desc="R1",
        eval_cost=1.5,
        at=at,
        starts=starts,
        eigen=eigen,
        per_batch=per_batch,
        seed=seed,
        progress=progress,
    )
    norms = [s.ascent.value for s in run.solved]
    max_norm = run.combine(norms)
    return FlatnessResult(
        value=cfg.rho * max_norm,
        max_grad_norm=max_norm,
        grad_norm_at_center=run.combine([s.center for s in run.solved]),
        **run.result_fields(batch_values=[cfg.rho * v for v in norms]),
    )
