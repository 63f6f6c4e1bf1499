"""Li et al.'s (2018) convexity map: |lambda_min / lambda_max| of the Hessian over a grid.

At each point theta_k = theta + a d1 (+ b d2) of a (coarse) grid, the extreme eigenvalues of
H(theta_k) come from :func:`flatlens.measures.hessian_eigenvalues` (Lanczos, ``which="LA"``
and ``"SA"``). A ratio near 0 means the loss is locally convex there (no strongly negative
curvature); values near or above 1 mark saddle-like, non-convex regions.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from torch import Tensor
from tqdm.auto import tqdm

from flatlens.core._checks import check_positive
from flatlens.core._memory import tracks_peak_memory
from flatlens.core._objective import Objective
from flatlens.core._renames import renamed
from flatlens.landscape._directions import Direction, as_direction, cosine
from flatlens.landscape._grid import Grid, Span, grid_axes, grid_points
from flatlens.landscape._storage import Landscape
from flatlens.measures._spectrum import hessian_eigenvalues

__all__ = ["curvature_map"]


@renamed(steps="num_points", max_iter="max_hvps")
@tracks_peak_memory
def curvature_map(
    objective: Objective,
    d1: Direction | Tensor,
    d2: Direction | Tensor | None = None,
    *,
    span: Span | tuple[Span, Span] = (-1.0, 1.0),
    num_points: int | tuple[int, int] = 9,
    tol: float = 1e-4,
    max_hvps: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Landscape:
    """lambda_max, lambda_min and |lambda_min / lambda_max| of H on a line or plane grid.

    Args:
        objective: The risk whose Hessian is taken.
        d1: First direction.
        d2: Second direction for a plane; ``None`` for a line.
        span: As in :func:`flatlens.landscape.line` / :func:`~flatlens.landscape.plane`.
        num_points: Points per axis (keep it small: each point costs two Lanczos runs).
        tol: Relative accuracy of each eigenvalue (certified by the Lanczos bound).
        max_hvps: HVP budget per Lanczos run.
        seed: Start-vector seed (the same at every point).
        progress: Show a tqdm bar.

    Returns:
        A :class:`Landscape` with metrics ``"lambda_max"``, ``"lambda_min"`` and ``"ratio"``
        (NaN where lambda_max is 0). ``settings["num_hvps"]`` counts the HVPs spent.
    """
    start = time.perf_counter()
    tol = check_positive("tol", tol)
    dirs = [as_direction(objective, d1)] + ([] if d2 is None else [as_direction(objective, d2)])
    coords, axes = grid_axes(span, num_points, ndim=len(dirs))  # type: ignore[arg-type]
    kind = "curvature_line" if len(dirs) == 1 else "curvature_plane"
    settings: dict[str, Any] = {"kind": kind, "span": axes["span"]}
    grid = Grid(coords, ["lambda_max", "lambda_min"])
    theta, vectors = objective.theta, [d.vector for d in dirs]
    lam_max, lam_min = grid.values["lambda_max"], grid.values["lambda_min"]
    start_hvps = objective.counts["hvp"]
    converged = True
    for k in tqdm(range(grid.size), desc="curvature", disable=not progress, leave=False):
        point = grid_points(theta, vectors, grid.coef[k : k + 1])[0]
        extreme = {
            which: hessian_eigenvalues(
                objective, 1, which=which, tol=tol, max_hvps=max_hvps, seed=seed, at=point
            )
            for which in ("LA", "SA")
        }
        lam_max[k] = float(extreme["LA"].eigenvalues[0])
        lam_min[k] = float(extreme["SA"].eigenvalues[0])
        converged = converged and all(bool(r.converged[0]) for r in extreme.values())
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(lam_max != 0, np.abs(lam_min / lam_max), np.nan)
    grid.values["ratio"] = ratio
    values, center_index = grid.shaped(), grid.center_index
    settings.update(
        {
            "num_points": list(grid.shape),
            "tol": tol,
            "max_hvps": max_hvps,
            "seed": seed,
            "num_hvps": objective.counts["hvp"] - start_hvps,
            "all_converged": converged,
            "dtype": str(objective.dtype),
            "device": str(objective.device),
        }
    )
    return Landscape(
        coords=coords,
        values=values,
        center_index=center_index,
        center={m: float(v[center_index]) for m, v in values.items()},
        directions=[d.to_dict() for d in dirs],
        cosine=cosine(dirs[0], dirs[1]) if len(dirs) == 2 else None,
        settings=settings,
        num_evaluated=grid.size,
        elapsed_s=time.perf_counter() - start,
    )
