"""Turn command-line style names into models, data sets and loaded weights.

* a model is a zoo name (``mlp``, ``cnn``, ``resnet18``) or ``package.module:factory``;
  arguments the factory accepts (``in_features``, ``in_channels``, ``num_classes``) are
  filled in from the data set unless given;
* a data set is ``digits``, ``cifar10:DIR`` or ``cifar100:DIR``;
* weights come from a checkpoint loaded with ``torch.load(weights_only=True)``, which never
  runs code from the file.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flatlens import zoo
from flatlens.core._io import CheckpointError, load_checkpoint
from flatlens.data import Dataset, load_cifar, load_digits

__all__ = [
    "build_model",
    "check_model_spec",
    "check_state_dict",
    "load_data",
    "load_weights",
    "match_dtype",
]

_SHOWN = 8


def load_data(spec: str) -> Dataset:
    """Load ``digits``, ``cifar10:DIR`` or ``cifar100:DIR`` (never downloads).

    Raises:
        ValueError: an unknown name, or a CIFAR name without a folder.
        FileNotFoundError: the CIFAR folder or one of its files is missing.
    """
    name, _, folder = spec.partition(":")
    if name == "digits":
        if folder:
            raise ValueError(f"--data digits takes no folder (it ships with scikit-learn): {spec}")
        return load_digits(image=True)
    if name in ("cifar10", "cifar100"):
        if not folder:
            raise ValueError(f"--data {name} needs a folder: {name}:/path/to/{name}")
        return load_cifar(Path(folder), num_classes=10 if name == "cifar10" else 100)
    raise ValueError(f"unknown data set {spec!r}; use digits, cifar10:DIR or cifar100:DIR")


def check_model_spec(spec: str) -> None:
    """Raise unless ``spec`` names a zoo model or has the form ``package.module:factory``.

    Only the form is checked: the factory is imported when the model is built (see
    :func:`build_model`), so a configuration can name a model whose package is not imported
    yet.

    Raises:
        TypeError: ``spec`` is not a string.
        ValueError: an unknown zoo name, or a ``:`` spec with an empty module or factory.
    """
    if not isinstance(spec, str):
        raise TypeError(f"model must be a string, not {type(spec).__name__}")
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise ValueError(f"model {spec!r} must look like package.module:factory")
    elif spec not in zoo.MODELS:
        raise ValueError(
            f"unknown model {spec!r}; use one of {sorted(zoo.MODELS)} or package.module:factory"
        )


def _factory(spec: str) -> Any:
    check_model_spec(spec)
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(
                f"cannot import model factory {spec!r} ({type(err).__name__}: {err}); is its "
                "package on PYTHONPATH?"
            ) from err
        if not callable(factory):
            raise ValueError(f"model factory {spec!r} is not callable")
        return factory
    return zoo.MODELS[spec]


def build_model(spec: str, data: Dataset | None = None, **kwargs: Any) -> nn.Module:
    """Build a zoo model or ``package.module:factory``, filling shape arguments from ``data``.

    Args:
        spec: ``mlp``, ``cnn``, ``resnet18`` or ``package.module:factory``.
        data: When given, ``num_classes``, ``in_features`` (product of the input shape) and
            ``in_channels`` (first axis of image inputs) are passed to the factory if its
            signature accepts them and ``kwargs`` does not set them.
        **kwargs: Arguments of the factory.

    Raises:
        ValueError: unknown name, factory not importable, or arguments it does not take.
        TypeError: the factory did not return a ``torch.nn.Module``.
    """
    factory = _factory(spec)
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
    try:
        model = factory(**kwargs)
    except TypeError as err:
        raise ValueError(f"model {spec!r} does not take the arguments {kwargs}: {err}") from err
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory {spec!r} returned {type(model).__name__}, not a Module")
    return model


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return "[" + ", ".join(names[:_SHOWN]) + "]" + more


def check_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str | os.PathLike = "state"
) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly ``model``'s keys and shapes.

    The message lists the missing keys, the unexpected keys and the shape mismatches (up to
    8 of each) and names the options that choose the architecture.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return
    problems = []
    if missing:
        problems.append(f"missing keys {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listed(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches (checkpoint vs model) {_listed(shapes)}")
    raise CheckpointError(
        f"checkpoint {source} does not fit the model: {'; '.join(problems)}. Check --model "
        "and --model-kwargs"
    )


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint into ``model`` with ``weights_only=True``; returns ``model``.

    Accepts a plain state dict or ``{"model": state_dict, ...}``. When every floating-point
    tensor of the checkpoint has one dtype (say float64), the model is converted to it, so a
    network is measured in the precision it was saved in.

    Raises:
        CheckpointError: missing/corrupt/untrusted file, or keys and shapes that do not fit
            the model (the message lists the missing and unexpected keys).
    """
    with warnings.catch_warnings():
        # A legacy (non-zip) pickle makes torch warn about its protocol before refusing or
        # loading it; the outcome is reported either way, so keep stderr to one line.
        warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
        state = load_checkpoint(path)
    check_state_dict(model, state, path)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtype=dtypes.pop())
    model.load_state_dict(state)
    return model


def match_dtype(data: Dataset, model: nn.Module) -> Dataset:
    """``data`` with floating-point inputs cast to the dtype of ``model``'s parameters."""
    param = next(iter(model.parameters()), None)
    if param is None or not data.x_train.is_floating_point():
        return data
    if data.x_train.dtype == param.dtype and data.x_test.dtype == param.dtype:
        return data
    return dataclasses.replace(
        data, x_train=data.x_train.to(param.dtype), x_test=data.x_test.to(param.dtype)
    )
