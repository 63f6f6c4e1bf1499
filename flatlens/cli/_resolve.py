"""Turn command-line style names into models, data sets and loaded weights.

* a model is a zoo name (``mlp``, ``cnn``, ``resnet18``) or ``package.module:factory``,
  built by :func:`flatlens.zoo.build` (re-exported here as ``build_model``), which fills
  in ``in_features``, ``in_channels`` and ``num_classes`` from the data set unless given;
* a data set is ``digits``, ``cifar10:DIR`` or ``cifar100:DIR``;
* weights come from a checkpoint loaded with ``torch.load(weights_only=True)``, which never
  runs code from the file.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from flatlens.core._io import CheckpointError, load_checkpoint
from flatlens.data import Dataset, load_cifar, load_digits
from flatlens.zoo import build as build_model

__all__ = [
    "build_model",
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
