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

from flatlens.core._objective import Objective
from flatlens.landscape._directions import Direction, as_direction, cosine
from flatlens.landscape._evaluate import Span, _pair, grid_axis
from flatlens.landscape._storage import Landscape
from flatlens.measures._spectrum import hessian_eigenvalues

__all__ = ["curvature_map"]


def curvature_map(
    objective: Objective,
    d1: Direction | Tensor,
    d2: Direction | Tensor | None = None,
    *,
    span: Span | tuple[Span, Span] = (-1.0, 1.0),
    steps: int | tuple[int, int] = 9,
    tol: float = 1e-3,
    max_iter: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Landscape:
    """lambda_max, lambda_min and |lambda_min / lambda_max| of H on a line or plane grid.

    Args:
        objective: The risk whose Hessian is taken.
        d1: First direction.
        d2: Second direction for a plane; ``None`` for a line.
        span: As in :func:`flatlens.landscape.line` / :func:`~flatlens.landscape.plane`.
        steps: Points per axis (keep it small: each point costs two Lanczos runs).
        tol: Relative accuracy of each eigenvalue (certified by the Lanczos bound).
        max_iter: HVP budget per Lanczos run.
        seed: Start-vector seed (the same at every point).
        progress: Show a tqdm bar.

    Returns:
        A :class:`Landscape` with metrics ``"lambda_max"``, ``"lambda_min"`` and ``"ratio"``
        (NaN where lambda_max is 0). ``settings["num_hvps"]`` counts the HVPs spent.
    """
    start = time.perf_counter()
    dirs = [as_direction(objective, d1)] + ([] if d2 is None else [as_direction(objective, d2)])
    if len(dirs) == 1:
        coords = [grid_axis(span, steps)]  # type: ignore[arg-type]
        settings: dict[str, Any] = {"kind": "curvature_line", "span": [list(span)]}
    else:
        spans, step_pair = _pair(span, "span"), _pair(steps, "steps")
        coords = [grid_axis(s, n) for s, n in zip(spans, step_pair, strict=True)]
        settings = {"kind": "curvature_plane", "span": [list(s) for s in spans]}
    shape = tuple(len(c) for c in coords)
    mesh = np.stack([m.reshape(-1) for m in np.meshgrid(*coords, indexing="ij")], axis=1)
    theta = objective.theta
    lam_max = np.full(len(mesh), np.nan)
    lam_min = np.full(len(mesh), np.nan)
    start_hvps = objective.counts["hvp"]
    converged = True
    for k in tqdm(range(len(mesh)), desc="curvature", disable=not progress, leave=False):
        point = theta
        for j, d in enumerate(dirs):
            point = point + float(mesh[k, j]) * d.vector
        top = hessian_eigenvalues(
            objective, 1, which="LA", tol=tol, max_iter=max_iter, seed=seed, at=point
        )
        bottom = hessian_eigenvalues(
            objective, 1, which="SA", tol=tol, max_iter=max_iter, seed=seed, at=point
        )
        lam_max[k], lam_min[k] = float(top.eigenvalues[0]), float(bottom.eigenvalues[0])
        converged = converged and bool(top.converged[0]) and bool(bottom.converged[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(lam_max != 0, np.abs(lam_min / lam_max), np.nan)
    center_index = tuple(int(np.flatnonzero(c == 0.0)[0]) for c in coords)
    values = {
        "lambda_max": lam_max.reshape(shape),
        "lambda_min": lam_min.reshape(shape),
        "ratio": ratio.reshape(shape),
    }
    settings.update(
        {
            "steps": list(shape),
            "tol": tol,
            "max_iter": max_iter,
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
        num_evaluated=len(mesh),
        elapsed_s=time.perf_counter() - start,
    )
