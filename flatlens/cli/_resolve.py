"""Turn command-line style names into models, data sets, losses and loaded weights.

* a model is a zoo name (``mlp``, ``cnn``, ``resnet18``), ``package.module:factory`` or
  ``timm/NAME``, ``torchvision/NAME``, built by :func:`flatlens.zoo.build` (re-exported here
  as ``build_model``), which fills in ``in_features``, ``in_channels`` and ``num_classes``
  from the data set unless given; ``hf:DIR`` is a Hugging Face folder
  (:mod:`flatlens.cli._hf`, resolved by :mod:`flatlens.cli._models`);
* a data set is ``digits``, ``cifar10:DIR``, ``cifar100:DIR``, ``imagefolder:DIR`` (through
  torchvision), ``hf:DIR`` (tokenized, from ``save_to_disk``) or ``package.module:factory``
  returning ``torch.utils.data`` data sets;
* a loss is ``cross_entropy``, ``mse`` or ``package.module:callable``
  (:func:`flatlens.train._losses.build_loss`);
* weights come from a checkpoint read without running code from it: ``.safetensors`` with
  the safetensors package, anything else with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flatlens.core._errors import NonFiniteLossError
from flatlens.core._io import CheckpointError, load_checkpoint
from flatlens.data import Dataset, from_datasets, load_cifar, load_digits, model_inputs
from flatlens.train._losses import build_loss, check_loss_value
from flatlens.zoo import build as build_model
from flatlens.zoo import import_object

__all__ = [
    "DTYPES",
    "build_loss",
    "build_model",
    "check_state_dict",
    "load_data",
    "load_weights",
    "match_dtype",
    "preflight",
]

_SHOWN = 8
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def load_data(spec: str) -> Dataset:
    """Load the data set a spec names (never downloads).

    ``digits``; ``cifar10:DIR`` or ``cifar100:DIR``; ``imagefolder:DIR`` (images in
    ``DIR/CLASS/``, or ``DIR/train/CLASS/`` and ``DIR/test/CLASS/``; needs torchvision);
    ``package.module:factory``, a function without arguments returning a
    ``torch.utils.data.Dataset`` of ``(input, target)`` examples or a ``(train, test)``
    tuple of them (see :func:`flatlens.data.from_datasets`); ``hf:DIR``, a tokenized data set
    written by ``datasets``' ``save_to_disk`` (see :func:`flatlens.cli._hf.load_hf_data`).

    Raises:
        ValueError: an unknown name, a name without its folder, a factory that cannot be
            imported or raises, or data that is not ``(input, target)`` examples.
        FileNotFoundError: a folder or one of its files is missing.
    """
    name, _, rest = spec.partition(":")
    if name == "digits":
        if rest:
            raise ValueError(f"--data digits takes no folder (it ships with scikit-learn): {spec}")
        try:
            return load_digits(image=True)
        except ImportError as err:
            raise ValueError(
                "--data digits (the default) ships with scikit-learn, which is not installed: "
                "pip install 'flatlens[digits]', or pass your data with --data"
            ) from err
    if name == "hf":
        if not rest:
            raise ValueError("--data hf needs a folder: hf:/path/to/saved_dataset")
        from flatlens.cli._hf import load_hf_data

        return load_hf_data(rest)
    if name in ("cifar10", "cifar100", "imagefolder"):
        if not rest:
            raise ValueError(f"--data {name} needs a folder: {name}:/path/to/folder")
        if name == "imagefolder":
            return _imagefolder(rest)
        return load_cifar(Path(rest), num_classes=10 if name == "cifar10" else 100)
    if rest and name:
        return _factory_data(spec)
    raise ValueError(
        f"unknown data set {spec!r}; use digits, cifar10:DIR, cifar100:DIR, imagefolder:DIR, "
        "hf:DIR or package.module:factory"
    )


def _factory_data(spec: str) -> Dataset:
    make = import_object(spec, "data factory")
    if not callable(make):
        raise ValueError(f"data factory {spec!r} is a {type(make).__name__}, not a function")
    try:
        made = make()
    except Exception as err:  # the user's factory failed
        text = " ".join(str(err).split()) or "(no message)"
        raise ValueError(f"data factory {spec!r} raised {type(err).__name__}: {text}") from err
    try:
        return from_datasets(made, name=spec)
    except (TypeError, ValueError) as err:
        raise ValueError(f"data factory {spec!r}: {err}") from err


def _imagefolder(folder: str) -> Dataset:
    """Images under ``folder`` through ``torchvision.datasets.ImageFolder``, as tensors
    normalized per channel with the training split's mean and standard deviation."""
    from flatlens._compat import import_torchvision

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    try:
        tv = import_torchvision()
    except ImportError as err:
        raise ValueError(str(err)) from err
    to_tensor = tv.transforms.ToTensor()
    split = (root / "train").is_dir() and (root / "test").is_dir()
    try:
        if split:
            parts: Any = tuple(
                tv.datasets.ImageFolder(str(root / s), transform=to_tensor)
                for s in ("train", "test")
            )
            if parts[0].classes != parts[1].classes:
                raise ValueError(
                    f"{root}/train and {root}/test hold different classes "
                    f"({parts[0].classes} vs {parts[1].classes})"
                )
        else:
            parts = tv.datasets.ImageFolder(str(root), transform=to_tensor)
    except ValueError:
        raise
    except Exception as err:  # torchvision's reader: no classes, no images, ...
        text = " ".join(str(err).split())
        raise ValueError(f"image folder {root}: {type(err).__name__}: {text}") from err
    try:
        data = from_datasets(parts, name=f"imagefolder:{folder}")
    except (TypeError, ValueError) as err:
        hint = " (resize the images to one size)" if "differ in shape" in str(err) else ""
        raise ValueError(f"image folder {root}: {err}{hint}") from err
    mean = data.x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = data.x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-12)
    return dataclasses.replace(
        data, x_train=(data.x_train - mean) / std, x_test=(data.x_test - mean) / std
    )


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return "[" + ", ".join(names[:_SHOWN]) + "]" + more


