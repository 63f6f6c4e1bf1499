"""Importing torchvision (and so timm and Hugging Face's model classes) beside a torch build
it was not made for.

PyPI's torchvision wheel is built against the CUDA torch; next to a CPU build of the same
version, its C++ operators (``nms``, ``roi_align``, ...) do not load, and ``import
torchvision`` fails while registering their fake (meta) kernels with
``torch.library.register_fake``: "operator torchvision::nms does not exist". The models,
transforms and datasets are pure Python and work. :func:`import_torchvision` imports it with
those registrations skipped. With a matched install (torch and torchvision from the same
index) it is a plain import and nothing is skipped.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import torch.library

__all__ = ["import_torchvision"]


@contextlib.contextmanager
def _skip_missing_operator_registrations() -> Iterator[None]:
    original = torch.library.register_fake

    def register_fake(op: Any, func: Callable | None = None, /, **kwargs: Any) -> Any:
        def apply(fn: Callable) -> Callable:
            try:
                return original(op, fn, **kwargs)
            except RuntimeError as err:
                if "does not exist" not in str(err):
                    raise
                return fn  # the C++ operator is not loaded: nothing to register against

        return apply if func is None else apply(func)

    torch.library.register_fake = register_fake
    try:
        yield
    finally:
        torch.library.register_fake = original


def import_torchvision() -> ModuleType:
    """``import torchvision``, skipping fake-kernel registrations of operators that did not
    load (see the module docstring). Raises ``ImportError`` when it is not installed."""
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    try:
        return importlib.import_module("torchvision")
    except RuntimeError:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    with _skip_missing_operator_registrations():
        return importlib.import_module("torchvision")
