"""Resumable multi-part jobs: each finished part is stored as JSON and reused on ``--resume``.

A part is reused only when its fingerprint matches: the job's key (the model weights and
the data) combined with the settings that part depends on. Changing one setting (say the
radii of the bound check) therefore recomputes only the parts that use it, and a resumed
job never mixes results of different weights or data.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from flatlens.core._io import write_json
from flatlens.core._results import to_jsonable

if TYPE_CHECKING:
    from flatlens.data import Dataset

__all__ = [
    "PartStore",
    "data_digest",
    "fingerprint",
    "landscape_part",
    "loss_key",
    "loss_label",
    "model_digest",
]


def model_digest(model: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a model's parameters and buffers."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_digest(data: Dataset) -> str:
    """A cheap fingerprint of a data set (see :func:`flatlens.data.digest`)."""
    from flatlens.data import digest

    return digest(data)


def fingerprint(*items: Any) -> str:
    """A short stable hash of JSON-able values (key order does not matter)."""
    text = json.dumps(to_jsonable(items), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def loss_label(loss_fn: Any) -> str:
    """``module.qualname`` of a loss function, or of a loss module's class."""
    fn = loss_fn if not isinstance(loss_fn, nn.Module) else type(loss_fn)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def loss_key(loss_fn: Any) -> str:
    """What identifies a loss for reusing stored parts: its class or function and, for a
    module, its plain settings and buffers (e.g. label smoothing, class weights)."""
    if not isinstance(loss_fn, nn.Module):
        return loss_label(loss_fn)
    plain = {
        k: v
        for k, v in sorted(vars(loss_fn).items())
        if not k.startswith("_") and isinstance(v, bool | int | float | str | type(None))
    }
    return fingerprint(loss_label(loss_fn), plain, model_digest(loss_fn))


class PartStore:
    """Runs named parts once and keeps their JSON results as ``folder/<name>.json``.

    Args:
        folder: Where the part files go (created on the first write).
        key: Fingerprint of what every part depends on (weights, data).
        resume: Reuse stored parts whose fingerprint matches; otherwise recompute all.
    """

    def __init__(self, folder: str | os.PathLike, key: str, *, resume: bool) -> None:
        self.folder = Path(folder)
        self.key = key
        self.resume = resume
        self.reused: list[str] = []
        self.computed: list[str] = []

    def part_key(self, settings: Mapping[str, Any] | None = None) -> str:
        """The fingerprint of a part: the store's key plus the part's own settings."""
        return fingerprint(self.key, dict(settings or {}))

    def path(self, name: str) -> Path:
        """The JSON file of part ``name``."""
        return self.folder / f"{name}.json"

    def lookup(
        self,
        name: str,
        settings: Mapping[str, Any] | None = None,
        files: Iterable[str | os.PathLike] = (),
    ) -> tuple[bool, Any]:
        """``(True, value)`` when ``name`` is stored with a matching fingerprint and every
        file in ``files`` exists; ``(False, None)`` otherwise (also when not resuming)."""
        path = self.path(name)
        if not self.resume or not path.is_file():
            return False, None
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except Exception:  # an unreadable part is recomputed, never reused
            return False, None
        if not isinstance(stored, dict) or stored.get("key") != self.part_key(settings):
            return False, None
        if not all(Path(f).is_file() for f in files):
            return False, None
        return True, stored.get("value")

    def save(self, name: str, value: Any, settings: Mapping[str, Any] | None = None) -> Any:
        """Store ``value`` (converted to JSON values) as part ``name``; returns the stored value."""
        value = to_jsonable(value)
        write_json(self.path(name), {"key": self.part_key(settings), "value": value})
        return value

    def run(
        self,
        name: str,
        compute: Callable[[], Any],
        *,
        settings: Mapping[str, Any] | None = None,
        files: Iterable[str | os.PathLike] = (),
    ) -> Any:
        """The stored value of ``name`` when resuming and it matches, else ``compute()``,
        stored.

        Args:
            name: Part name (also its file name).
            compute: Produces the value (a :class:`~flatlens.core.Result`, dict, ...).
            settings: The settings this part depends on, beyond the store's key.
            files: Files the part wrote that must still exist for it to be reused.

        Returns:
            The part's value as JSON values (dicts, lists, numbers, strings, None).
        """
        files = list(files)
        found, value = self.lookup(name, settings, files)
        if found:
            self.reused.append(name)
            return value
        value = self.save(name, compute(), settings)
        self.computed.append(name)
        return value

    def run_resumable(
        self,
        name: str,
        compute: Callable[[], Any],
        *,
        settings: Mapping[str, Any],
        files: Iterable[str | os.PathLike],
        outputs: Iterable[str | os.PathLike] | None = None,
    ) -> Any:
        """Like :meth:`run`, for a part whose ``compute`` can continue its own interrupted
        output files (a landscape grid).

        A marker part ``<name>.started`` records the settings before ``compute`` runs, so
        an interrupted part is continued only when it was started with the same key and
        settings; otherwise its ``outputs`` (default: ``files``) are deleted first.
        """
        files = list(files)
        found, value = self.lookup(name, settings, files)
        if found:
            self.reused.append(name)
            return value
        started, _ = self.lookup(f"{name}.started", settings)
        if not started:
            for stale in files if outputs is None else outputs:
                Path(stale).unlink(missing_ok=True)
            self.save(f"{name}.started", {"files": [Path(f).name for f in files]}, settings)
        value = self.save(name, compute(), settings)
        self.path(f"{name}.started").unlink(missing_ok=True)
        self.computed.append(name)
        return value


def landscape_part(
    store: PartStore,
    name: str,
    compute: Callable[[Path], Any],
    settings: dict[str, Any],
    out: Path,
) -> dict[str, Any]:
    """Run one landscape through ``store``; its grid lives in ``out/<name>.npz``, and a
    resumed run continues an interrupted grid of the same weights, data and settings."""
    from flatlens.landscape._storage import store_paths

    path = out / f"{name}.npz"

    def summary() -> dict[str, Any]:
        result = compute(path)
        values = result.values["loss"]
        return {
            "path": path.name,
            "num_points": settings["num_points"],
            "span": settings["span"],
            "loss_center": result.center.get("loss"),
            "loss_min": float(values.min()),
            "loss_max": float(values.max()),
        }

    return store.run_resumable(
        name, summary, settings=settings, files=[path], outputs=store_paths(path)
    )
