"""Whose exception is it? An error raised inside the user's own model, loss or data code is
reported as theirs (exit code 2, one line naming the spec, the exception type and where it
was raised), whatever its class; only an error of flatlens itself shows a traceback.

The specs ``--model``, ``--loss`` and ``--data`` of the form ``package.module:name`` name
the user's modules (not flatlens's or torch's own); the traceback of the exception is
searched for frames in their files.
When several specs share a file, the frame the user's code was entered through decides: a
method of a ``torch.nn.Module`` is the model's (unless that module is the loss), of a data
set the data's, the loss callable's own code the loss's.
"""

from __future__ import annotations

import argparse
import os
import sys
from types import FrameType, TracebackType
from typing import Any

__all__ = ["blame_user_code"]

_ROLES = (("model", "model"), ("loss", "loss"), ("data", "data"))
# Specs naming these packages' functions (``torch.nn.functional:mse_loss``) are not the
# user's code: their frames run under flatlens's own calls too.
_NOT_THEIRS = {"flatlens", "torch"}


def _spec_object(spec: str) -> tuple[str | None, Any]:
    """The file of the module ``spec`` (``module:name``) names and the named object, when
    that module has been imported."""
    module_name, _, attr = spec.partition(":")
    if module_name.split(".")[0] in _NOT_THEIRS:
        return None, None
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if not file:
        return None, None
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    return os.path.realpath(file), obj


def _frames(tb: TracebackType | None) -> list[tuple[FrameType, int]]:
    out = []
    while tb is not None:
        out.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    return out


def _is_instance(obj: object, module: str, name: str) -> bool:
    cls = getattr(sys.modules.get(module), name, None)
    return isinstance(cls, type) and isinstance(obj, cls)


def _role_of(frame: FrameType, candidates: list[tuple[str, str, Any]]) -> tuple[str, str]:
    """The role (model, loss or data) whose code ``frame`` runs, among ``candidates`` that
    share its file."""
    if len(candidates) == 1:
        return candidates[0][:2]
    this = frame.f_locals.get("self")
    for role, spec, obj in candidates:
        if role != "loss" or obj is None:
            continue
        code = getattr(obj, "__code__", None)
        if code is frame.f_code or (this is not None and this is obj):
            return role, spec
        if isinstance(obj, type) and this is not None and isinstance(this, obj):
            return role, spec
    wanted = None
    if _is_instance(this, "torch.nn", "Module"):
        wanted = "model"
    elif _is_instance(this, "torch.utils.data", "Dataset"):
        wanted = "data"
    for role, spec, _ in candidates:
        if role == wanted:
            return role, spec
    return candidates[0][:2]


def blame_user_code(args: argparse.Namespace | None, err: BaseException) -> str | None:
    """One line saying that the user's model, loss or data raised ``err``, or None when no
    frame of its traceback runs the user's code.

    Args:
        args: The parsed command line (its ``model``, ``loss`` and ``data`` specs).
        err: The exception that ended the command.
    """
    if args is None:
        return None
    files: dict[str, list[tuple[str, str, Any]]] = {}
    for role, attr in _ROLES:
        spec = getattr(args, attr, None)
        if not isinstance(spec, str) or ":" not in spec:
            continue
        file, obj = _spec_object(spec)
        if file is not None:
            files.setdefault(file, []).append((role, spec, obj))
    if not files:
        return None
    mine = [
        (frame, line)
        for frame, line in _frames(err.__traceback__)
        if os.path.realpath(frame.f_code.co_filename) in files
    ]
    if not mine:
        return None
    entry, _ = mine[0]  # where flatlens (or torch) called into the user's code
    inner, line = mine[-1]  # where it raised
    role, spec = _role_of(entry, files[os.path.realpath(entry.f_code.co_filename)])
    text = " ".join(str(err).split()) or "(no message)"
    where = f"{os.path.basename(inner.f_code.co_filename)}:{line} in {inner.f_code.co_name}"
    return f"the {role} {spec!r} raised {type(err).__name__}: {text} ({where})"
