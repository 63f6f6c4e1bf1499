"""The worst-case ascent shared by R0 and R1: one engine, two ascended functions.

Both measures maximize some f(delta) over the ball B(theta, rho) of an
:class:`~flatlens.measures.AscentConfig`: R0 ascends f(delta) = L(theta + delta), R1 ascends
f(delta) = ||grad L(theta + delta)||_*. :func:`worst_case_ascent` builds the ball around theta
(the model's parameters, or the point ``at``), the starts on the sphere
(:func:`~flatlens.measures._starts.sphere_starts`) and keeps the best Auto-PGD run
(:func:`~flatlens.measures._apgd.multi_start_ascent`), on the whole data or on every batch
("m-sharpness"), with the model preserved. The pieces live in private modules:

* :mod:`~flatlens.measures._ball`: the four norm balls and their projections;
* :mod:`~flatlens.measures._apgd`: the projected-ascent solver;
* :mod:`~flatlens.measures._starts`: the start points;
* :mod:`~flatlens.measures._config`: :class:`AscentConfig`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

from flatlens.core._checks import make_generator
from flatlens.core._errors import NonFiniteLossError
from flatlens.core._objective import Objective
from flatlens.core._params import preserved
from flatlens.core._results import MeasureResult
from flatlens.core._sums import vector_norm
from flatlens.measures._apgd import AscentFn, AscentResult, multi_start_ascent
from flatlens.measures._ball import Ball
from flatlens.measures._config import AscentConfig, check_init
from flatlens.measures._spectrum import EigenResult
from flatlens.measures._starts import sphere_starts

__all__ = [
    "AscentConfig",
    "Ball",
    "CenterFn",
    "SolvedBall",
    "WorstCase",
    "WorstCaseResult",
    "batch_objectives",
    "center_point",
    "combine_batches",
    "count_difference",
    "resolution_note",
    "run_measure",
    "worst_case_ascent",
]

S = TypeVar("S")

CenterFn = Callable[[Objective, Ball, Tensor], tuple[float, Tensor]]
"""``center(objective, ball, theta) -> (f(0), grad L(theta))``: the ascended function at the
center of the ball and the loss gradient there (for the ``"gradient"`` start)."""


def center_point(objective: Objective, at: Tensor | None) -> Tensor:
    """theta: ``at`` (checked by :meth:`Objective.point`) or the model's parameters.

    Raises:
        NonFiniteLossError: theta has a NaN or infinite entry (a ball around it is
            meaningless even where a saturating layer keeps the loss finite).
    """
    theta = objective.point(at)
    if not bool(torch.isfinite(theta).all()):
        where = "`at`" if at is not None else "the model's parameters"
        raise NonFiniteLossError(
            f"{where} have NaN or infinite entries; check the weights for NaN/inf"
        )
    return theta


# ---------------------------------------------------------------------------------- batches
def batch_objectives(objective: Objective) -> Iterator[tuple[Objective, int]]:
    """One :class:`Objective` per batch of ``objective``'s data, with the batch weight w_b.

    Batches are produced lazily (one data pass). Each per-batch objective keeps every
    setting of ``objective`` (:meth:`Objective.replace`), caches its first-order graph, and
    reduces over this process only. Combine the per-batch values with
    :func:`combine_batches`.
    """
    for x, y, n in objective.batches():
        yield objective.replace(data=[(x, y)], cache_graph=True, distributed=False), n


def combine_batches(values: Sequence[float], sizes: Sequence[int], reduction: str) -> float:
    """Combine per-batch values like the risk combines per-batch losses.

    ``mean``: sum_b n_b v_b / sum_b n_b; ``sum``: sum_b v_b.
    """
    if not values:
        raise ValueError("data is empty: it yielded no batches")
    if reduction == "sum":
        return float(sum(values))
    return float(sum(n * v for n, v in zip(sizes, values, strict=True)) / sum(sizes))


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


# ---------------------------------------------------------------------------------- R0 and R1
@dataclass(kw_only=True)
class WorstCaseResult(MeasureResult):
    """The fields R0 and R1 share: the perturbation found, the settings (flat, and as
    ``config``: the :class:`AscentConfig` used, ``init`` resolved), the winning start, the
    evaluations spent and the time. See :class:`~flatlens.measures.SharpnessResult` and
    :class:`~flatlens.measures.FlatnessResult`.

    Attributes:
        value: The measure; with ``per_batch`` the batch-weighted mean of per-batch values.
        delta_norm: ||delta||_B of the best perturbation (<= rho; the largest over batches).
        delta_l2: Its Euclidean norm (the largest over batches).
        best_start: Which start's run won (``"gradient"``, ``"+eigen0"``, ``"random0"``,
            ``"given0"`` or ``"center"``); empty with ``per_batch``.
        start_values: Best value reached from each start (single-batch runs only).
        num_losses, num_gradients, num_hvps: Evaluations spent (over all batch objectives
            with ``per_batch``; HVPs include the Lanczos run of the ``"eigen"`` start).
        seconds: Wall-clock time.
        batch_values: Per-batch values with ``per_batch``, else ``None``.
        notes: Why the value may mean little, e.g. a radius below the resolution of the
            parameters' dtype (see :func:`resolution_note`); empty when none applies.
        delta: The best perturbation (not in ``to_dict``; ``None`` with ``per_batch``).
    """

    value: float
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
    config: AscentConfig
    batch_values: list[float] | None = None
    notes: list[str] = field(default_factory=list)
    delta: Tensor | None = field(default=None, metadata={"json": False})


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
        config: The settings, ``init`` resolved.
        solved: One :class:`SolvedBall` (or one per batch with ``per_batch``).
        sizes: The batch sizes (``[1]`` without ``per_batch``).
        reduction: The objective's reduction, for :meth:`combine`.
        counts: Loss, gradient and HVP evaluations spent.
        seconds: Wall-clock time.
        per_batch: Whether each batch was solved on its own.
        seed: The integer seed (``None`` when a generator was given).
        notes: See :attr:`WorstCaseResult.notes`.
    """

    config: AscentConfig
    solved: list[SolvedBall]
    sizes: list[int]
    reduction: str
    counts: dict[str, int]
    seconds: float
    per_batch: bool
    seed: int | None
    notes: list[str] = field(default_factory=list)

    def combine(self, values: Sequence[float]) -> float:
        """Per-solution values combined like the risk combines batches
        (:func:`combine_batches`)."""
        return combine_batches(values, self.sizes, self.reduction)

    def result_fields(self, batch_values: list[float]) -> dict[str, Any]:
        """The fields :class:`~flatlens.measures.SharpnessResult` and
        :class:`~flatlens.measures.FlatnessResult` share: the perturbation found, the
        settings (flat, and as ``config``), the winning start, the counts and the time.
        ``batch_values`` (the per-batch measure) is kept only with ``per_batch``."""
        cfg = self.config
        single = None if self.per_batch else self.solved[0].ascent
        return {
            "delta_norm": max(s.ball.norm_of(s.ascent.delta) for s in self.solved),
            "delta_l2": max(float(vector_norm(s.ascent.delta)) for s in self.solved),
            "rho": cfg.rho,
            "norm": cfg.norm,
            "adaptive": cfg.adaptive,
            "adaptive_eta": cfg.adaptive_eta,
            "steps": cfg.steps,
            "restarts": cfg.restarts,
            "init": list(cfg.init or ()),
            "step_size": cfg.step_size,
            "momentum": cfg.momentum,
            "per_batch": self.per_batch,
            "seed": self.seed,
            "best_start": "" if single is None else single.best_start,
            "start_values": {} if single is None else single.start_values,
            "num_losses": self.counts["loss"],
            "num_gradients": self.counts["gradient"],
            "num_hvps": self.counts["hvp"],
            "seconds": self.seconds,
            "config": cfg,
            "batch_values": batch_values if self.per_batch else None,
            "notes": list(self.notes),
            "delta": None if single is None else single.delta,
        }


