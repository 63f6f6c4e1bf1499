"""Fit a checkpoint's tensors to a model: the module prefix and tied weights.

A checkpoint often holds the network's weights under a prefix: ``net.`` (the attribute of a
Lightning module), ``module.`` (a ``DistributedDataParallel`` wrapper), ``model.`` (a
wrapper). :func:`fit_state` finds that prefix when exactly one fits, or takes the one the user
names (``--state-prefix``), and fills in the tied weights a ``save_pretrained`` file leaves out
(Hugging Face writes ``transformer.wte.weight`` once, not again as ``lm_head.weight``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from flatlens.core._io import CheckpointError

__all__ = ["fit_state", "tied_groups"]

_SHOWN = 6


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names of the model's state entries that share one tensor (tied weights), in groups of
    two or more, in ``state_dict`` order."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        # Tied entries are one Parameter (or buffer) object under several names.
        groups.setdefault(id(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _required(model: nn.Module) -> list[str]:
    """The state entries a checkpoint must hold: one name of each tied group."""
    later = {n for group in tied_groups(model) for n in group[1:]}
    return [k for k in model.state_dict() if k not in later]


def _candidates(required: list[str], keys: set[str]) -> list[str]:
    """Prefixes p (``""`` or ending with ``.``) with p + k in ``keys`` for every required k."""
    first = required[0]
    found = []
    for key in sorted(keys):
        if key == first:
            prefix = ""
        elif key.endswith("." + first):
            prefix = key[: -len(first)]
        else:
            continue
        if all(prefix + k in keys for k in required):
            found.append(prefix)
    return found


def fit_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str | os.PathLike = "state",
    *,
    prefix: str | None = None,
    notes: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The entries of ``state`` that belong to ``model``, named as the model names them.

    Args:
        model: The network (its parameters may be on the ``meta`` device: only names count).
        state: The checkpoint's tensors.
        source: The file, for messages.
        prefix: The prefix of the model's entries in ``state`` (``"net."``; a missing final
            dot is added). ``None``: none when every entry is there as it is; else the one
            prefix under which every entry is found, when exactly one is.
        notes: When given, a sentence is appended when a prefix was found or tied weights
            were filled in.

    Raises:
        CheckpointError: no entry starts with the given prefix, or several prefixes fit (the
            message lists them and names ``--state-prefix``).

    A state that fits no prefix is returned as it is, for
    :func:`~flatlens.cli._resolve.check_state_dict` to list what is missing.
    """
    keys = set(state)
    required = _required(model)
    out = dict(state)
    if prefix:
        prefix = prefix if prefix.endswith(".") else prefix + "."
        out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not out:
            found = sorted({k.split(".", 1)[0] + "." for k in keys if "." in k})
            raise CheckpointError(
                f"checkpoint {source} has no entry that starts with --state-prefix {prefix!r}; "
                f"its entries start with {found[:_SHOWN]}"
            )
    elif required and not all(k in keys for k in required):
        found = [p for p in _candidates(required, keys) if p]
        if len(found) > 1:
            raise CheckpointError(
                f"checkpoint {source} holds the model's weights under several prefixes "
                f"{found[:_SHOWN]}; name the one to measure with --state-prefix, e.g. "
                f"--state-prefix {found[0]}"
            )
        if found:
            prefix = found[0]
            out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if notes is not None:
                notes.append(f"the model's weights were read from the entries under {prefix!r}")
    filled = []
    for group in tied_groups(model):
        present = next((n for n in group if n in out), None)
        if present is None:
            continue
        for name in group:
            if name not in out:
                out[name] = out[present]
                filled.append(name)
    if filled and notes is not None:
        shown = ", ".join(filled[:_SHOWN])
        notes.append(f"tied weights restored from the entries they share: {shown}")
    return out
