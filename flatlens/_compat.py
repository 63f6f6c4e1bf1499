"""Import torchvision, timm, transformers, lightning and any module that imports them, also where
torchvision's C++ ops do not load.

A torchvision wheel built for another torch (say a CUDA torchvision beside a CPU-only torch)
fails at ``import torchvision``: registering the fake (meta) kernel of one of its C++ ops,
``@torch.library.register_fake("torchvision::nms")``, raises ``RuntimeError: operator
torchvision::nms does not exist``. flatlens needs only ``torchvision.datasets.ImageFolder``
and ``torchvision.transforms``, which are plain Python, so :func:`import_torchvision` skips
exactly those registrations while importing. With a matched install nothing is skipped and
every torchvision feature works as usual.

timm, transformers (its ``Trainer`` and model classes), lightning and user modules that
import them import torchvision on the way, so every such import in flatlens goes through
:func:`import_module` (a named library) or :func:`tolerant_imports` (a user's
``package.module:factory``), which apply the same fix to the torchvision import inside.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import torch.library

__all__ = ["import_module", "import_torchvision", "prepare_torchvision", "tolerant_imports"]


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


_LAZY = ("transformers", "timm", "lightning", "pytorch_lightning")


def _torchvision_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("torchvision") is not None
    except (ImportError, ValueError):
        return False


@contextlib.contextmanager
def tolerant_imports() -> Iterator[None]:
    """Within the block, an import of torchvision (direct, or through timm, transformers,
    lightning or a user's module) skips the registrations of missing C++ ops.

    transformers imports most of itself lazily, on first attribute access (``Trainer``, a
    model class), which may come after the block: when the block imported one of the
    libraries that do, torchvision is imported (with the fix) on leaving it.
    """
    if "torchvision" in sys.modules:
        yield
        return
    with _tolerant_register_fake():
        yield
    if any(name in sys.modules for name in _LAZY) and _torchvision_installed():
        try:
            import_torchvision()
        except ImportError:  # what needs torchvision reports it when it is used
            pass


_EXTRAS = {
    "lightning": "lightning",
    "pytorch_lightning": "lightning",
    "transformers": "transformers",
    "datasets": "transformers",
    "safetensors": "models",
    "timm": "models",
    "torchvision": "models",
    "tensorboard": "tensorboard",
}


def prepare_torchvision() -> None:
    """Import torchvision through the fix now, when it is installed and not yet imported, so
    that a later plain ``import lightning`` (or timm, transformers) finds it in
    ``sys.modules`` instead of failing on its C++ ops. Does nothing otherwise."""
    if "torchvision" not in sys.modules and _torchvision_installed():
        try:
            import_torchvision()
        except ImportError:
            pass


def import_module(name: str, *, purpose: str = "") -> ModuleType:
    """``importlib.import_module(name)`` with the torchvision fix applied inside.

    Args:
        name: A module such as ``"timm"``, ``"transformers"``, ``"lightning.pytorch"``.
        purpose: What it is needed for, for the message (e.g. ``"--model hf:DIR"``).

    Raises:
        ImportError: the package is not installed (the message names the flatlens extra that
            brings it), or importing it failed (the message gives the reason in one line).
    """
    top = name.partition(".")[0]
    if top in ("torchvision",):
        tv = import_torchvision()
        return importlib.import_module(name) if name != "torchvision" else tv
    need = f"{purpose} needs {top}" if purpose else f"{top} is needed"
    if top in _LAZY:
        prepare_torchvision()
    try:
        with tolerant_imports():
            return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and (err.name == top or name.startswith(err.name)):
            extra = _EXTRAS.get(top)
            how = f"pip install 'flatlens[{extra}]'" if extra else f"pip install {top}"
            raise ImportError(f"{need} but it is not installed: {how}") from err
        text = " ".join(str(err).split())
        raise ImportError(f"{top} cannot be imported ({type(err).__name__}: {text})") from err
    except Exception as err:
        text = " ".join(str(err).split())
        raise ImportError(f"{top} cannot be imported ({type(err).__name__}: {text})") from err
