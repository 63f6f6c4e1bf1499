"""Import torchvision (for ``--data imagefolder:DIR``, and before timm or Hugging Face's model
classes, which import it), also where its C++ ops do not load.

A torchvision wheel built for another torch (say a CUDA torchvision beside a CPU-only torch)
fails at ``import torchvision``: registering the fake (meta) kernel of one of its C++ ops,
``@torch.library.register_fake("torchvision::nms")``, raises ``RuntimeError: operator
torchvision::nms does not exist``. flatlens needs only ``torchvision.datasets.ImageFolder``
and ``torchvision.transforms``, which are plain Python, so :func:`import_torchvision` skips
exactly those registrations while importing. With a matched install nothing is skipped and
every torchvision feature works as usual.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import torch.library

__all__ = ["import_torchvision"]


def _missing_op(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and "does not exist" in str(err)


@contextlib.contextmanager
def _tolerant_register_fake() -> Iterator[list[str]]:
    """Within the block, ``torch.library.register_fake`` ignores operators that do not
    exist (decorator and direct form); yields the list of skipped operators."""
    original = torch.library.register_fake
    skipped: list[str] = []

    @functools.wraps(original)
    def register_fake(op: Any, func: Callable | None = None, /, *args: Any, **kwargs: Any):
        if func is not None:
            try:
                return original(op, func, *args, **kwargs)
            except RuntimeError as err:
                if not _missing_op(err):
                    raise
                skipped.append(str(op))
                return func
        decorator = original(op, *args, **kwargs)

        def apply(fn: Callable) -> Callable:
            try:
                return decorator(fn)
            except RuntimeError as err:
                if not _missing_op(err):
                    raise
                skipped.append(str(op))
                return fn

        return apply

    torch.library.register_fake = register_fake
    try:
        yield skipped
    finally:
        torch.library.register_fake = original


def import_torchvision() -> ModuleType:
    """``torchvision``, imported with the registrations of missing C++ ops skipped.

    Raises:
        ImportError: torchvision is not installed, or fails to import for another reason
            (the message says which).
    """
    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "datasets"):
        return sys.modules["torchvision"]
    try:
        with _tolerant_register_fake():
            import torchvision
            import torchvision.datasets
            import torchvision.transforms
    except ModuleNotFoundError as err:
        if err.name == "torchvision":
            raise ImportError(
                "imagefolder:DIR needs torchvision: pip install torchvision (the build that "
                "matches your torch)"
            ) from err
        raise ImportError(f"torchvision cannot be imported ({type(err).__name__}: {err})") from err
    except Exception as err:
        text = " ".join(str(err).split())
        raise ImportError(f"torchvision cannot be imported ({type(err).__name__}: {text})") from err
    return torchvision
