"""Small reference models and the one rule that turns a model spec into a network.

A model spec is one of

* a zoo name: ``mlp``, ``cnn``, ``resnet18``, ``wrn16_8``, ``wrn28_10``;
* ``package.module:factory``: a function (or class) that returns the network, e.g.
  ``timm:create_model`` with ``--model-kwargs '{"model_name": "resnet18"}'``;
* ``LIBRARY/NAME``, an architecture of a library by name, built with random weights (never
  downloaded): ``timm/NAME`` (``timm.create_model(NAME, pretrained=False)``, e.g.
  ``timm/vit_tiny_patch16_224``) or ``torchvision/NAME``
  (``torchvision.models.get_model(NAME, weights=None)``, e.g. ``torchvision/resnet18``). A
  slash, and no colon, tells it from ``package.module:factory``.

(``hf:DIR``, a Hugging Face model folder, is read by the commands that load a checkpoint;
see :mod:`flatlens.cli._hf`.) The trainer, the studies and the ``flatlens`` command all build
models through :func:`build`, so a spec means the same network everywhere.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from flatlens._wide_resnet import WideResNet

if TYPE_CHECKING:
    from flatlens.data import Dataset

__all__ = [
    "LIBRARIES",
    "MODELS",
    "ResNet18",
    "WideResNet",
    "build",
    "check_spec",
    "cnn",
    "factory",
    "import_object",
    "mlp",
    "resnet18",
    "wrn16_8",
    "wrn28_10",
]


def mlp(
    in_features: int = 64, hidden: int = 64, num_classes: int = 10, depth: int = 2
) -> nn.Module:
    """A ReLU multilayer perceptron with ``depth`` hidden layers of width ``hidden``."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(in_channels: int = 1, channels: int = 16, num_classes: int = 10) -> nn.Module:
    """A small conv-BatchNorm-ReLU network for 8x8 (digits) or 32x32 (CIFAR) images."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * channels),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * channels, num_classes),
    )


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), as in the GAM paper's CIFAR runs."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        blocks, cin = [], width
        for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if i == 0 else 2
            blocks += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def resnet18(num_classes: int = 10, width: int = 64) -> nn.Module:
    """CIFAR ResNet-18 (11M parameters at width 64): the GAM code's ``resnet18_c``, module for
    module in the same order, so the same seed gives the same initial weights."""
    return ResNet18(num_classes, width)


def wrn16_8(num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """WideResNet-16-8 (see :class:`WideResNet`; ``layout="davda54"`` for the SAM code's)."""
    return WideResNet(16, 8, num_classes=num_classes, **kwargs)


def wrn28_10(num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """WideResNet-28-10 (see :class:`WideResNet`)."""
    return WideResNet(28, 10, num_classes=num_classes, **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "resnet18": resnet18,
    "wrn16_8": wrn16_8,
    "wrn28_10": wrn28_10,
}

LIBRARIES = ("timm", "torchvision")
"""The libraries whose architectures a ``LIBRARY/NAME`` spec names."""


def library_spec(spec: str) -> tuple[str, str] | None:
    """``(library, name)`` for a ``LIBRARY/NAME`` spec (no colon, a slash), else None."""
    if ":" in spec or "/" not in spec:
        return None
    library, _, name = spec.partition("/")
    return library, name


def _library_factory(spec: str, library: str, name: str) -> Callable[..., nn.Module]:
    """The builder of ``LIBRARY/NAME``: the library's own constructor, random weights."""
    from flatlens._compat import import_module

    try:
        module = import_module(library, purpose=f"--model {spec}")
    except ImportError as err:
        raise ValueError(str(err)) from err
    if library == "timm":
        if not module.is_model(name):
            raise ValueError(
                f"unknown timm model {name!r} in {spec!r}; timm.list_models('*vit*') lists "
                "the names (a pretrained tag such as '.augreg_in21k' is not part of it)"
            )

        def build_timm(**kwargs: Any) -> nn.Module:
            return module.create_model(name, pretrained=False, **kwargs)

        return build_timm
    models = import_module("torchvision.models", purpose=f"--model {spec}")
    if name not in models.list_models():
        raise ValueError(
            f"unknown torchvision model {name!r} in {spec!r}; "
            "torchvision.models.list_models() lists the names"
        )

    def build_torchvision(**kwargs: Any) -> nn.Module:
        return models.get_model(name, weights=None, **kwargs)

    return build_torchvision


def _library_defaults(library: str, data: Dataset) -> dict[str, Any]:
    """Shape arguments of a library model taken from the data."""
    shape = data.input_shape
    out: dict[str, Any] = {"num_classes": data.num_classes}
    if library == "timm" and len(shape) == 3:
        out["in_chans"] = shape[0]
    return out


def check_spec(spec: object) -> str:
    """Check the form of a model spec without importing anything; returns ``spec``.

    Only the form is checked, so a configuration can name a factory whose package is
    imported later, when the model is built.

    Raises:
        TypeError: ``spec`` is not a string.
        ValueError: an unknown zoo name, or a ``:`` spec with an empty module or factory.
    """
    if not isinstance(spec, str):
        raise TypeError(f"model must be a string, not {type(spec).__name__}")
    lib = library_spec(spec)
    if lib is not None:
        if lib[0] not in LIBRARIES or not lib[1]:
            raise ValueError(
                f"model {spec!r}: LIBRARY/NAME names an architecture of "
                f"{' or '.join(LIBRARIES)} (e.g. timm/vit_tiny_patch16_224); a factory is "
                "package.module:factory"
            )
        return spec
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise ValueError(f"model {spec!r} must look like package.module:factory")
    elif spec not in MODELS:
        raise ValueError(
            f"unknown model {spec!r}; use one of {sorted(MODELS)}, package.module:factory or "
            "timm/NAME, torchvision/NAME"
        )
    return spec


def import_object(spec: str, what: str = "model factory") -> Any:
    """The object ``package.module:name`` names, importing its module.

    Any exception while importing the module (an ``ImportError``, but also a
    ``RuntimeError`` or ``SyntaxError`` raised by the module's own code) becomes one
    :class:`ValueError` naming the spec, the module, the exception's type and its message.

    Args:
        spec: ``package.module:name`` (``name`` may be dotted: ``module:Class.method``).
        what: What the object is, for messages (``"model factory"``, ``"loss"``, ...).

    Raises:
        ValueError: a malformed spec, a module that cannot be imported, or a missing name.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{what} {spec!r} must look like package.module:name")
    from flatlens._compat import tolerant_imports

    try:
        # The module may import torchvision, timm, transformers or lightning: the
        # compatibility fix of flatlens._compat applies to that import too.
        with tolerant_imports():
            found: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise ValueError(
                f"cannot import {what} {spec!r}: no module named {err.name!r}; is its package "
                "on PYTHONPATH?"
            ) from err
        raise ValueError(_import_failure(spec, what, module_name, err)) from err
    except (Exception, SystemExit) as err:  # the user's module code failed
        raise ValueError(_import_failure(spec, what, module_name, err)) from err
    for part in attr.split("."):
        try:
            found = getattr(found, part)
        except AttributeError as err:
            raise ValueError(
                f"cannot import {what} {spec!r}: module {module_name!r} has no attribute {attr!r}"
            ) from err
    return found


def _import_failure(spec: str, what: str, module: str, err: BaseException) -> str:
    where, text = "", " ".join(str(err).split()) or "(no message)"
    if isinstance(err, SyntaxError) and err.filename:
        where, text = f" at {err.filename}:{err.lineno}", err.msg or text
    return (
        f"cannot import {what} {spec!r}: importing module {module!r} raised "
        f"{type(err).__name__}{where}: {text}"
    )


def factory(spec: str) -> Callable[..., nn.Module]:
    """The callable a model spec names, imported for a ``package.module:factory`` spec.

    Raises:
        TypeError: ``spec`` is not a string.
        ValueError: a bad spec (see :func:`check_spec`), a factory that cannot be imported
            (whatever its module raised), or one that is not callable.
    """
    check_spec(spec)
    lib = library_spec(spec)
    if lib is not None:
        return _library_factory(spec, *lib)
    if ":" not in spec:
        return MODELS[spec]
    if spec.startswith("hf:"):
        raise ValueError(
            f"model {spec!r} is a Hugging Face folder: the commands that read a checkpoint "
            "(diagnose, bound, landscape) load it with its weights; to train it, pass a "
            "package.module:factory that builds it"
        )
    found = import_object(spec, "model factory")
    if not callable(found):
        raise ValueError(f"model factory {spec!r} is not callable")
    return found


def build(spec: str, /, data: Dataset | None = None, **kwargs: Any) -> nn.Module:
    """Build the model a spec names, with shape arguments taken from ``data``.

    Args:
        spec: A zoo name (:data:`MODELS`), ``package.module:factory``, ``timm/NAME`` or
            ``torchvision/NAME``.
        data: When given, ``num_classes``, ``in_features`` (the product of the input
            shape) and ``in_channels`` (the first axis of image inputs) are passed to the
            factory where its signature takes them and ``kwargs`` does not set them; a
            library model gets ``num_classes`` (and timm's ``in_chans``).
        **kwargs: Arguments of the factory.

    Raises:
        TypeError: ``spec`` is not a string, or the factory returned no ``nn.Module``.
        ValueError: an unknown name, a factory that cannot be imported, arguments it does
            not take, or any exception the factory raised (its type and message kept).
    """
    make = factory(spec)
    lib = library_spec(spec)
    if data is not None and lib is not None:
        for key, value in _library_defaults(lib[0], data).items():
            kwargs.setdefault(key, value)
    elif data is not None:
        try:
            accepted = inspect.signature(make).parameters
        except (TypeError, ValueError):
            accepted = {}
        shape = data.input_shape
        defaults = {
            "num_classes": data.num_classes,
            "in_features": math.prod(shape),
            "in_channels": shape[0] if len(shape) == 3 else None,
        }
        for key, value in defaults.items():
            if key in accepted and key not in kwargs and value is not None:
                kwargs[key] = value
    try:
        inspect.signature(make).bind(**kwargs)
    except TypeError as err:
        raise ValueError(f"model {spec!r} does not take the arguments {kwargs}: {err}") from err
    except ValueError:  # no signature to check (a builtin): let the call decide
        pass
    try:
        model = make(**kwargs)
    except Exception as err:  # the user's factory failed
        text = " ".join(str(err).split()) or "(no message)"
        raise ValueError(
            f"model factory {spec!r} raised {type(err).__name__}: {text} (arguments {kwargs})"
        ) from err
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory {spec!r} returned {type(model).__name__}, not a Module")
    return model
