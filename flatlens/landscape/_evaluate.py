"""The grid runner behind :func:`~flatlens.landscape.line` and :func:`~flatlens.landscape.plane`.

The values at the grid points theta + a_k d1 (+ b_k d2) come from the engine of
:meth:`Objective.evaluate_points` (a :class:`~flatlens.core._points.PointSession`, set up once
per grid), one data pass per chunk of points, so the landscape computes L exactly as every
measure does and never touches the model: the model's parameters, buffers and train/eval
flags come back as they were, even on an interrupt. The points go in as
:class:`~flatlens.core._affine.AffinePoints`, which the serial path writes one by one into its
working copy. The centre a = b = 0 is on every grid and evaluated alone on the serial path,
so its loss equals ``objective.loss()`` bit for bit.

With ``store=path`` the grid is written to ``path`` (``.npz`` + ``.json``) as it fills. A
run started again with the same arguments skips what the store holds and ends with the same
arrays as one uninterrupted run; different arguments are refused (see
:mod:`flatlens.landscape._resume`). Under ``torch.distributed`` the ranks share the grid by
data or by points (see :mod:`flatlens.landscape._ranks`); every rank returns the whole grid
and only rank 0 reads and writes the store (the others receive its contents), so resuming
works in both modes and on nodes without a shared file system.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from flatlens import distributed as fd
from flatlens.core._affine import AffinePoints
from flatlens.core._checks import check_nonnegative, check_positive_int
from flatlens.core._errors import NonFiniteLossError
from flatlens.core._memory import PeakMemory
from flatlens.core._objective import Objective
from flatlens.core._points import (
    SERIAL_CHUNK,
    MetricsArg,
    PointSession,
    chunk_size_for,
    preferred_method,
)
from flatlens.landscape._directions import Direction, as_direction, cosine
from flatlens.landscape._grid import Grid, affine_points
from flatlens.landscape._ranks import agree, data_rounds, distribution, point_rounds
from flatlens.landscape._resume import components, fingerprint, load_store, restore
from flatlens.landscape._storage import Landscape, save

__all__ = ["Distribute", "Method", "evaluate_grid"]

Method = Literal["auto", "vmap", "serial"]
CHUNK_SECONDS = 0.2
"""Target duration of one serial chunk when the chunk size is left to the runner."""
MAX_SERIAL_CHUNK = 256
Distribute = Literal["auto", "data", "points"]


class _GridRun:
    """One landscape computation: checked arguments, the centre, then the missing points."""

    peak: PeakMemory | None = None  # set by evaluate_grid: snapshots report the peak so far

    def __init__(
        self,
        objective: Objective,
        dirs: Sequence[Direction | Any],
        coords: Sequence[np.ndarray],
        *,
        metrics: MetricsArg,
        trajectory: np.ndarray | None,
        method: Method,
        chunk_size: int | None,
        store: str | os.PathLike | None,
        save_interval_s: float,
        callback: Callable[[int, int], None] | None,
        progress: bool,
        distribute: Distribute,
        extra_settings: dict[str, Any],
    ) -> None:
        self.start = time.perf_counter()
        if not isinstance(objective, Objective):
            raise TypeError(
                f"objective must be a flatlens.Objective, not {type(objective).__name__}"
            )
        if method not in ("auto", "vmap", "serial"):
            raise ValueError(f"method must be 'auto', 'vmap' or 'serial', not {method!r}")
        if chunk_size is not None:
            chunk_size = check_positive_int("chunk_size", chunk_size)
        if save_interval_s != math.inf:  # inf: write the store only on the way out
            save_interval_s = check_nonnegative("save_interval_s", save_interval_s)
        self.save_interval_s = save_interval_s
        self.mode = distribution(distribute, objective)
        self.objective = objective
        self.dirs = [as_direction(objective, d) for d in dirs]
        self.coords = coords
        self.metrics = metrics
        self.trajectory = trajectory
        self.method = method
        self.chunk_size = chunk_size
        self.store = store
        self.callback = callback
        self.progress = progress
        self.extra_settings = extra_settings
        self.theta = objective.theta
        self.writes = store is not None
        self.evaluated = 0
        self.may_fall_back = False
        self.adapt_chunk = False

    @property
    def collective(self) -> bool:
        """Whether the ranks work together on this grid."""
        return self.mode is not None

    # ------------------------------------------------------------------ set-up
    def prepare(self) -> None:
        """Read the store, evaluate the centre, check the ranks agree, load the progress
        and settle the method and chunk size."""
        obj = self.objective
        stored = load_store(self.store, self.collective)
        center = self._center()
        self.evaluated = 1 if stored is None else 0
        names = list(center)
        self.grid = Grid(self.coords, names)
        comps = components(obj, self.theta, self.dirs, self.grid.coords, names)
        self.fingerprint = fingerprint(comps)
        if self.collective:
            center, self.writes = agree(self.fingerprint, center, self.mode, self.store)
        self.center = center
        self.settings: dict[str, Any] = {
            **self.extra_settings,
            "requested_method": self.method,
            "method": self.method,
            "chunk_size": self.chunk_size,
            "metrics": names,
            "reduction": obj.reduction,
            "eval_mode": obj.eval_mode,
            "dtype": str(obj.dtype),
            "device": str(obj.device),
            "num_params": obj.num_params,
            "components": comps,
        }
        if self.collective:
            self.settings["distribute"] = self.mode
            self.settings["world_size"] = fd.world_size()
        if stored is not None:
            asked = {"method": self.method, "chunk_size": self.chunk_size}
            restore(stored, self.grid, self.settings, self.store, asked, center)
        self.grid.record(np.array([self.grid.center_flat]), {m: center[m] for m in names})
        self.unsaved = stored is None
        self._settle_execution()
        # Later chunks ask for exactly the centre's metrics (``None`` resolved there), all
        # through one session: the evaluator and its working copy are set up once per grid.
        # The points' coefficients in the model's dtype, converted once (as affine_points).
        self.vectors = tuple(d.vector for d in self.dirs)
        self.coef = affine_points(self.theta, self.vectors, self.grid.coef).coefficients
        self.session = PointSession(
            obj,
            self.metrics if self.metrics is not None else names,
            self.settings["method"],
            fall_back=self.may_fall_back,
            local=self.mode == "points",
            stacklevel=6,  # the caller of line() or plane()
        )

    def _center(self) -> dict[str, float]:
        """Metric values at theta, on the serial path (bit for bit ``objective.loss()``)."""
        values = self.objective.evaluate_points(
            self.theta[None], self.metrics, method="serial", local=self.mode == "points"
        )
        center = {m: float(v[0]) for m, v in values.items()}
        if not math.isfinite(center["loss"]):
            raise NonFiniteLossError(
                f"the loss at the centre of the landscape (the model's own parameters) is "
                f"{center['loss']}; check the weights and the data for NaN/inf"
            )
        return center

    def _settle_execution(self) -> None:
        """Resolve ``"auto"`` and a default chunk size (one chunk size on every rank)."""
        settings = self.settings
        if settings["method"] == "auto":
            settings["method"] = preferred_method(self.objective)
            self.may_fall_back = settings["method"] == "vmap"
        if settings["chunk_size"] is None:
            chunk = (
                chunk_size_for(self.objective, self.theta, self.grid.size)
                if settings["method"] == "vmap"
                else SERIAL_CHUNK
            )
            if self.collective:  # memory estimates may differ between ranks; chunks must not
                chunk = min(fd.all_gather_object(chunk))
            settings["chunk_size"] = chunk
            # One process, serial: grow the chunk once the first one is timed (the values
            # do not depend on the chunking on this path).
            self.adapt_chunk = settings["method"] == "serial" and not self.collective

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Metric values at the grid points ``idx`` (one data pass)."""
        points = AffinePoints(self.theta, self.vectors, self.coef[torch.from_numpy(idx)])
        start, cpu = time.perf_counter(), time.process_time()
        values = self.session.evaluate(points)
        if self.adapt_chunk:
            # The smaller of the wall and this process's CPU time: on a loaded machine the
            # wall clock also counts the waits for a core, which chunking cannot amortize.
            spent = min(time.perf_counter() - start, time.process_time() - cpu)
            self._adapt_chunk(spent / len(idx))
        if self.session.vmap_error is not None and "vmap_error" not in self.settings:
            self.settings["method"] = self.session.method
            self.settings["vmap_error"] = self.session.vmap_error
        return {m: v.cpu().numpy() for m, v in values.items()}

    def _adapt_chunk(self, seconds_per_point: float) -> None:
        """After the first serial chunk: as many points per chunk as take about
        ``CHUNK_SECONDS`` (between ``SERIAL_CHUNK`` and ``MAX_SERIAL_CHUNK``), so that the
        fixed cost of a chunk (a data pass's set-up, the sums, the bookkeeping) stays small
        against cheap points while progress, callbacks and saves stay frequent."""
        self.adapt_chunk = False
        wanted = CHUNK_SECONDS / max(seconds_per_point, 1e-9)
        self.settings["chunk_size"] = int(min(MAX_SERIAL_CHUNK, max(SERIAL_CHUNK, wanted)))

    def loop(self) -> None:
        """Fill the missing points round by round: progress bar, store saves, callbacks."""
        grid, settings = self.grid, self.settings
        rounds = (
            point_rounds(grid, self.evaluate, settings["chunk_size"])
            if self.mode == "points"
            else data_rounds(grid, self.evaluate, lambda: settings["chunk_size"])
        )
        last_save = time.perf_counter()
        bar = tqdm(
            total=grid.size,
            initial=int(grid.done.sum()),
            desc="landscape",
            disable=not self.progress or (self.collective and not fd.is_main()),
            leave=False,
        )
        try:
            for count in rounds:
                self.evaluated += count
                self.unsaved = True
                bar.update(count)
                if self.writes and time.perf_counter() - last_save >= self.save_interval_s:
                    self._save()
                    last_save = time.perf_counter()
                if self.callback is not None:
                    self.callback(int(grid.done.sum()), grid.size)
        finally:
            bar.close()
            if self.writes and self.unsaved:
                self._save()

    def _save(self) -> None:
        save(self.snapshot(), self.store, done=self.grid.done.reshape(self.grid.shape))
        self.unsaved = False

    def snapshot(self) -> Landscape:
        """The landscape as it stands."""
        dirs = self.dirs
        return Landscape(
            coords=self.grid.coords,
            values=self.grid.shaped(),
            center_index=self.grid.center_index,
            center=dict(self.center),
            directions=[d.to_dict() for d in dirs],
            cosine=cosine(dirs[0], dirs[1]) if len(dirs) == 2 else None,
            trajectory=self.trajectory,
            settings=self.settings,
            fingerprint=self.fingerprint,
            num_evaluated=self.evaluated,
            elapsed_s=time.perf_counter() - self.start,
            peak_memory_bytes=None if self.peak is None else self.peak.so_far(),
            peak_memory_kind="" if self.peak is None else self.peak.kind,
        )


def evaluate_grid(
    objective: Objective,
    dirs: Sequence[Direction | Any],
    coords: Sequence[np.ndarray],
    **options: Any,
) -> Landscape:
    """Evaluate a line or plane grid (the options are those of :func:`plane`, plus
    ``trajectory`` and ``extra_settings``) and return it as a :class:`Landscape`."""
    run = _GridRun(objective, dirs, coords, **options)
    with PeakMemory(objective.device) as run.peak:  # stores saved on the way hold it too
        run.prepare()
        run.loop()
        return run.snapshot()
