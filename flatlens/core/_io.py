"""Atomic file writes and safe checkpoint loading.

Checkpoints are read without running code from the file: ``.safetensors`` files with the
safetensors package (a header and raw tensor bytes, no pickle), everything else (``.pt``,
``.pth``, ``.bin``, Lightning's ``.ckpt``) with ``torch.load(weights_only=True)``.

Every file flatlens writes goes to a temporary file in the same folder first and is then
renamed over the target with :func:`os.replace`, so a reader never sees a half-written file
and an interrupted run leaves the previous version intact.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from flatlens.core._paths import is_empty, not_a_file
from flatlens.core._renames import renamed
from flatlens.core._results import to_jsonable

__all__ = [
    "CheckpointError",
    "atomic_path",
    "load_checkpoint",
    "load_safetensors",
    "load_trusted_tensors",
    "save_torch",
    "write_bytes",
    "write_figure",
    "write_json",
    "write_text",
]


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, untrusted or does not fit the model."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    The temporary file is removed when the block raises; an operating-system error (a full
    disk, a quota) names ``path``, not the temporary file.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException as err:
        tmp_path.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename in (None, str(tmp_path)):
            raise OSError(err.errno, err.strerror or str(err), os.fspath(target)) from err
        raise


@renamed(data="content")
def write_bytes(path: str | os.PathLike, content: bytes) -> None:
    """Write ``content`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` (results, tensors and arrays allowed) as strict, indented JSON."""
    write_text(path, json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` to ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


_TORCH_ADVICE = (
    "weights only load failed",
    "weights_only",
    "please file an issue",
    "check the documentation",
    "add_safe_globals",
    "trusted source",
)


def _unpickler_reason(err: Exception) -> str:
    """What torch's safe unpickler refused (e.g. ``posix.system``), without torch's advice
    to turn the safety check off."""
    text = str(err)
    found = re.search(r"GLOBAL\s+([\w.]+)", text)
    if found:
        return f"it asks for {found.group(1)}, which is neither a tensor nor a plain container"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            if rest:
                return rest
    kept = [line for line in lines if not any(a in line.lower() for a in _TORCH_ADVICE)]
    return kept[0] if kept else type(err).__name__


def _first_line(err: BaseException) -> str:
    """``Type: first sentence of the message`` of an exception (torch's reader appends
    paragraphs of advice to its reasons)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    text = lines[0]
    cut = text.find(". ", 20)
    return f"{type(err).__name__}: {text[: cut + 1] if cut > 0 else text}"


def _is_lightning(path: Path) -> bool:
    return path.suffix == ".ckpt"


def _resave_advice(path: Path) -> str:
    """How to turn a refused file into one that loads."""
    if _is_lightning(path):
        return (
            "Export the weights from a Python session that trusts the file: "
            f"torch.save(torch.load({str(path)!r}, weights_only=False)['state_dict'], "
            "'weights.pt') (or torch.save(YourModule.load_from_checkpoint(path).state_dict(), "
            "'weights.pt')) and pass weights.pt"
        )
    return "Re-save it as a plain state dict: torch.save(model.state_dict(), path)"


