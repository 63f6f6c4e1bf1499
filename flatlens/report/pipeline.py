"""Resumable multi-part jobs: each finished part is stored as JSON and reused on ``--resume``.

A part is reused only when its fingerprint (the settings and the model weights that
produced it) matches, so a resumed job never mixes results of different runs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flatlens.io import write_json
from flatlens.results import to_jsonable

__all__ = ["PartStore", "fingerprint", "model_digest"]


def model_digest(model: nn.Module) -> str:
    """SHA-256 over the names and bytes of a model's parameters and buffers."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint(*items: Any) -> str:
    """A short stable hash of JSON-able settings."""
    text = json.dumps(to_jsonable(items), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class PartStore:
    """Runs named parts once and keeps their JSON results under ``folder``.

    Args:
        folder: Where ``<name>.json`` files go.
        key: Fingerprint of the job; stored parts with another key are recomputed.
        resume: Reuse stored parts with a matching key.
    """

    def __init__(self, folder: str | Path, key: str, *, resume: bool) -> None:
        self.folder = Path(folder)
        self.key = key
        self.resume = resume
        self.reused: list[str] = []

    def run(self, name: str, compute: Callable[[], Any]) -> Any:
        """Return the stored result of ``name`` when resuming, else compute and store it."""
        path = self.folder / f"{name}.json"
        if self.resume and path.is_file():
            try:
                stored = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                stored = None
            if isinstance(stored, dict) and stored.get("key") == self.key:
                self.reused.append(name)
                return stored["value"]
        value = to_jsonable(compute())
        write_json(path, {"key": self.key, "value": value})
        return value
