"""Zeroth-order sharpness: how much the loss can rise within a ball around theta.

* worst case (SAM's regularizer):
  R0_rho(theta) = max_{||delta||_B <= rho} L(theta + delta) - L(theta)
* average case: E_delta [L(theta + delta) - L(theta)] over random delta

The worst case is found by projected ascent (:mod:`flatlens.measures._apgd`) on
f(delta) = L(theta + delta), whose gradient is grad L(theta + delta): one gradient per step.
Because the center delta = 0 belongs to the ball, R0 >= 0.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from flatlens.core._checks import check_positive_int, make_generator
from flatlens.core._memory import tracks_peak_memory
from flatlens.core._objective import Objective
from flatlens.core._params import preserved
from flatlens.core._renames import renamed, renamed_attribute
from flatlens.core._results import MeasureResult
from flatlens.measures._apgd import AscentFn
from flatlens.measures._ascent import WorstCaseResult, center_point, worst_case_ascent
from flatlens.measures._ball import Ball, Norm
from flatlens.measures._config import (
    AscentConfig,
    AscentSettings,
    resolve_config,
    rho_from_config,
)
from flatlens.measures._spectrum import EigenResult

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "AverageSharpnessResult",
    "SharpnessResult",
    "average_sharpness",
    "zeroth_order_sharpness",
]


@dataclass(kw_only=True)
class SharpnessResult(WorstCaseResult):
    """Worst-case zeroth-order sharpness R0 and how it was found (the fields it shares with
    the other worst-case measure: :class:`~flatlens.measures.WorstCaseResult`).

    Attributes:
        value: R0 = max_loss - loss (>= 0); with ``per_batch`` the batch-weighted mean of
            the per-batch values ("m-sharpness").
        loss: L(theta).
        max_loss: L(theta + delta) at the best perturbation found.
    """

    loss: float
    max_loss: float


def _loss_at_center(objective: Objective, ball: Ball, theta: Tensor) -> tuple[float, Tensor]:
    """f(0) = L(theta) and grad L(theta), in one pass."""
    return objective.loss_and_gradient(theta)


def _loss_function(objective: Objective, ball: Ball, theta: Tensor) -> AscentFn:
    """f(delta) = L(theta + delta), grad f = grad L(theta + delta)."""

    def fn(delta: Tensor, need_grad: bool) -> tuple[float, Tensor | None]:
        if need_grad:
            return objective.loss_and_gradient(theta + delta)
        return objective.loss(theta + delta), None

    return fn


@rho_from_config
@tracks_peak_memory
def zeroth_order_sharpness(
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
) -> SharpnessResult:
    """Worst-case sharpness R0 = max_{||delta||_B <= rho} L(theta + delta) - L(theta).

    Projected gradient ascent with momentum and the Auto-PGD step-size schedule (as
    Andriushchenko et al., ICML 2023, evaluate sharpness), from several starts on the
    sphere, keeping the best iterate; one gradient per step. The ascent finds a lower bound
    on the true maximum; more ``steps`` and starts tighten it.

    Args:
        objective: The empirical risk L.
        rho: Radius of the ball, > 0.
        config: The other ascent settings at once (see :class:`AscentConfig`), instead of
            keyword settings; its ``rho`` is replaced by ``rho``, so one config serves every
            radius.
        at: Flat parameter vector theta to measure around (default: the model's own).
        starts: Extra start perturbations (flat tensors, projected onto the ball).
        eigen: Precomputed eigenvectors for the ``"eigen"`` start (an :class:`EigenResult`
            or rows; in the adaptive geometry directions u = delta / s of S H S).
        per_batch: Solve the maximum on every batch separately and combine the values like
            the risk combines batch losses ("m-sharpness", m = the batch size).
        seed: Seed or generator for random starts and Lanczos.
        progress: Show a tqdm bar.
        **settings: The other fields of :class:`AscentConfig` (``norm``, ``adaptive``,
            ``adaptive_eta``, ``steps``, ``restarts``, ``init``, ``step_size``,
            ``momentum``, ``num_eigen``, ``eigen_tol``); ``init`` defaults to
            ``("gradient", "eigen")``: the one-step SAM point rho d(g), so R0 is at least the
            loss increase there, and +-rho along the top Hessian eigenvector(s).

    Returns:
        A :class:`SharpnessResult`. The model is left exactly as it was.

    Raises:
        TypeError, ValueError: Bad settings, or both ``config`` and keyword settings.
        NonFiniteLossError: The loss is NaN or infinite somewhere in the ball.
    """
    cfg = resolve_config(
        rho, config, settings, default_init=("gradient", "eigen"), measure="zeroth_order_sharpness"
    )
    run = worst_case_ascent(
        objective,
        cfg,
        center=_loss_at_center,
        function=_loss_function,
        desc="R0",
        eval_cost=0.5,
        at=at,
        starts=starts,
        eigen=eigen,
        per_batch=per_batch,
        seed=seed,
        progress=progress,
    )
    values = [s.ascent.value - s.center for s in run.solved]
    return SharpnessResult(
        value=run.combine(values),
        loss=run.combine([s.center for s in run.solved]),
        max_loss=run.combine([s.ascent.value for s in run.solved]),
        **run.result_fields(batch_values=values),
    )


@dataclass
class AverageSharpnessResult(MeasureResult):
    """Average-case sharpness E[L(theta + delta)] - L(theta) over random delta.

    Attributes:
        value: The sample mean of L(theta + delta_i) - L(theta).
        stderr: Its standard error, std / sqrt(num_probes).
        loss: L(theta).
        num_probes: The number of random perturbations drawn.
        num_losses: Loss evaluations spent (num_probes + 1).
    """

    value: float
    stderr: float
    loss: float
    rho: float
    norm: str
    adaptive: bool
    adaptive_eta: float
    num_probes: int
    distribution: str
    seed: int | None
    num_losses: int
    num_gradients: int
    num_hvps: int
    seconds: float

    num_samples = renamed_attribute("AverageSharpnessResult", "num_samples", "num_probes")


@renamed(num_samples="num_probes", samples="num_probes")
@tracks_peak_memory
def average_sharpness(
    objective: Objective,
    rho: float,
    *,
    config: AscentConfig | None = None,
    norm: Norm | None = None,
    adaptive: bool | None = None,
    adaptive_eta: float | None = None,
    num_probes: int = 64,
    distribution: Literal["sphere", "gaussian"] = "sphere",
    at: Tensor | None = None,
    seed: int | torch.Generator = 0,
    progress: bool = False,
) -> AverageSharpnessResult:
    """Average sharpness (1/m) sum_i [L(theta + delta_i) - L(theta)] and its standard error.

    ``distribution="sphere"``: delta_i uniform on the sphere ||delta||_B = rho for ``l2``
    (delta = rho s u / ||u|| with u standard normal), a uniformly random vertex rho s sign(u)
    of the box for ``linf``. ``"gaussian"`` (``l2`` only): delta_i ~ N(0, rho^2 diag(s^2)),
    the convention of Andriushchenko et al. (ICML 2023); its norm is about rho sqrt(n).
    For a quadratic with Hessian H: E = rho^2 tr(S H S) / (2n) on the l2 sphere and
    rho^2 tr(S H S) / 2 for the Gaussian (s = 1 for the plain norms).

    Per-batch evaluation is not offered: with independent draws per batch the expectation
    is the same as over the whole data.

    Args:
        objective: The empirical risk L.
        rho: Radius (sphere) or standard deviation (Gaussian), > 0.
        config: The ball's geometry as an :class:`AscentConfig` (its ``norm``,
            ``adaptive`` and ``adaptive_eta``; the ascent settings do not apply), instead
            of the three keywords; its ``rho`` is replaced by ``rho``.
        norm: ``"l2"`` (default) or ``"linf"``.
        adaptive: Scale by s = |theta| + adaptive_eta elementwise (default False).
        adaptive_eta: eta >= 0 in the adaptive scale (default 0).
        num_probes: Number of random perturbations, >= 2.
        distribution: ``"sphere"`` or ``"gaussian"``.
        at: Flat parameter vector theta to measure around (default: the model's own).
        seed: Seed or generator.
        progress: Show a tqdm bar.

    Raises:
        TypeError: Both ``config`` and one of ``norm``, ``adaptive``, ``adaptive_eta``.
        NonFiniteLossError: theta or the loss at theta or a sample is NaN or infinite.
    """
    geometry = {
        k: v
        for k, v in (("norm", norm), ("adaptive", adaptive), ("adaptive_eta", adaptive_eta))
        if v is not None
    }
    cfg = resolve_config(rho, config, geometry, default_init=(), measure="average_sharpness")
    num_probes = check_positive_int("num_probes", num_probes, minimum=2)
    if distribution not in ("sphere", "gaussian"):
        raise ValueError(f"distribution must be 'sphere' or 'gaussian', not {distribution!r}")
    if distribution == "gaussian" and cfg.norm != "l2":
        raise ValueError("distribution='gaussian' is defined for norm='l2' only")
    gen = make_generator(seed)
    start = time.perf_counter()
    before = dict(objective.counts)
    theta = center_point(objective, at)
    with preserved(objective.model):
        ball = cfg.ball(theta)
        loss0 = objective.loss(theta)
        rises = []
        for _ in tqdm(
            range(num_probes), desc="average sharpness", disable=not progress, leave=False
        ):
            if distribution == "sphere":
                delta = ball.random_sphere(
                    objective.num_params, gen, device=objective.device, dtype=objective.dtype
                )
            else:
                xi = torch.randn(objective.num_params, generator=gen, dtype=torch.float64)
                delta = cfg.rho * xi.to(objective.device, objective.dtype)
                if ball.scale is not None:
                    delta = delta * ball.scale
            rises.append(objective.loss(theta + delta) - loss0)
    arr = np.asarray(rises, dtype=np.float64)
    return AverageSharpnessResult(
        value=float(arr.mean()),
        stderr=float(arr.std(ddof=1) / math.sqrt(arr.size)),
        loss=loss0,
        rho=cfg.rho,
        norm=cfg.norm,
        adaptive=cfg.adaptive,
        adaptive_eta=cfg.adaptive_eta,
        num_probes=num_probes,
        distribution=distribution,
        seed=seed if isinstance(seed, int) else None,
        num_losses=objective.counts["loss"] - before["loss"],
        num_gradients=objective.counts["gradient"] - before["gradient"],
        num_hvps=objective.counts["hvp"] - before["hvp"],
        seconds=time.perf_counter() - start,
    )