def _is_safetensors(path: Path) -> bool:
    """A ``.safetensors`` suffix, or the format's header: a little-endian length then '{'."""
    if path.suffix == ".safetensors":
        return True
    if not_a_file(path) is not None:  # never open a named pipe or a device to sniff it
        return False
    try:
        with path.open("rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    size = int.from_bytes(head[:8], "little")
    return 2 <= size < 100_000_000 and size + 8 <= path.stat().st_size


def load_safetensors(path: str | os.PathLike, *, map_location: Any = "cpu") -> dict[str, Any]:
    """The tensors of a ``.safetensors`` file, read with the safetensors package (no pickle).

    Raises:
        CheckpointError: the path is missing or a folder, the safetensors package is not
            installed, or the file is truncated or corrupt.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise CheckpointError(
            f"checkpoint {path} is a .safetensors file, which needs the safetensors package: "
            "pip install 'flatlens[models]' (or pip install safetensors)"
        ) from err
    device = map_location if isinstance(map_location, str | torch.device) else "cpu"
    try:
        return load_file(path, device=str(device))
    except Exception as err:  # the reader's errors: truncated header, bad offsets, ...
        if path.stat().st_size == 0:
            raise CheckpointError(f"checkpoint {path} is an empty file") from err
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt, or not a .safetensors file "
            f"({_first_line(err)})"
        ) from err


def load_trusted_tensors(path: str | os.PathLike, *, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with every failure explained in one line.

    ``weights_only=True`` unpickles only tensors and plain containers, so a file can never
    run code while it loads. Any exception of the reader (an empty file, text, a zip torch
    did not write, a truncated file) becomes a :class:`CheckpointError`.

    Raises:
        CheckpointError: the path is missing or a folder, the file is unreadable,
            truncated, corrupt or not a torch file, or it needs code to unpickle (refused).
    """
    path = Path(path)
    problem = not_a_file(path)  # before opening: a named pipe or a device never ends
    if problem and not problem.startswith("is a folder"):
        raise CheckpointError(f"checkpoint {path} {problem}")
    if problem:
        hint = (
            f"; a Hugging Face folder is read with --model hf:{path}"
            if (path / "config.json").is_file()
            else ""
        )
        raise CheckpointError(
            f"checkpoint {path} is a folder, not a file; pass the .pt file inside it "
            f"(e.g. model.pt){hint}"
        )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        opcode = re.search(r"Unsupported operand (\d+)", str(err))
        if opcode:
            raise CheckpointError(
                f"checkpoint {path} is not a file torch.save wrote: the safe reader stopped at "
                f"pickle opcode {opcode.group(1)}, so it is corrupt, or a plain pickle, which is "
                f"refused because unpickling it could run arbitrary code. {_resave_advice(path)}"
            ) from err
        if "GLOBAL" not in str(err) and "WeightsUnpickler" not in str(err):
            raise CheckpointError(
                f"checkpoint {path} is truncated or corrupt, or not a file torch.save wrote "
                f"({_first_line(err)})"
            ) from err
        what, how = "checkpoint", ""
        if _is_lightning(path):
            what, how = "Lightning checkpoint", "; it is read with torch.load(weights_only=True)"
        raise CheckpointError(
            f"{what} {path} was refused: unpickling it needs code beyond tensors and plain "
            f"containers, which could run arbitrary code ({_unpickler_reason(err)}){how}. "
            f"{_resave_advice(path)}"
        ) from err
    except PermissionError as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({_first_line(err)})") from err
    except Exception as err:
        if is_empty(path):  # not st_size: /proc files have size 0 and hold text
            raise CheckpointError(f"checkpoint {path} is an empty file") from err
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt, or not a file torch.save wrote "
            f"({_first_line(err)})"
        ) from err


def load_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a state dict without running code from the file, and explain every failure.

    A ``.safetensors`` file (by suffix or header) is read with the safetensors package; any
    other file with ``torch.load(weights_only=True)``, which accepts a plain state dict or a
    dict holding one under ``"model"``, ``"state_dict"`` (Lightning's ``.ckpt``) or
    ``"model_state_dict"``.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, needs code to unpickle
            (refused: it could run arbitrary code), or holds no state dict.
    """
    if _is_safetensors(Path(path)):
        return load_safetensors(path, map_location=map_location)
    obj = load_trusted_tensors(path, map_location=map_location)
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"checkpoint {path} holds no state dict (a mapping of names to tensors, possibly "
            "under the key 'model')"
        )
    return obj


def write_figure(fig: Any, path: str | os.PathLike, *, dpi: int = 130) -> Path:
    """Save a matplotlib figure atomically; the format comes from the suffix.

    Raises:
        ValueError: the suffix is not ``.png``, ``.pdf`` or ``.svg``.
    """
    fmt = os.fspath(path).rsplit(".", 1)[-1].lower()
    if fmt not in ("png", "pdf", "svg"):
        raise ValueError(f"figure path must end in .png, .pdf or .svg, got {os.fspath(path)!r}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=dpi, bbox_inches="tight")
    write_bytes(path, buffer.getvalue())
    return Path(path)