def resolution_note(theta: Tensor, config: AscentConfig) -> str | None:
    """A note when the radius is below the resolution of the parameters' dtype at theta.

    A perturbation in the ball changes a typical coordinate by the relative amount
    r = rho / ||theta|| (l2 ball), rho sqrt(n) / ||theta|| (linf), rho / sqrt(n) (adaptive
    l2, where the ball is measured relative to |theta|) or rho (adaptive linf). When r is
    below the dtype's machine epsilon, theta + delta rounds to theta in most coordinates:
    R0 then comes out 0 (or rounding noise) and R1 is rho ||grad L(theta)||, whatever the
    curvature, so the bound check R0 <= R1 holds vacuously.

    Returns:
        The note, or None when the radius is resolved.
    """
    if not theta.is_floating_point() or theta.numel() == 0:
        return None
    eps = torch.finfo(theta.dtype).eps
    n = theta.numel()
    if config.adaptive:
        relative = config.rho / n**0.5 if config.norm == "l2" else config.rho
    else:
        size = float(torch.linalg.vector_norm(theta.detach().double()))
        if not size > 0:
            return None
        relative = config.rho * (1.0 if config.norm == "l2" else n**0.5) / size
    if relative >= eps:
        return None
    dtype = str(theta.dtype).removeprefix("torch.")
    return (
        f"rho = {config.rho:g} is below the resolution of {dtype} at theta: a perturbation "
        f"of that size changes a typical parameter by about {relative:.1g} of its size, under "
        f"{dtype}'s machine epsilon {eps:.1g}, so theta + delta rounds to theta and R0 and R1 "
        "at this radius mean little (R0 <= R1 holds vacuously); use a larger radius or "
        "float64"
    )