def check_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str | os.PathLike = "state"
) -> None:
    """Raise :class:`CheckpointError` unless ``state`` fits ``model``.

    It fits when it has exactly the model's keys and shapes, and floating-point values
    wherever the model holds floating-point tensors (integer weights are no network's
    weights; casting them would measure another network). The message lists the missing
    keys, the unexpected keys, the shape mismatches and the non-floating values (up to 8
    of each) and names the options that choose the architecture.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    kinds = [
        f"{k} ({str(state[k].dtype).removeprefix('torch.')})"
        for k, v in expected.items()
        if k in state and v.is_floating_point() and not state[k].is_floating_point()
    ]
    if not (missing or unexpected or shapes or kinds):
        return
    problems = []
    if missing:
        problems.append(f"missing keys {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listed(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches (checkpoint vs model) {_listed(shapes)}")
    if kinds:
        problems.append(f"non-floating values for floating-point weights {_listed(kinds)}")
    advice = "Check --model and --model-kwargs"
    if kinds and not (missing or unexpected or shapes):
        advice = "Pass a checkpoint of trained (floating-point) weights"
    raise CheckpointError(
        f"checkpoint {source} does not fit the model: {'; '.join(problems)}. {advice}"
    )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _target_dtype(
    state: Mapping[str, torch.Tensor], model: nn.Module, dtype: str | torch.dtype
) -> torch.dtype:
    """The dtype to measure in: ``dtype``, or for ``"auto"`` the checkpoint's precision when
    it is float32 or float64, else the model's (float32 when that is a half precision)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto', 'float32' or 'float64', not {dtype!r}")
        return DTYPES[dtype]
    stored = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(stored) == 1 and next(iter(stored)) in DTYPES.values():
        return stored.pop()
    own = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return own if own in DTYPES.values() else torch.float32


