"""The :class:`Landscape` result and its files: ``<stem>.npz`` plus a ``<stem>.json`` sidecar.

The ``.npz`` file is self-contained (arrays plus the metadata as an embedded JSON string)
and is what :func:`load` reads; the sidecar repeats the metadata for people and other tools.
Both are written to a temporary file and renamed over the target, so a reader, or a run
killed mid-write, never sees half a file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flatlens.core._io import atomic_path, write_json
from flatlens.core._results import MeasureResult, to_jsonable

__all__ = ["FORMAT", "Landscape", "load", "save", "store_paths"]

FORMAT = "flatlens.landscape/1"


@dataclass(eq=False)
class Landscape(MeasureResult):
    """Metric values on a 1-D or 2-D grid around theta: theta + a d1 (+ b d2).

    Attributes:
        coords: One sorted 1-D float64 array per axis (``a``, then ``b``); each holds 0.
        values: Metric name -> array of the grid's shape; ``values[m][i, j]`` is the metric
            at ``coords[0][i], coords[1][j]``. NaN marks a point not evaluated (yet).
        center_index: Index of the origin (theta itself) in the grid.
        center: Metric values at theta.
        directions: Each direction's metadata (source, settings, norm); vectors not kept.
        cosine: cos(d1, d2) for a plane, else None.
        trajectory: Optional ``(T, ndim)`` coordinates of points to overlay (e.g. PCA).
        settings: How the grid was evaluated (span, num_points, method, chunk size, dtype, ...).
        fingerprint: Hash of everything that determines the values (theta, directions,
            grid, metrics, loss settings), used to refuse resuming a different run.
        num_evaluated: Grid points evaluated by the call that returned this object
            (points restored from a store are not counted).
        elapsed_s: Wall-clock seconds of that call.
        peak_memory_bytes: Peak memory of that call (see
            :class:`~flatlens.core.MeasureResult`); ``peak_memory_kind`` says which.
    """

    coords: list[np.ndarray]
    values: dict[str, np.ndarray]
    center_index: tuple[int, ...]
    center: dict[str, float] = field(default_factory=dict)
    directions: list[dict[str, Any]] = field(default_factory=list)
    cosine: float | None = None
    trajectory: np.ndarray | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    num_evaluated: int = 0
    elapsed_s: float = 0.0

    @property
    def ndim(self) -> int:
        """1 for a line, 2 for a plane."""
        return len(self.coords)

    @property
    def shape(self) -> tuple[int, ...]:
        """Grid shape."""
        return tuple(len(c) for c in self.coords)

    @property
    def metrics(self) -> list[str]:
        """Names of the metrics held."""
        return list(self.values)

    @property
    def x(self) -> np.ndarray:
        """Coordinates along the first direction."""
        return self.coords[0]

    @property
    def y(self) -> np.ndarray:
        """Coordinates along the second direction (planes only)."""
        if self.ndim < 2:
            raise ValueError("a line has no second axis")
        return self.coords[1]

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``<stem>.npz`` and ``<stem>.json`` atomically; returns the ``.npz`` path."""
        return save(self, path)

    def to_vtk(
        self,
        path: str | os.PathLike,
        *,
        metric: str = "loss",
        log: bool = False,
        zmax: float | None = None,
    ) -> Path:
        """Write the surface z = ``values[metric]`` as a ParaView-ready ``.vtp`` file.

        A VTK XML PolyData file laid out as loss-landscape's ``h52vtp.py`` writes it: the
        grid points (a_i, b_j, z_ij) joined by quadrilaterals (a polyline for a line), with
        the height, every metric and a ``finite`` mask as point fields and each cell's mean
        height as cell data. Written atomically, with the standard library only.

        Args:
            path: The ``.vtp`` file (the suffix is added when missing).
            metric: The metric that gives the heights (``"loss"``, ``"accuracy"``, ...).
            log: Heights log(z + 0.1) (as ``h52vtp.py --log``), for losses spanning decades.
            zmax: Cap the metric at this value first (as ``h52vtp.py --zmax``).

        Returns:
            The path written.

        Raises:
            ValueError: an unknown metric, no finite value, or ``log`` with values <= -0.1.
        """
        from flatlens.landscape._vtk import to_vtk

        return to_vtk(self, path, metric=metric, log=log, zmax=zmax)

    def equals(self, other: Landscape, *, timing: bool = False) -> bool:
        """Exact equality of grid, values (NaN equal to NaN) and metadata.

        Args:
            other: The landscape to compare with.
            timing: Also compare ``num_evaluated``, ``elapsed_s`` and the peak memory.
        """
        if not isinstance(other, Landscape) or self.shape != other.shape:
            return False
        if set(self.values) != set(other.values):
            return False
        arrays_equal = all(
            np.array_equal(a, b) for a, b in zip(self.coords, other.coords, strict=True)
        ) and all(
            np.array_equal(self.values[k], other.values[k], equal_nan=True) for k in self.values
        )
        traj_equal = (self.trajectory is None and other.trajectory is None) or (
            self.trajectory is not None
            and other.trajectory is not None
            and np.array_equal(self.trajectory, other.trajectory)
        )
        meta_a, meta_b = _metadata(self), _metadata(other)
        if not timing:
            for meta in (meta_a, meta_b):
                for key in RUN_FIELDS:
                    meta.pop(key)
        return arrays_equal and traj_equal and meta_a == meta_b


