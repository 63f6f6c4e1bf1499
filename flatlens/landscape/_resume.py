"""Resumable landscape stores: what identifies a landscape, and loading a store's progress.

A landscape's values are fixed by the centre theta, the directions, the grid, the metrics,
the parameter layout and the objective's settings; their hashes (:func:`components`) are kept
in the store. A run resumes a store only when every hash matches and the metric values at
the centre are bit for bit those stored, which also pins the data, the loss function and the
model's buffers without hashing the data.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flatlens import distributed as fd
from flatlens.core._objective import Objective
from flatlens.landscape._directions import Direction
from flatlens.landscape._grid import Grid
from flatlens.landscape._storage import Landscape, read, store_paths

__all__ = ["components", "fingerprint", "load_store", "restore"]


def _hash_tensor(h: Any, t: Tensor) -> None:
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def components(
    objective: Objective,
    theta: Tensor,
    dirs: Sequence[Direction],
    coords: Sequence[np.ndarray],
    metrics: Sequence[str],
) -> dict[str, str]:
    """Hashes of the arguments that fix the landscape's values (16 hex digits each)."""

    def digest(feed: Callable[[Any], None]) -> str:
        h = hashlib.sha256()
        feed(h)
        return h.hexdigest()[:16]

    space = list(zip(objective.space.names, map(tuple, objective.space.shapes), strict=True))
    setup = (objective.reduction, objective.eval_mode, str(objective.dtype), objective.device.type)
    return {
        "grid": digest(lambda h: [h.update(np.ascontiguousarray(c).tobytes()) for c in coords]),
        "directions": digest(lambda h: [_hash_tensor(h, d.vector) for d in dirs]),
        "theta": digest(lambda h: _hash_tensor(h, theta)),
        "parameters": digest(lambda h: h.update(repr(space).encode())),
        "objective": digest(lambda h: h.update(repr(setup).encode())),
        "metrics": ",".join(metrics),
    }


def fingerprint(parts: dict[str, str]) -> str:
    """One hash of :func:`components`."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def load_store(
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


def restore(
    stored: tuple[Landscape, np.ndarray],
    grid: Grid,
    settings: dict[str, Any],
    store: str | os.PathLike,
    asked: dict[str, Any],
    center: dict[str, float],
) -> None:
    """Load a store's progress into ``grid`` after checking it is the same landscape.

    Args:
        stored: The store's landscape and done mask.
        grid: Filled in place.
        settings: This run's settings; the stored ``method`` and ``chunk_size`` replace
            defaults (the last bits of the values depend on them).
        store: The store's path (for messages).
        asked: The ``method`` and ``chunk_size`` passed (``"auto"``/``None`` = default).
        center: The metric values at the centre now.

    Raises:
        ValueError: the store holds another landscape, or was computed with another
            method or chunk size than the one explicitly asked for.
    """
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
    for key, value in asked.items():
        kept = old.settings.get(key)
        if value not in (None, "auto") and kept not in (None, "auto") and value != kept:
            raise ValueError(
                f"store {path} was computed with {key}={kept!r} but {key}={value!r} was "
                f"passed; the last bits of the values depend on it, so resume with "
                f"{key}={kept!r} (or the default) or use another store"
            )
        if kept not in (None, "auto"):
            settings[key] = kept
    if "vmap_error" in old.settings:
        settings["vmap_error"] = old.settings["vmap_error"]
    for m in grid.values:
        grid.values[m][:] = old.values[m].reshape(-1)
    grid.done[:] = done.reshape(-1)
