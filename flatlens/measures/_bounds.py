"""The bound check: zeroth-order sharpness, first-order flatness and lambda_max side by side.

For the l2 ball of radius rho around theta (Zhang et al., CVPR 2023):

* R0 <= R1 everywhere: L(theta + delta) - L(theta) = <grad L(xi), delta> for some xi on the
  segment (mean value theorem), and |<grad L(xi), delta>| <= rho * ||grad L(xi)|| <= R1.
* at a minimum where L is quadratic in the ball, R1 = rho^2 lambda_max and
  R0 = rho^2 lambda_max / 2, so R1 / rho^2 -> lambda_max and R0 / rho^2 -> lambda_max / 2
  as rho -> 0.

:func:`check_bound` measures all three for several radii; :class:`BoundReport` prints them,
holds them as JSON and draws R0/rho^2, R1/rho^2 and lambda_max against rho.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flatlens.core._checks import check_positive, check_rho, make_generator
from flatlens.core._io import write_figure
from flatlens.core._memory import tracks_peak_memory
from flatlens.core._objective import Objective
from flatlens.core._params import preserved
from flatlens.core._results import MeasureResult
from flatlens.core._text import literal
from flatlens.measures._ascent import center_point, count_difference
from flatlens.measures._config import AscentConfig, AscentSettings, resolve_config
from flatlens.measures._flatness import first_order_flatness
from flatlens.measures._operators import SymmetricOperator
from flatlens.measures._sharpness import zeroth_order_sharpness
from flatlens.measures._spectrum import hessian_eigenvalues

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["BoundReport", "BoundRow", "check_bound", "plot_bound_rows"]


@dataclass
class BoundRow:
    """The measures at one radius.

    Attributes:
        rho: The radius.
        r0: Zeroth-order sharpness max L(theta + delta) - L(theta) (found by ascent).
        r1: First-order flatness rho * max ||grad L(theta + delta)|| (found by ascent).
        lambda_max: Top Hessian eigenvalue at theta (the same for every row).
        rho2_lambda: rho^2 lambda_max, the value of R1 at a minimum for small rho.
        r1_ratio: R1 / (rho^2 lambda_max) (NaN when lambda_max <= 0).
        r0_over_rho2, r1_over_rho2: R0 / rho^2 and R1 / rho^2, the plotted curves.
        holds: Whether R0 <= R1.
        grad_norm_at_center: ||grad L(theta)||.
        max_grad_norm: The largest ||grad L(theta + delta)|| found.
        notes: Why the row may mean little (a radius below the resolution of the
            parameters' dtype: :func:`~flatlens.measures._ascent.resolution_note`).
    """

    rho: float
    r0: float
    r1: float
    lambda_max: float
    rho2_lambda: float
    r1_ratio: float
    r0_over_rho2: float
    r1_over_rho2: float
    holds: bool
    grad_norm_at_center: float
    max_grad_norm: float
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclass
class BoundReport(MeasureResult):
    """R0, R1 and lambda_max for several radii (:func:`check_bound`).

    Attributes:
        rows: One :class:`BoundRow` per radius, ascending.
        lambda_max: Top Hessian eigenvalue (Lanczos); of S H S in the adaptive ball.
        lambda_error_bound: Its certified error bound.
        all_hold: Whether R0 <= R1 in every row.
        loss: L(theta).
        steps, restarts, eigen_tol, adaptive, adaptive_eta: The settings used.
        num_losses, num_gradients, num_hvps: Evaluations spent in total.
        seconds: Wall-clock time.
        notes: The rows' notes, each once.
    """

    rows: list[BoundRow]
    lambda_max: float
    lambda_error_bound: float
    all_hold: bool
    loss: float
    steps: int
    restarts: int
    eigen_tol: float
    seed: int | None
    num_losses: int
    num_gradients: int
    num_hvps: int
    seconds: float
    adaptive: bool = False
    adaptive_eta: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)

    def table(self) -> str:
        """The rows as an aligned plain-text table."""
        header = ["rho", "R0", "R1", "rho^2 lam", "R1/(rho^2 lam)", "R0<=R1"]
        lines = [
            [
                f"{r.rho:.3g}",
                f"{r.r0:.4g}",
                f"{r.r1:.4g}",
                f"{r.rho2_lambda:.4g}",
                f"{r.r1_ratio:.4g}",
                "yes" if r.holds else "NO",
            ]
            for r in self.rows
        ]
        widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:>{w}}}" for w in widths)
        out = [f"lambda_max = {self.lambda_max:.6g}", fmt.format(*header)]
        out += [fmt.format(*c) for c in lines]
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str | os.PathLike, *, title: str = "") -> Path:
        """Draw R0/rho^2, R1/rho^2 and lambda_max against rho to a PNG (see
        :func:`plot_bound_rows`)."""
        return plot_bound_rows(self.rows, path, title=title)


def _row_dict(row: BoundRow | Mapping[str, Any]) -> Mapping[str, Any]:
    return asdict(row) if isinstance(row, BoundRow) else row


def plot_bound_rows(
    rows: Sequence[BoundRow | Mapping[str, Any]], path: str | os.PathLike, *, title: str = ""
) -> Path:
    """Plot a bound check: R0/rho^2 and R1/rho^2 against rho (log x-axis), with lambda_max
    and lambda_max / 2 as horizontal lines and rows where R0 > R1 marked in red.

    Args:
        rows: :class:`BoundRow` objects or their dictionaries (e.g. from ``to_dict()``).
        path: Output file; the format follows the suffix (PNG for ``.png``). Written
            atomically, without pyplot (no interactive backend is touched).
        title: Figure title.

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure

    data = [_row_dict(r) for r in rows]
    if not data:
        raise ValueError("no rows to plot")
    data.sort(key=lambda r: r["rho"])
    rho = [float(r["rho"]) for r in data]
    r0 = [_num(r["r0"]) / float(r["rho"]) ** 2 for r in data]
    r1 = [_num(r["r1"]) / float(r["rho"]) ** 2 for r in data]
    lam = _num(data[0]["lambda_max"])
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(rho, r1, "o-", color="#c05621", label="R1 / ρ²  (first-order flatness)")
    ax.plot(rho, r0, "s-", color="#2b6cb0", label="R0 / ρ²  (zeroth-order sharpness)")
    if math.isfinite(lam):
        ax.axhline(lam, color="black", lw=1, label=f"λ_max = {lam:.4g}")
        ax.axhline(lam / 2, color="black", lw=1, ls="--", label="λ_max / 2")
    bad = [i for i, r in enumerate(data) if not r["holds"]]
    if bad:
        ax.plot(
            [rho[i] for i in bad], [r0[i] for i in bad], "x", color="red", ms=10, label="R0 > R1"
        )
    ax.set_xscale("log")
    values = [v for v in [*r0, *r1, lam, lam / 2] if math.isfinite(v)]
    if values and min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("ρ (radius of the l2 ball)")
    ax.set_ylabel("value / ρ²")
    ax.set_title(literal(title) if title else "R0 ≤ R1, and R1/ρ² → λ_max at a minimum")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return write_figure(fig, path)


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _scaled_hessian(objective: Objective, theta: torch.Tensor, scale: torch.Tensor):
    """S H S at theta as an operator (S = diag(scale)): the curvature of the adaptive ball
    in its own coordinates u = delta / s."""

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return scale * objective.hvp(scale * v, at=theta)

    return SymmetricOperator(
        matvec, objective.num_params, dtype=objective.dtype, device=objective.device
    )


def _check_rhos(rhos: object) -> list[float]:
    if isinstance(rhos, numbers.Real):
        rhos = [rhos]
    if isinstance(rhos, str) or not isinstance(rhos, Iterable):
        raise TypeError(f"rhos must be a sequence of radii, not {type(rhos).__name__}")
    values = sorted({check_rho(r, "each rho") for r in rhos})
    if not values:
        raise ValueError("rhos is empty: pass at least one radius > 0")
    tiny, top = torch.finfo(torch.float64).tiny, torch.finfo(torch.float64).max
    for rho in values:  # R0 / rho^2 and rho^2 lambda_max need rho^2 as a normal number
        if not tiny <= rho * rho <= top:
            raise ValueError(
                f"the square of the radius {rho:g} is not a normal float64 number (it "
                f"{'underflows' if rho < 1 else 'overflows'}); use radii from "
                f"{math.sqrt(tiny):.2g} to {math.sqrt(top):.2g}"
            )
    return values


@tracks_peak_memory
def check_bound(
    objective: Objective,
    rhos: Sequence[float] | float,
    *,
    config: AscentConfig | None = None,
    eigen_tol: float = 1e-4,
    at: torch.Tensor | None = None,
    seed: int | torch.Generator = 0,
    progress: bool = False,
    **settings: Unpack[AscentSettings],
) -> BoundReport:
    """Measure R0, R1 and lambda_max in the l2 ball for each radius and check R0 <= R1.

    lambda_max and its eigenvector come from one Lanczos run and are reused as a start of
    both ascents at every radius; R1's ascent also starts from R0's maximizer (where, by
    the mean value theorem, some point of the segment has ||grad L|| >= R0 / rho). Since both
    maxima are found by ascent (lower bounds on the true maxima), a row with R0 > R1 means
    R1's ascent needs more ``steps`` or ``restarts``, not that the theorem fails.

    In the adaptive ball ||delta / s|| <= rho (s = |theta| + adaptive_eta) the same holds
    with lambda_max the top eigenvalue of S H S, S = diag(s): R1 -> rho^2 lambda_max(S H S).

    Args:
        objective: The empirical risk L.
        rhos: Radii (> 0); sorted and deduplicated.
        config: The ascent settings of both measures at once (:class:`AscentConfig`; its
            ``rho`` is replaced by each radius), instead of keyword settings.
        eigen_tol: Relative tolerance of lambda_max.
        at: Flat parameter vector theta to measure around (default: the model's own).
        seed: Seed or generator.
        progress: Show tqdm bars.
        **settings: Fields of :class:`AscentConfig` for both ascents: ``steps`` (default
            20), ``restarts`` (default 1), ``adaptive``, ``adaptive_eta``, ``init``,
            ``budget``, ``basis_device`` and ``basis_dtype`` (also those of the lambda_max
            Lanczos basis, as for :func:`~flatlens.measures.hessian_eigenvalues`) and the
            rest. ``norm`` must be ``"l2"``: lambda_max is the curvature of the l2 ball.

    Returns:
        A :class:`BoundReport`; the model is left exactly as it was.

    Raises:
        ValueError: ``norm="linf"``, or a setting out of range.
        NonFiniteLossError: theta or the loss at theta or in a ball is NaN or infinite.
    """
    radii = _check_rhos(rhos)
    base = resolve_config(radii[0], config, settings, default_init=(), measure="check_bound")
    if base.norm != "l2":
        raise ValueError(
            f"check_bound compares R1 / rho^2 with lambda_max, the curvature of the l2 ball; "
            f"norm={base.norm!r} has no such limit: measure zeroth_order_sharpness and "
            "first_order_flatness in that norm directly"
        )
    given_init = config.init if config is not None else settings.get("init")
    eigen_tol = check_positive("eigen_tol", eigen_tol)
    gen = make_generator(seed)
    theta = center_point(objective, at)
    start = time.perf_counter()
    before = dict(objective.counts)
    rows = []
    with preserved(objective.model):
        scale = base.ball(theta).scale
        basis = {"basis_device": base.basis_device, "basis_dtype": base.basis_dtype}
        if scale is None:
            eig = hessian_eigenvalues(
                objective, 1, tol=eigen_tol, seed=gen, progress=progress, at=theta, **basis
            )
        else:
            scaled = _scaled_hessian(objective, theta, scale)
            eig = hessian_eigenvalues(
                scaled, 1, tol=eigen_tol, seed=gen, progress=progress, **basis
            )
        lam = eig.value
        loss = math.nan
        for rho in radii:
            cfg = dataclasses.replace(base, rho=rho, init=given_init)
            common = {"config": cfg, "eigen": eig, "seed": gen, "at": theta}
            r0 = zeroth_order_sharpness(objective, rho, **common, progress=progress)
            extra = [r0.delta] if r0.delta is not None and bool((r0.delta != 0).any()) else None
            r1 = first_order_flatness(objective, rho, **common, starts=extra, progress=progress)
            loss = r0.loss
            rho2_lam = rho * rho * lam
            rows.append(
                BoundRow(
                    rho=rho,
                    r0=r0.value,
                    r1=r1.value,
                    lambda_max=lam,
                    rho2_lambda=rho2_lam,
                    r1_ratio=r1.value / rho2_lam if lam > 0 else math.nan,
                    r0_over_rho2=r0.value / rho**2,
                    r1_over_rho2=r1.value / rho**2,
                    holds=r0.value <= r1.value,
                    grad_norm_at_center=r1.grad_norm_at_center,
                    max_grad_norm=r1.max_grad_norm,
                    notes=list(dict.fromkeys([*r0.notes, *r1.notes])),
                )
            )
    counts = count_difference(before, objective.counts)
    return BoundReport(
        rows=rows,
        lambda_max=lam,
        lambda_error_bound=float(eig.error_bounds[0]),
        all_hold=all(r.holds for r in rows),
        loss=loss,
        steps=base.steps,
        restarts=base.restarts,
        eigen_tol=eigen_tol,
        adaptive=base.adaptive,
        adaptive_eta=base.adaptive_eta,
        seed=seed if isinstance(seed, int) else None,
        num_losses=counts["loss"],
        num_gradients=counts["gradient"],
        num_hvps=counts["hvp"],
        seconds=time.perf_counter() - start,
        notes=list(dict.fromkeys(n for r in rows for n in r.notes)),
    )