RUN_FIELDS = ("num_evaluated", "elapsed_s", "peak_memory_bytes", "peak_memory_kind")
"""Metadata of the call that produced a landscape, not of the landscape itself."""


def store_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(<stem>.npz, <stem>.json)`` for ``path`` given with or without the ``.npz`` suffix."""
    p = Path(path)
    if p.suffix in (".npz", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".npz"), p.with_name(p.name + ".json")


def _metadata(landscape: Landscape) -> dict[str, Any]:
    return to_jsonable(
        {
            "format": FORMAT,
            "metrics": landscape.metrics,
            "shape": list(landscape.shape),
            "center_index": list(landscape.center_index),
            "center": landscape.center,
            "directions": landscape.directions,
            "cosine": landscape.cosine,
            "settings": landscape.settings,
            "fingerprint": landscape.fingerprint,
            "num_evaluated": landscape.num_evaluated,
            "elapsed_s": landscape.elapsed_s,
            "peak_memory_bytes": landscape.peak_memory_bytes,
            "peak_memory_kind": landscape.peak_memory_kind,
        }
    )


def save(landscape: Landscape, path: str | os.PathLike, *, done: np.ndarray | None = None) -> Path:
    """Write a landscape as ``<stem>.npz`` + ``<stem>.json``, each atomically.

    Args:
        landscape: What to write.
        path: ``<stem>`` or ``<stem>.npz``.
        done: Optional boolean mask of the grid's evaluated points (for resumable stores);
            default all True.

    Returns:
        The ``.npz`` path.
    """
    npz_path, json_path = store_paths(path)
    meta = _metadata(landscape)
    if done is None:
        done = np.ones(landscape.shape, dtype=bool)
    meta["num_done"] = int(done.sum())
    arrays: dict[str, np.ndarray] = {
        f"coord_{i}": np.asarray(c, dtype=np.float64) for i, c in enumerate(landscape.coords)
    }
    for i, name in enumerate(landscape.metrics):
        arrays[f"value_{i}"] = np.asarray(landscape.values[name])
    if landscape.trajectory is not None:
        arrays["trajectory"] = np.asarray(landscape.trajectory, dtype=np.float64)
    arrays["done"] = np.asarray(done, dtype=bool)
    arrays["meta"] = np.asarray(json.dumps(meta, allow_nan=False))
    with atomic_path(npz_path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
    write_json(json_path, meta)
    return npz_path


def read(path: str | os.PathLike) -> tuple[Landscape, np.ndarray]:
    """Read a landscape and its mask of evaluated points (see :func:`save`).

    Any failure of the reader (a truncated or foreign file, missing arrays, metadata that
    does not fit the arrays) is one :class:`ValueError` naming the file.

    Raises:
        FileNotFoundError: if the ``.npz`` file does not exist.
        ValueError: if it is not a readable flatlens landscape file.
    """
    npz_path, _ = store_paths(path)
    if not npz_path.is_file():
        raise FileNotFoundError(f"no landscape file {npz_path}")
    try:
        with np.load(npz_path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        meta = json.loads(str(arrays["meta"]))
    except Exception as err:  # every reader failure is a bad file
        raise ValueError(
            f"{npz_path} is not a readable flatlens landscape ({_describe(err)})"
        ) from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{npz_path} has format {found!r}, expected {FORMAT!r}")
    try:
        landscape, done = _from_arrays(arrays, meta)
    except Exception as err:
        raise ValueError(f"{npz_path} is a damaged flatlens landscape ({_describe(err)})") from err
    return landscape, done


def _describe(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _from_arrays(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> tuple[Landscape, Any]:
    """The landscape an ``.npz`` file's arrays and metadata describe, checked for shape."""
    shape = tuple(int(n) for n in meta["shape"])
    coords = [np.asarray(arrays[f"coord_{i}"], dtype=np.float64) for i in range(len(shape))]
    values = {str(name): arrays[f"value_{i}"] for i, name in enumerate(meta["metrics"])}
    done = np.asarray(arrays["done"])
    if tuple(len(c) for c in coords) != shape or done.shape != shape or done.dtype != bool:
        raise ValueError(f"the coordinates or the done mask do not have the shape {shape}")
    if any(v.shape != shape for v in values.values()):
        raise ValueError(f"a value array does not have the grid's shape {shape}")
    landscape = Landscape(
        coords=coords,
        values=values,
        center_index=tuple(int(i) for i in meta["center_index"]),
        center={k: math.nan if v is None else float(v) for k, v in meta["center"].items()},
        directions=list(meta["directions"]),
        cosine=meta["cosine"],
        trajectory=arrays.get("trajectory"),
        settings=dict(meta["settings"]),
        fingerprint=str(meta["fingerprint"]),
        num_evaluated=int(meta["num_evaluated"]),
        elapsed_s=float(meta["elapsed_s"]),
        peak_memory_bytes=meta.get("peak_memory_bytes"),
        peak_memory_kind=str(meta.get("peak_memory_kind", "")),
    )
    return landscape, done


def load(path: str | os.PathLike) -> Landscape:
    """Load a landscape written by :meth:`Landscape.save` (``<stem>`` or ``<stem>.npz``)."""
    return read(path)[0]
