"""The model a command measures, with its weights: every form of ``--model`` and
``--checkpoint`` the commands that read a checkpoint accept.

* ``--model hf:DIR``: the architecture config.json names, the weights beside it (or
  ``--checkpoint``), the loss its task implies unless ``--loss`` is given;
* ``--model timm/NAME`` or ``torchvision/NAME``: the library's architecture with random
  weights, its class count read from the checkpoint's classifier (unless ``--model-kwargs``
  sets ``num_classes``), then the checkpoint's weights;
* a zoo name or ``package.module:factory``: built with the data's shape, then the weights.

Checkpoints are ``.safetensors``, ``torch.save`` files or Lightning ``.ckpt`` (see
:func:`flatlens.cli._resolve.load_weights`; ``--state-prefix`` names the module prefix when
several fit). Nothing is downloaded.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from flatlens.cli._checkpoints import fit_state
from flatlens.cli._hf import build_hf_model, hf_folder, read_hf_weights, task_loss
from flatlens.cli._resolve import build_model, load_weights
from flatlens.core._io import load_checkpoint
from flatlens.data import Dataset
from flatlens.zoo import factory, library_spec

__all__ = ["DEFAULT_LOSS", "DefaultLoss", "resolve_model"]


class DefaultLoss(str):
    """The ``--loss`` default (``cross_entropy``), told apart from the same name typed by
    the user: an ``hf:DIR`` model then takes the loss its task implies."""


DEFAULT_LOSS = DefaultLoss("cross_entropy")


def _read(path: Any) -> dict[str, Tensor]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
        return load_checkpoint(path)


def _classifier(probe: nn.Module) -> str | None:
    """The name of the classifier's weight: timm's ``pretrained_cfg['classifier']``, else
    the last ``nn.Linear``, else the last weight of two or more dimensions."""
    cfg = getattr(probe, "pretrained_cfg", None) or getattr(probe, "default_cfg", None) or {}
    head = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    names = dict(probe.named_parameters())
    if isinstance(head, str) and f"{head}.weight" in names:
        return f"{head}.weight"
    last = None
    for name, module in probe.named_modules():
        if isinstance(module, nn.Linear):
            last = f"{name}.weight"
    if last is None:  # a convolutional classifier (SqueezeNet): the last weight matrix
        for name, param in names.items():
            if name.endswith(".weight") and param.dim() >= 2:
                last = name
    return last


def _library_model(
    spec: str,
    data: Dataset,
    kwargs: dict[str, Any],
    state: Mapping[str, Tensor],
    prefix: str | None,
    source: Any,
) -> nn.Module:
    """A ``LIBRARY/NAME`` model with the checkpoint's class count."""
    if "num_classes" not in kwargs:
        make = factory(spec)
        try:
            with torch.device("meta"):
                probe = make(**{k: v for k, v in kwargs.items() if k != "num_classes"})
        except Exception:  # a model that does not build on meta: keep the data's count
            probe = None
        if probe is not None:
            fitted = fit_state(probe, state, source, prefix=prefix)
            head = _classifier(probe)
            if head is not None and head in fitted and fitted[head].dim() >= 1:
                kwargs = {**kwargs, "num_classes": int(fitted[head].shape[0])}
    return build_model(spec, data, **kwargs)


def resolve_model(
    model_spec: str,
    checkpoint: Any,
    data: Dataset,
    kwargs: dict[str, Any],
    *,
    loss_spec: str,
    dtype: str = "auto",
    state_prefix: str | None = None,
    notes: list[str] | None = None,
) -> tuple[nn.Module, Callable[..., Tensor] | None, str]:
    """The model with its weights, and the loss an ``hf:DIR`` task implies.

    Args:
        model_spec: ``--model``.
        checkpoint: ``--checkpoint`` (None: only for ``hf:DIR``, whose weights are beside
            config.json).
        data: The data set (its shape and class count fill in factory arguments).
        kwargs: ``--model-kwargs``.
        loss_spec: ``--loss``; a :class:`DefaultLoss` lets ``hf:DIR`` choose.
        dtype: ``--dtype``.
        state_prefix: ``--state-prefix``.
        notes: Sentences for stderr and the report.

    Returns:
        ``(model, loss, loss_name)``: ``loss`` is None when ``--loss`` decides.

    Raises:
        ValueError: a spec that cannot be built, or no checkpoint where one is needed.
        CheckpointError: a checkpoint that cannot be read or does not fit.
    """
    folder = hf_folder(model_spec)
    if folder is not None:
        model, architecture, config = build_hf_model(folder, **kwargs)
        if checkpoint is None:
            state = read_hf_weights(folder)
            source: Any = folder
        else:
            state, source = _read(checkpoint), checkpoint
        load_weights(
            model, source, dtype=dtype, notes=notes, state_prefix=state_prefix, state=state
        )
        loss = None
        name = loss_spec
        if isinstance(loss_spec, DefaultLoss):
            name, loss = task_loss(architecture, config)
            if notes is not None:
                notes.append(f"{architecture}: the loss is {name}, as its task implies")
        return model, loss, name
    if library_spec(model_spec) is not None:
        factory(model_spec)  # a bad name is reported before the checkpoint is read
    if checkpoint is None:
        raise ValueError(f"--model {model_spec} needs --checkpoint (only hf:DIR has its weights)")
    if library_spec(model_spec) is not None:
        state = _read(checkpoint)
        model = _library_model(model_spec, data, kwargs, state, state_prefix, checkpoint)
        load_weights(
            model, checkpoint, dtype=dtype, notes=notes, state_prefix=state_prefix, state=state
        )
        return model, None, str(loss_spec)
    model = build_model(model_spec, data, **kwargs)
    load_weights(model, checkpoint, dtype=dtype, notes=notes, state_prefix=state_prefix)
    return model, None, str(loss_spec)