def _check_finite(state: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Raise :class:`NonFiniteLossError` naming the first tensor with NaN or inf values."""
    for key, value in state.items():
        if value.is_floating_point() or value.is_complex():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise NonFiniteLossError(
                    f"checkpoint {source} holds non-finite weights: {key} has {bad} NaN or "
                    f"infinite values (of {value.numel()}); the run that wrote it diverged, so "
                    "there is no minimum to measure. Retrain it (e.g. with a lower learning "
                    "rate) or pass an earlier checkpoint"
                )


def load_weights(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    notes: list[str] | None = None,
    state_prefix: str | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Load a checkpoint into ``model`` without running code from it; returns ``model``.

    Reads a ``.safetensors`` file with the safetensors package and anything else with
    ``torch.load(weights_only=True)``: a plain state dict or ``{"model": state_dict, ...}``
    (also ``"state_dict"``, as in a Lightning ``.ckpt``). The model's entries may sit under a
    prefix (``net.``, ``module.``): it is found when exactly one fits, or named by
    ``state_prefix``; tied weights the file leaves out are restored
    (:func:`~flatlens.cli._checkpoints.fit_state`). The model is converted
    to ``dtype``; ``"auto"`` keeps a float32 or float64 checkpoint's precision, so a
    network is measured in the precision it was saved in, and measures any other precision
    (float16, bfloat16, a mix) in the model's dtype (float32 when that is a half precision
    too): the measures need float32 or float64 arithmetic.

    Args:
        model: The network the checkpoint belongs to.
        path: The checkpoint file.
        dtype: ``"auto"``, ``"float32"``, ``"float64"`` or a ``torch.dtype``.
        notes: When given, a sentence is appended when the weights were converted from the
            precision they were stored in, read under a prefix, or tied.
        state_prefix: The prefix of the model's entries in the checkpoint (``--state-prefix``).
        state: The checkpoint's tensors when already read (``path`` then names them).

    Raises:
        CheckpointError: missing/corrupt/untrusted file, or keys, shapes or dtypes that do
            not fit the model (the message lists the problems); the model is left as it was.
        NonFiniteLossError: the checkpoint holds NaN or infinite weights.
    """
    from flatlens.cli._checkpoints import fit_state

    if state is None:
        with warnings.catch_warnings():
            # A legacy (non-zip) pickle makes torch warn about its protocol before refusing or
            # loading it; the outcome is reported either way, so keep stderr to one line.
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            state = load_checkpoint(path)
    state = fit_state(model, state, path, prefix=state_prefix, notes=notes)
    check_state_dict(model, state, path)
    _check_finite(state, path)
    target = _target_dtype(state, model, dtype)
    stored = sorted({_name(t.dtype) for t in state.values() if t.is_floating_point()})
    model.to(dtype=target)
    model.load_state_dict(state)
    if notes is not None and stored and stored != [_name(target)]:
        notes.append(f"weights stored as {' and '.join(stored)} are measured in {_name(target)}")
    return model


def preflight(
    model: nn.Module,
    data: Dataset,
    loss_fn: Callable[..., torch.Tensor],
    *,
    model_spec: str,
    loss_spec: str,
    trainable: bool = False,
) -> None:
    """Run the model and the loss on two training examples; raise ``ValueError`` in one
    line when they do not fit the data, the loss is no scalar, or (``trainable``) no
    parameter can be trained. The model is left as it was (mode included)."""
    params = list(model.parameters())
    if not params:
        raise ValueError(f"model {model_spec!r} has no parameters: there is nothing to measure")
    if trainable and not any(p.requires_grad for p in params):
        raise ValueError(
            f"model {model_spec!r} has no trainable parameters (every parameter has "
            "requires_grad=False); training would change nothing"
        )
    x, y = data.first(2) if hasattr(data, "first") else (data.x_train[:2], data.y_train[:2])
    x = x.to(params[0].device)
    if x.is_floating_point():
        x = x.to(params[0].dtype)
    if y.is_floating_point():
        y = y.to(params[0].dtype)
    y = y.to(params[0].device)
    inputs = model_inputs(x, getattr(data, "input_names", None))  # Streams: model(x)
    shapes = (
        f"inputs {tuple(x.shape[1:])}, targets "
        f"{tuple(y.shape[1:]) or str(y.dtype).removeprefix('torch.')}"
    )

    def failed(stage: str, err: Exception) -> ValueError:
        text = " ".join(str(err).split()) or "(no message)"
        return ValueError(
            f"{stage} fails on the data {data.name!r} ({shapes}): {type(err).__name__}: "
            f"{text}. Check --model, --data and --loss"
        )

    training = model.training
    model.eval()
    # Warnings here (say of broadcasting) come again from the real computation; an error
    # here is reported in one line, without them.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            outputs = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        except Exception as err:  # the user's model and data do not fit together
            raise failed(f"model {model_spec!r}", err) from err
        finally:
            model.train(training)
        try:
            loss = loss_fn(outputs, y)
        except Exception as err:  # the loss does not fit the model's outputs or the targets
            raise failed(f"loss {loss_spec!r}", err) from err
    check_loss_value(loss, loss_spec)


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
