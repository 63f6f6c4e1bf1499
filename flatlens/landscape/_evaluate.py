"""1-D and 2-D slices of the loss landscape: L(theta + a d1) and L(theta + a d1 + b d2).

Every grid holds the origin a = b = 0 exactly, and the value there is the objective's own
``Objective.evaluate()`` (so it equals ``objective.loss()`` bit for bit). The other points are
evaluated in chunks, one data pass per chunk, by a vmapped or a serial evaluator (see
:mod:`flatlens.landscape._engines`); the model is never written to, and its train/eval flags
come back as they were.

With ``store=path`` the grid is written to ``path`` (``.npz`` + ``.json``) as it fills. A
run started again with the same arguments skips what the store holds and ends with the same
arrays as one uninterrupted run; different arguments are refused.

Under ``torch.distributed`` (``distribute=``, see :func:`plane`) a landscape is computed by
all ranks together: either every rank evaluates every point on its shard of the data and the
objective sums the shards (``"data"``), or the points are split across ranks that each hold
all the data (``"points"``). Every rank returns the whole grid; only rank 0 reads and
writes the store (the others receive its contents), so resuming works in both modes and on
nodes without a shared file system.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from flatlens import distributed as fd
from flatlens.core._objective import Objective
from flatlens.core._params import eval_mode
from flatlens.landscape._directions import Direction, as_direction, cosine
from flatlens.landscape._engines import SerialEvaluator, VmapEvaluator, chunk_size_for
from flatlens.landscape._storage import Landscape, read, save, store_paths

__all__ = ["grid_axis", "line", "plane"]

Method = Literal["auto", "vmap", "serial"]
Distribute = Literal["auto", "data", "points"]
Span = tuple[float, float]
METRICS = ("loss", "accuracy")


def grid_axis(span: Span, steps: int) -> np.ndarray:
    """``steps`` evenly spaced coordinates over ``span`` that hold 0 exactly.

    The point of ``np.linspace(lo, hi, steps)`` nearest 0 is set to 0 when it is within
    1e-9 of the span's width (odd ``steps`` over a symmetric span); otherwise 0 is inserted,
    giving ``steps + 1`` points.

    Raises:
        ValueError: unless lo < hi are finite, lo <= 0 <= hi and steps is an integer >= 2.
    """
    try:
        lo, hi = (float(v) for v in span)
    except (TypeError, ValueError):
        raise ValueError(f"span must be a pair of numbers (lo, hi), got {span!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"span must be finite with lo < hi, got {span!r}")
    if not lo <= 0.0 <= hi:
        raise ValueError(
            f"span {span!r} must contain 0, the model's own parameters, so the centre is on "
            "the grid; shift the span or move the centre with the direction"
        )
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 2:
        raise ValueError(f"steps must be an integer >= 2, got {steps!r}")
    axis = np.linspace(lo, hi, int(steps))
    near = int(np.argmin(np.abs(axis)))
    if abs(axis[near]) <= 1e-9 * (hi - lo):
        axis[near] = 0.0
    else:
        axis = np.sort(np.append(axis, 0.0))
    return axis


def _hash_update_tensor(h: Any, t: Tensor) -> None:
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _components(
    objective: Objective,
    theta: Tensor,
    dirs: Sequence[Direction],
    coords: Sequence[np.ndarray],
    metrics: Sequence[str],
) -> dict[str, str]:
    """Hashes of the arguments that fix the landscape's values, for resumable stores.

    The data, the loss function and the model's buffers are checked on resume by the
    values at the centre instead (see :func:`_resume`): cheaper than hashing the data, and
    independent of how a loss function object prints.
    """

    def digest(feed: Callable[[Any], None]) -> str:
        h = hashlib.sha256()
        feed(h)
        return h.hexdigest()[:16]

    space = list(zip(objective.space.names, map(tuple, objective.space.shapes), strict=True))
    setup = (objective.reduction, objective.eval_mode, str(objective.dtype), objective.device.type)
    return {
        "grid": digest(lambda h: [h.update(np.ascontiguousarray(c).tobytes()) for c in coords]),
        "directions": digest(lambda h: [_hash_update_tensor(h, d.vector) for d in dirs]),
        "theta": digest(lambda h: _hash_update_tensor(h, theta)),
        "parameters": digest(lambda h: h.update(repr(space).encode())),
        "objective": digest(lambda h: h.update(repr(setup).encode())),
        "metrics": ",".join(metrics),
    }


def preferred_method(objective: Objective) -> str:
    """What ``method="auto"`` runs: ``"vmap"`` on accelerators, where one batched call per
    chunk keeps the device busy; ``"serial"`` on the CPU, where batched matrix products and
    the larger working set measured slower than one forward per point
    (docs/benchmarks-landscape.md)."""
    return "serial" if objective.device.type == "cpu" else "vmap"


def _chunks(order: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(order), size):
        yield order[start : start + size]


class _Grid:
    """Flat bookkeeping of a grid: coefficients per point, values, done mask, centre."""

    def __init__(self, coords: Sequence[np.ndarray], metrics: Sequence[str]) -> None:
        self.coords = [np.asarray(c, dtype=np.float64) for c in coords]
        self.shape = tuple(len(c) for c in self.coords)
        mesh = np.meshgrid(*self.coords, indexing="ij")
        self.coef = np.stack([m.reshape(-1) for m in mesh], axis=1)
        self.size = self.coef.shape[0]
        self.center_index = tuple(int(np.flatnonzero(c == 0.0)[0]) for c in self.coords)
        self.center_flat = int(np.ravel_multi_index(self.center_index, self.shape))
        self.values = {m: np.full(self.size, np.nan) for m in metrics}
        self.done = np.zeros(self.size, dtype=bool)

    def others(self) -> np.ndarray:
        """Indices of every point but the centre, in row-major order."""
        idx = np.arange(self.size)
        return idx[idx != self.center_flat]


def _resolve_metrics(metrics: Sequence[str] | None, classify: bool) -> list[str]:
    if metrics is None:
        return ["loss", "accuracy"] if classify else ["loss"]
    if isinstance(metrics, str):
        metrics = [metrics]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
    if "accuracy" in metrics and not classify:
        raise ValueError(
            "metric 'accuracy' needs a classification task (2-D outputs and integer targets)"
        )
    return [m for m in METRICS if m in metrics or m == "loss"]


def _landscape(
    grid: _Grid,
    center: dict[str, float],
    dirs: Sequence[Direction],
    trajectory: np.ndarray | None,
    settings: dict[str, Any],
    fingerprint: str,
    evaluated: int,
    start: float,
) -> Landscape:
    return Landscape(
        coords=grid.coords,
        values={m: v.reshape(grid.shape).copy() for m, v in grid.values.items()},
        center_index=grid.center_index,
        center=dict(center),
        directions=[d.to_dict() for d in dirs],
        cosine=cosine(dirs[0], dirs[1]) if len(dirs) == 2 else None,
        trajectory=trajectory,
        settings=settings,
        fingerprint=fingerprint,
        num_evaluated=evaluated,
        elapsed_s=time.perf_counter() - start,
    )


def _distribution(distribute: Any, objective: Objective) -> str | None:
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


@contextlib.contextmanager
def _local(objective: Objective, active: bool) -> Iterator[None]:
    """Evaluate on this rank's data only (``"points"``): the objective's reduction is off."""
    if not active:
        yield
        return
    before = objective.distributed
    objective.distributed = False
    try:
        yield
    finally:
        objective.distributed = before


def _load_store(
    store: str | os.PathLike | None, collective: bool
) -> tuple[Landscape, np.ndarray] | None:
    """The store's contents (None when absent); read by rank 0 and sent to the others when
    the ranks work together, so every rank resumes from the same state."""
    if store is None:
        return None
    if not collective:
        return read(store) if store_paths(store)[0].is_file() else None
    payload: tuple[str, Any] = ("ok", None)
    if fd.is_main():
        try:
            payload = ("ok", read(store) if store_paths(store)[0].is_file() else None)
        except (OSError, ValueError) as err:
            payload = ("error", f"{err}")
    payload = fd.broadcast_object(payload)
    if payload[0] == "error":
        raise ValueError(payload[1])
    return payload[1]


def _agree(
    fingerprint: str, center: dict[str, float], mode: str, store: str | os.PathLike | None
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
            "seeds), span and steps"
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


def _evaluate(
    objective: Objective,
    dirs: list[Direction],
    coords: list[np.ndarray],
    *,
    metrics: Sequence[str] | None,
    trajectory: np.ndarray | None,
    method: Method,
    chunk_size: int | None,
    store: str | os.PathLike | None,
    save_interval_s: float,
    callback: Callable[[int, int], None] | None,
    progress: bool,
    distribute: Distribute,
    extra_settings: dict[str, Any],
) -> Landscape:
    start = time.perf_counter()
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be a flatlens.Objective, not {type(objective).__name__}")
    if method not in ("auto", "vmap", "serial"):
        raise ValueError(f"method must be 'auto', 'vmap' or 'serial', not {method!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    if not save_interval_s >= 0:
        raise ValueError(f"save_interval_s must be >= 0, got {save_interval_s!r}")
    mode = _distribution(distribute, objective)
    collective = mode is not None
    writes = store is not None
    dirs = [as_direction(objective, d) for d in dirs]
    theta = objective.theta
    model = objective.model

    with eval_mode(model, objective.eval_mode), _local(objective, mode == "points"):
        stored = _load_store(store, collective)
        center = objective.evaluate()
        evaluated = 1 if stored is None else 0
        names = _resolve_metrics(metrics, classify="accuracy" in center)
        center = {m: center[m] for m in names}
        grid = _Grid(coords, names)
        comps = _components(objective, theta, dirs, grid.coords, names)
        fingerprint = hashlib.sha256(json.dumps(comps, sort_keys=True).encode()).hexdigest()[:16]
        if collective:
            center, writes = _agree(fingerprint, center, mode, store)
        settings: dict[str, Any] = {
            **extra_settings,
            "requested_method": method,
            "method": method,
            "chunk_size": chunk_size,
            "metrics": names,
            "reduction": objective.reduction,
            "eval_mode": objective.eval_mode,
            "dtype": str(objective.dtype),
            "device": str(objective.device),
            "num_params": objective.num_params,
            "components": comps,
        }
        if collective:
            settings["distribute"] = mode
            settings["world_size"] = fd.world_size()
        if stored is not None:
            _resume(stored, grid, settings, store, method, chunk_size, center)
        for m in names:
            grid.values[m][grid.center_flat] = center[m]
        grid.done[grid.center_flat] = True
        if settings["method"] == "auto":
            settings["method"] = preferred_method(objective)
        if settings["chunk_size"] is None:
            settings["chunk_size"] = (
                chunk_size_for(objective, theta, grid.size) if settings["method"] == "vmap" else 16
            )
        classify = "accuracy" in names
        evaluator = _make_evaluator(objective, classify, settings)
        may_fall_back = method == "auto" and settings["method"] == "vmap"

        def run(idx: np.ndarray) -> dict[str, np.ndarray]:
            """Metric values at the grid points ``idx`` (one data pass)."""
            nonlocal evaluator, may_fall_back
            thetas = _points(objective, theta, dirs, grid.coef[idx])
            try:
                totals, correct, count = evaluator(thetas)
            except Exception as err:
                if not may_fall_back:
                    raise
                warnings.warn(
                    f"vmap evaluation failed ({type(err).__name__}: {err}); "
                    "falling back to the serial loop",
                    RuntimeWarning,
                    stacklevel=5,
                )
                settings["method"] = "serial"
                settings["vmap_error"] = f"{type(err).__name__}: {err}"
                evaluator = _make_evaluator(objective, classify, settings)
                totals, correct, count = evaluator(thetas)
            may_fall_back = False
            objective.counts["loss"] += len(idx)
            return _values(names, totals, correct, count, objective.reduction)

        def snapshot() -> Landscape:
            return _landscape(
                grid, center, dirs, trajectory, settings, fingerprint, evaluated, start
            )

        rounds = (
            _point_rounds(grid, run, settings["chunk_size"])
            if mode == "points"
            else _data_rounds(grid, run, settings["chunk_size"])
        )
        last_save = time.perf_counter()
        unsaved = stored is None
        bar = tqdm(
            total=grid.size,
            initial=int(grid.done.sum()),
            desc="landscape",
            disable=not progress or (collective and not fd.is_main()),
            leave=False,
        )
        try:
            for count in rounds:
                evaluated += count
                unsaved = True
                bar.update(count)
                if writes and time.perf_counter() - last_save >= save_interval_s:
                    save(snapshot(), store, done=grid.done.reshape(grid.shape))
                    last_save, unsaved = time.perf_counter(), False
                if callback is not None:
                    callback(int(grid.done.sum()), grid.size)
        finally:
            bar.close()
            if writes and unsaved:
                save(snapshot(), store, done=grid.done.reshape(grid.shape))
    return snapshot()


def _data_rounds(
    grid: _Grid, run: Callable[[np.ndarray], dict[str, np.ndarray]], chunk: int
) -> Iterator[int]:
    """Evaluate the missing points chunk by chunk, every rank (if any) every point; yield the
    number of points each chunk filled."""
    for idx in _chunks(grid.others(), chunk):
        if grid.done[idx].all():
            continue
        _record(grid, idx, run(idx))
        yield len(idx)


def _point_rounds(
    grid: _Grid, run: Callable[[np.ndarray], dict[str, np.ndarray]], chunk: int
) -> Iterator[int]:
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
                _record(grid, idx, {m: rows[:, j] for j, m in enumerate(names)})
        yield len(block)


def _points(
    objective: Objective, theta: Tensor, dirs: Sequence[Direction], coef: np.ndarray
) -> Tensor:
    """Rows theta + a_k d1 (+ b_k d2), elementwise (no GEMM), so each row's bits do not
    depend on which other points share its chunk."""
    coef_t = torch.as_tensor(coef, dtype=objective.dtype).to(objective.device)
    out = theta.expand(len(coef), -1)
    for j, d in enumerate(dirs):
        out = out + coef_t[:, j : j + 1] * d.vector
    return out


def _make_evaluator(
    objective: Objective, classify: bool, settings: dict[str, Any]
) -> VmapEvaluator | SerialEvaluator:
    if settings["method"] == "vmap":
        return VmapEvaluator(objective, classify)
    evaluator = SerialEvaluator(objective, classify)
    settings["serial_copy"] = evaluator.uses_copy
    return evaluator


def _values(
    names: Sequence[str], totals: Tensor, correct: Tensor, count: int, reduction: str
) -> dict[str, np.ndarray]:
    """S_k / N (mean) or S_k (sum), as ``Objective`` computes it: float(S_k) * (1.0 / N);
    accuracy as correct_k / N."""
    scale = 1.0 / count if reduction == "mean" else 1.0
    out = {"loss": totals.cpu().numpy() * scale}
    if "accuracy" in names:
        out["accuracy"] = correct.cpu().numpy().astype(np.float64) / count
    return out


def _record(grid: _Grid, idx: np.ndarray, values: dict[str, np.ndarray]) -> None:
    for m, v in values.items():
        grid.values[m][idx] = v
    grid.done[idx] = True


def _resume(
    stored: tuple[Landscape, np.ndarray],
    grid: _Grid,
    settings: dict[str, Any],
    store: str | os.PathLike,
    method: Method,
    chunk_size: int | None,
    center: dict[str, float],
) -> None:
    """Load a store's progress into ``grid`` after checking it is the same landscape: the
    same argument hashes and, bit for bit, the same metric values at the centre (so the
    data, the loss function and the model's buffers are the same too)."""
    old, done = stored
    path = store_paths(store)[0]
    before = old.settings.get("components", {})
    now = settings["components"]
    differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if differ or old.shape != grid.shape:
        raise ValueError(
            f"store {path} holds a different landscape ({', '.join(differ) or 'grid'} "
            "differ); pass the same arguments to resume it, or another store path (or delete "
            "the file) to start afresh"
        )
    if old.center != center:
        raise ValueError(
            f"store {path} has the same grid, directions and weights, but the values at the "
            f"centre differ ({old.center} stored, {center} now): the data, the loss function, "
            "the model's buffers or the split of the data across ranks changed (sums over "
            "other shards round differently). Use another store path (or delete the file)"
        )
    for key, asked in (("method", method), ("chunk_size", chunk_size)):
        kept = old.settings.get(key)
        if asked not in (None, "auto") and kept not in (None, "auto") and asked != kept:
            raise ValueError(
                f"store {store_paths(store)[0]} was computed with {key}={kept!r} but "
                f"{key}={asked!r} was passed; the last bits of the values depend on it, so "
                f"resume with {key}={kept!r} (or the default) or use another store"
            )
        if kept not in (None, "auto"):
            settings[key] = kept
    for key in ("vmap_error", "serial_copy"):
        if key in old.settings:
            settings[key] = old.settings[key]
    for m in grid.values:
        grid.values[m][:] = old.values[m].reshape(-1)
    grid.done[:] = done.reshape(-1)


def _check_trajectory(trajectory: Any, ndim: int) -> np.ndarray | None:
    if trajectory is None:
        return None
    arr = np.asarray(trajectory, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < ndim or not np.isfinite(arr).all():
        raise ValueError(
            f"trajectory must be a finite (T, {ndim}) array of coordinates, got shape {arr.shape}"
        )
    return arr[:, :ndim].copy()


def line(
    objective: Objective,
    direction: Direction | Tensor,
    *,
    span: Span = (-1.0, 1.0),
    steps: int = 51,
    metrics: Sequence[str] | None = None,
    method: Method = "auto",
    chunk_size: int | None = None,
    store: str | os.PathLike | None = None,
    save_interval_s: float = 1.0,
    callback: Callable[[int, int], None] | None = None,
    progress: bool = False,
    distribute: Distribute = "auto",
) -> Landscape:
    """The 1-D slice a -> L(theta + a d) (and accuracy) for a on a grid over ``span``.

    Args:
        objective: The risk L and the centre theta (the model's current parameters).
        direction: A :class:`Direction` or a flat tensor d.
        span: ``(lo, hi)`` with lo <= 0 <= hi.
        steps: Grid points (0 is added when the spacing misses it; see :func:`grid_axis`).
        metrics: ``"loss"`` and/or ``"accuracy"``; default loss, plus accuracy when the task
            is classification (2-D outputs, integer targets).
        method: ``"vmap"`` (batched points), ``"serial"`` (one forward per point) or
            ``"auto"``: vmap on accelerators, falling back to serial if vmap fails; serial on
            the CPU, where it measured faster (docs/benchmarks-landscape.md).
        chunk_size: Points per data pass (and per vmap call); default from a memory
            estimate for vmap, 16 for serial.
        store: Path (``.npz`` + ``.json``) to keep progress in and resume from.
        save_interval_s: Write the store at most this often (seconds), and on exit.
        callback: Called as ``callback(done, total)`` after each chunk (on every rank).
        progress: Show a tqdm bar (on rank 0 only when the ranks work together).
        distribute: How ``torch.distributed`` ranks share the grid. ``"data"``: every rank
            evaluates every point on its shard of the data and the (distributed) objective
            sums the shards, one all-reduce per chunk. ``"points"``: each rank holds the
            whole data set and evaluates a ``1/world_size`` share of the points; the values
            are gathered after every round of chunks (the objective's own reduction is
            switched off meanwhile). ``"auto"``: ``"data"`` when ``objective.distributed``,
            else this process alone. When ranks work together every rank returns the whole
            grid and only rank 0 reads and writes ``store``. A ``"points"`` grid equals the
            one-process grid; a ``"data"`` grid differs in the last bits (the shard sums
            round differently).

    Returns:
        A :class:`Landscape` with ``coords = [a]`` and ``values[m]`` of shape ``(len(a),)``.
    """
    coords = [grid_axis(span, steps)]
    return _evaluate(
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
        extra_settings={"kind": "line", "span": [list(map(float, span))], "steps": [steps]},
    )


def _pair(value: Any, what: str) -> tuple[Any, Any]:
    if isinstance(value, Sequence) and len(value) == 2 and isinstance(value[0], Sequence):
        return value[0], value[1]
    if what == "steps" and isinstance(value, Sequence) and len(value) == 2:
        return value[0], value[1]
    return value, value


def plane(
    objective: Objective,
    d1: Direction | Tensor,
    d2: Direction | Tensor,
    *,
    span: Span | tuple[Span, Span] = (-1.0, 1.0),
    steps: int | tuple[int, int] = (51, 51),
    metrics: Sequence[str] | None = None,
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
        steps: Points per axis, an integer or a pair.
        trajectory: Optional ``(T, 2)`` coordinates to overlay in plots (e.g.
            ``PCADirections.coordinates``).
        metrics: As in :func:`line` (likewise ``method``, ``chunk_size``, ``store``,
            ``save_interval_s``, ``callback``, ``progress`` and ``distribute``).

    Returns:
        A :class:`Landscape` with ``values[m][i, j]`` at ``(coords[0][i], coords[1][j])``.
    """
    spans, step_pair = _pair(span, "span"), _pair(steps, "steps")
    coords = [grid_axis(s, n) for s, n in zip(spans, step_pair, strict=True)]
    return _evaluate(
        objective,
        [d1, d2],
        coords,
        metrics=metrics,
        trajectory=_check_trajectory(trajectory, 2),
        method=method,
        chunk_size=chunk_size,
        store=store,
        save_interval_s=save_interval_s,
        callback=callback,
        progress=progress,
        distribute=distribute,
        extra_settings={
            "kind": "plane",
            "span": [list(map(float, s)) for s in spans],
            "steps": list(step_pair),
        },
    )
