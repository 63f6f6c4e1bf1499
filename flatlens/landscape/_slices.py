"""1-D and 2-D slices of the loss landscape: L(theta + a d1) and L(theta + a d1 + b d2)."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from torch import Tensor

from flatlens.core._objective import Objective
from flatlens.core._points import MetricsArg
from flatlens.core._renames import renamed
from flatlens.landscape._directions import Direction
from flatlens.landscape._evaluate import Distribute, Method, evaluate_grid
from flatlens.landscape._grid import Span, check_trajectory, grid_axes
from flatlens.landscape._storage import Landscape

__all__ = ["line", "plane"]


@renamed(steps="num_points")
def line(
    objective: Objective,
    direction: Direction | Tensor,
    *,
    span: Span = (-1.0, 1.0),
    num_points: int = 51,
    metrics: MetricsArg = None,
    method: Method = "auto",
    chunk_size: int | None = None,
    store: str | os.PathLike | None = None,
    save_interval_s: float = 1.0,
    callback: Callable[[int, int], None] | None = None,
    progress: bool = False,
    distribute: Distribute = "auto",
) -> Landscape:
    """The 1-D slice a -> L(theta + a d) (and other metrics) for a on a grid over ``span``.

    Args:
        objective: The risk L and the centre theta (the model's current parameters).
        direction: A :class:`Direction` or a flat tensor d.
        span: ``(lo, hi)`` with lo <= 0 <= hi.
        num_points: Grid points (0 is added when the spacing misses it; see :func:`grid_axis`).
        metrics: Besides the loss (always held): ``"accuracy"`` and callables
            ``m(outputs, targets) -> scalar tensor``, stored under their ``__name__``, or a
            mapping ``{name: m}``. A callable's per-batch values m_b are combined as
            (1/N) sum_b n_b m_b (a mean over samples), or as sum_b m_b when
            ``m.reduction == "sum"``; see :meth:`Objective.evaluate_points`. Default: the
            loss, plus accuracy when the task is classification (2-D outputs, integer
            targets). Points where a value is NaN or infinite keep it (far from the minimum
            the loss may overflow); only a non-finite loss at the centre raises.
        method: ``"vmap"`` (batched points), ``"serial"`` (one forward per point) or
            ``"auto"``: vmap on accelerators, falling back to serial if vmap fails; serial on
            the CPU, where it measured faster (docs/benchmarks-landscape.md).
        chunk_size: Points per data pass (and per vmap call); default from a memory
            estimate for vmap; for serial 16, then, in one process, as many as take about
            0.2 s (at most 256) once the first chunk is timed. Serial values do not depend
            on the chunk size.
        store: Path (``.npz`` + ``.json``) to keep progress in and resume from.
        save_interval_s: Write the store at most this often (seconds), and on exit.
        callback: Called as ``callback(done, total)`` after each chunk (on every rank).
        progress: Show a tqdm bar (on rank 0 only when the ranks work together).
        distribute: How ``torch.distributed`` ranks share the grid. ``"data"``: every rank
            evaluates every point on its shard of the data and the (distributed) objective
            sums the shards, one all-reduce per chunk. ``"points"``: each rank holds the
            whole data set and evaluates a ``1/world_size`` share of the points on its own
            data (``evaluate_points(..., local=True)``); the values are gathered after every
            round of chunks. ``"auto"``: ``"data"`` when ``objective.distributed``, else
            this process alone. When ranks work together every rank returns the whole grid
            and only rank 0 reads and writes ``store``. A ``"points"`` grid equals the
            one-process grid; a ``"data"`` grid differs in the last bits (the shard sums
            round differently).

    Returns:
        A :class:`Landscape` with ``coords = [a]`` and ``values[m]`` of shape ``(len(a),)``.

    Raises:
        NonFiniteLossError: the loss at the centre is NaN or infinite.
    """
    coords, axes = grid_axes(span, num_points, ndim=1)
    return evaluate_grid(
        objective,
        [direction],
        coords,
        metrics=metrics,
        trajectory=None,
        method=method,
        chunk_size=chunk_size,
        store=store,
        save_interval_s=save_interval_s,
        callback=callback,
        progress=progress,
        distribute=distribute,
        extra_settings={"kind": "line", **axes},
    )


@renamed(steps="num_points")
def plane(
    objective: Objective,
    d1: Direction | Tensor,
    d2: Direction | Tensor,
    *,
    span: Span | tuple[Span, Span] = (-1.0, 1.0),
    num_points: int | tuple[int, int] = (51, 51),
    metrics: MetricsArg = None,
    trajectory: np.ndarray | None = None,
    method: Method = "auto",
    chunk_size: int | None = None,
    store: str | os.PathLike | None = None,
    save_interval_s: float = 1.0,
    callback: Callable[[int, int], None] | None = None,
    progress: bool = False,
    distribute: Distribute = "auto",
) -> Landscape:
    """The 2-D slice (a, b) -> L(theta + a d1 + b d2) on a grid (Li et al., 2018).

    The directions are used as given: they are not orthogonalized, and their cosine is
    reported in ``Landscape.cosine``.

    Args:
        objective: The risk L and the centre theta.
        d1, d2: Directions (:class:`Direction` or flat tensors).
        span: ``(lo, hi)`` for both axes or ``((lo1, hi1), (lo2, hi2))``.
        num_points: Points per axis, an integer or a pair.
        trajectory: Optional ``(T, 2)`` coordinates to overlay in plots (e.g.
            ``PCADirections.coordinates``).
        metrics: As in :func:`line` (likewise ``method``, ``chunk_size``, ``store``,
            ``save_interval_s``, ``callback``, ``progress`` and ``distribute``).

    Returns:
        A :class:`Landscape` with ``values[m][i, j]`` at ``(coords[0][i], coords[1][j])``.

    Raises:
        NonFiniteLossError: the loss at the centre is NaN or infinite.
    """
    coords, axes = grid_axes(span, num_points, ndim=2)
    return evaluate_grid(
        objective,
        [d1, d2],
        coords,
        metrics=metrics,
        trajectory=check_trajectory(trajectory, 2),
        method=method,
        chunk_size=chunk_size,
        store=store,
        save_interval_s=save_interval_s,
        callback=callback,
        progress=progress,
        distribute=distribute,
        extra_settings={"kind": "plane", **axes},
    )
