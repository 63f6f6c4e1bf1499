"""How ``torch.distributed`` ranks share a landscape's grid, and the rounds that fill it.

* ``"data"``: every rank evaluates every point on its shard of the data; the (distributed)
  objective sums the shards, one all-reduce per chunk.
* ``"points"``: every rank holds all the data and evaluates its share of the points, with
  the objective's reduction off (``evaluate_points(..., local=True)``); the values are
  gathered after each round.

Either way every rank ends with the whole grid.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from flatlens import distributed as fd
from flatlens.core._objective import Objective
from flatlens.landscape._grid import Grid
from flatlens.landscape._storage import store_paths

__all__ = ["agree", "data_rounds", "distribution", "point_rounds"]

Run = Callable[[np.ndarray], dict[str, np.ndarray]]


def distribution(distribute: Any, objective: Objective) -> str | None:
    """How ranks share the work: None (this process alone), ``"data"`` or ``"points"``."""
    if distribute not in ("auto", "data", "points"):
        raise ValueError(f"distribute must be 'auto', 'data' or 'points', not {distribute!r}")
    if distribute == "auto":
        return "data" if objective.distributed else None
    if distribute == "data" and not objective.distributed:
        raise ValueError(
            "distribute='data' sums each rank's shard of the data, but the objective is not "
            "distributed; build it with Objective(..., distributed=True) inside an "
            "initialized torch.distributed process group"
        )
    if distribute == "points" and not fd.is_distributed():
        raise ValueError(
            "distribute='points' splits the grid across torch.distributed ranks, but no "
            "process group is initialized; start the processes with torchrun and call "
            "flatlens.distributed.init_from_env() (or torch.distributed.init_process_group)"
        )
    return distribute


def agree(
    fingerprint: str,
    center: dict[str, float],
    mode: str,
    store: str | os.PathLike | None,
) -> tuple[dict[str, float], bool]:
    """Check that every rank computes the same landscape.

    All ranks receive the same views and so raise (or not) together.

    Returns:
        Rank 0's centre values, and whether this rank writes ``store``: rank 0 does, and
        another rank only when its store path differs from rank 0's (a private copy, as the
        ``flatlens`` command gives every rank but 0).
    """
    path = None if store is None else str(store_paths(store)[0].resolve())
    views = fd.all_gather_object((fingerprint, center, path))
    if any(v[0] != views[0][0] for v in views):
        raise ValueError(
            "the ranks disagree on the weights, the directions or the grid (fingerprints "
            f"{[v[0] for v in views]}); give every rank the same model, directions (same "
            "seeds), span and num_points"
        )
    if mode == "points":
        ref = views[0][1]
        for r, (_, c, _) in enumerate(views):
            if set(c) != set(ref) or not all(
                math.isclose(c[m], ref[m], rel_tol=1e-6, abs_tol=1e-12) for m in ref
            ):
                raise ValueError(
                    f"distribute='points' needs the whole data set on every rank, but rank "
                    f"{r} has centre values {c} and rank 0 {ref}; when each rank holds a "
                    "shard of the data use distribute='data' (the default)"
                )
    writes = store is not None and (fd.is_main() or path != views[0][2])
    return dict(views[0][1]), writes


def data_rounds(grid: Grid, run: Run, chunk: int | Callable[[], int]) -> Iterator[int]:
    """Evaluate the missing points chunk by chunk, every rank (if any) every point; yield the
    number of points each chunk filled. ``chunk`` may be a callable asked before each chunk
    (the runner grows it after timing the first; every rank must see the same sizes)."""
    others = grid.others()
    todo = others[~grid.done[others]]  # a resumed grid evaluates only what is missing
    start = 0
    while start < len(todo):
        size = chunk() if callable(chunk) else chunk
        idx = todo[start : start + size]
        start += size
        grid.record(idx, run(idx))
        yield len(idx)


def point_rounds(grid: Grid, run: Run, chunk: int) -> Iterator[int]:
    """Split the missing points across ranks: in each round rank r evaluates the r-th chunk
    of ``chunk`` points, and every rank receives all of the round's values; yield the number
    of points each round filled."""
    others = grid.others()
    todo = others[~grid.done[others]]
    world, me = fd.world_size(), fd.rank()
    names = list(grid.values)
    for start in range(0, len(todo), chunk * world):
        block = todo[start : start + chunk * world]
        mine = block[me * chunk : (me + 1) * chunk]
        local = np.full((chunk, len(names)), np.nan)
        if len(mine):
            values = run(mine)
            for j, m in enumerate(names):
                local[: len(mine), j] = values[m]
        parts = fd.all_gather_tensor(torch.from_numpy(local))
        for q, part in enumerate(parts):
            idx = block[q * chunk : (q + 1) * chunk]
            if len(idx):
                rows = part.numpy()[: len(idx)]
                grid.record(idx, {m: rows[:, j] for j, m in enumerate(names)})
        yield len(block)