def hvp_equivalents(counts: dict[str, int]) -> float:
    """Cost in HVP-equivalents: an HVP counts 1, a gradient 1/2, a loss 1/4."""
    return counts["hvp"] + counts["gradient"] / 2 + counts["loss"] / 4


def fit_budget(
    points: list[tuple[str, Tensor]], left: float, eval_cost: float, max_steps: int
) -> tuple[list[tuple[str, Tensor]], int]:
    """The starts and steps per start whose ascent costs at most ``left`` HVP-equivalents.

    A start with s steps evaluates f s + 1 times at ``eval_cost`` each (the last value only
    is cheaper; counted in full). Starts are dropped from the end while even one step each
    does not fit; at least one start with one step always runs.
    """
    points = list(points)
    while len(points) > 1 and left < 2 * eval_cost * len(points):
        points.pop()
    per_start = left / (eval_cost * max(len(points), 1))
    return points, max(1, min(max_steps, int(per_start) - 1))


def worst_case_ascent(
    objective: Objective,
    config: AscentConfig,
    *,
    center: CenterFn,
    function: Callable[[Objective, Ball, Tensor], AscentFn],
    desc: str,
    eval_cost: float,
    at: Tensor | None = None,
    starts: Sequence[Tensor] | None = None,
    eigen: EigenResult | Tensor | None = None,
    per_batch: bool = False,
    seed: int | torch.Generator = 0,
    progress: bool = False,
) -> WorstCase:
    """The shared body of R0 and R1: maximize f over the ball around theta on the whole
    objective or on each batch, with the model preserved.

    theta is ``at`` when given (checked by :meth:`Objective.point`), else the model's
    parameters. In each ball (see :func:`run_measure` for ``per_batch``) ``center`` gives f(0)
    and the loss gradient at theta, ``function`` the oracle of f, and the best
    :func:`~flatlens.measures._apgd.multi_start_ascent` run from the
    :func:`~flatlens.measures._starts.sphere_starts` is kept. ``desc`` labels the progress
    bar; ``eval_cost`` is one evaluation of f's value and gradient in HVP-equivalents (for
    ``config.budget``); the other arguments are those of
    :func:`flatlens.measures.zeroth_order_sharpness`.

    Raises:
        ValueError: No start at all, ``per_batch`` with precomputed ``eigen`` or
            ``starts``, or a malformed ``at``.
        NonFiniteLossError: Non-finite parameters, loss or ascended value.
    """
    if config.init is None:
        raise ValueError("config.init must be resolved to the measure's start kinds")
    check_init(config, starts)
    if per_batch and (eigen is not None or starts):
        raise ValueError("per_batch=True computes eigenvectors and starts per batch; drop them")
    generator = make_generator(seed)
    theta = center_point(objective, at)
    ball = config.ball(theta)
    note = resolution_note(theta, config)

    used = {"steps": config.steps}

    def solve(obj: Objective) -> SolvedBall:
        before = dict(obj.counts)
        value, gradient = center(obj, ball, theta)
        points = sphere_starts(
            obj,
            ball,
            theta,
            init=config.init or (),
            restarts=config.restarts,
            gradient=gradient,
            generator=generator,
            eigen=eigen,
            num_eigen=config.num_eigen,
            eigen_tol=config.eigen_tol,
            basis={"basis_device": config.basis_device, "basis_dtype": config.basis_dtype},
            eigen_max_hvps=None
            if config.budget is None
            else max(2 * config.num_eigen + 1, int(0.3 * config.budget)),
            starts=starts,
        )
        steps = config.steps
        if config.budget is not None:
            left = config.budget - hvp_equivalents(count_difference(before, obj.counts))
            points, steps = fit_budget(points, left, eval_cost, config.steps)
        used["steps"] = steps
        best = multi_start_ascent(
            function(obj, ball, theta),
            ball,
            points,
            steps,
            center_value=value,
            step_size=config.step_size,
            momentum=config.momentum,
            progress=progress,
            desc=desc,
        )
        return SolvedBall(value, best, ball)

    solved, sizes, counts, seconds = run_measure(objective, solve, per_batch=per_batch)
    return WorstCase(
        config=dataclasses.replace(config, steps=used["steps"]),
        solved=solved,
        sizes=sizes,
        reduction=objective.reduction,
        counts=counts,
        seconds=seconds,
        per_batch=per_batch,
        seed=seed if isinstance(seed, int) else None,
        notes=[] if note is None else [note],
    )
