"""Turn command-line style names into models, data sets and loaded weights.

* a model is a zoo name (``mlp``, ``cnn``, ``resnet18``) or ``package.module:factory``;
  arguments the factory accepts (``in_features``, ``in_channels``, ``num_classes``) are
  filled in from the data set unless given;
* a data set is ``digits``, ``cifar10:DIR`` or ``cifar100:DIR``.
"""

from __future__ import annotations

import importlib
import inspect
import math
from pathlib import Path
from typing import Any

from torch import nn

from flatlens import zoo
from flatlens.data import Dataset, load_cifar, load_digits
from flatlens.io import CheckpointError, load_checkpoint

__all__ = ["build_model", "load_data", "load_weights"]


def load_data(spec: str) -> Dataset:
    """Load ``digits``, ``cifar10:DIR`` or ``cifar100:DIR`` (never downloads)."""
    name, _, folder = spec.partition(":")
    if name == "digits":
        return load_digits(image=True)
    if name in ("cifar10", "cifar100"):
        if not folder:
            raise ValueError(f"--data {name} needs a folder: {name}:/path/to/{name}")
        return load_cifar(Path(folder), num_classes=10 if name == "cifar10" else 100)
    raise ValueError(f"unknown data set {spec!r}; use digits, cifar10:DIR or cifar100:DIR")


def build_model(spec: str, data: Dataset | None = None, **kwargs: Any) -> nn.Module:
    """Build a zoo model or ``package.module:factory``, filling shape arguments from ``data``."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot import model factory {spec!r}: {err}") from err
    elif spec in zoo.MODELS:
        factory = zoo.MODELS[spec]
    else:
        raise ValueError(
            f"unknown model {spec!r}; use one of {sorted(zoo.MODELS)} or package.module:factory"
        )
    if data is not None:
        try:
            accepted = inspect.signature(factory).parameters
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
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory {spec!r} returned {type(model).__name__}, not a Module")
    return model


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a checkpoint into ``model`` with ``weights_only=True``.

    Raises:
        CheckpointError: missing/corrupt/untrusted file, or keys that do not fit the model
            (the message lists the missing and unexpected keys).
    """
    state = load_checkpoint(path)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:400]
        raise CheckpointError(f"checkpoint {path} does not fit the model: {detail}") from err
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model: missing keys "
            f"{result.missing_keys[:8]}{' ...' if len(result.missing_keys) > 8 else ''}, "
            f"unexpected keys {result.unexpected_keys[:8]}"
            f"{' ...' if len(result.unexpected_keys) > 8 else ''}"
        )
    return model
