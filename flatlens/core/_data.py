"""Batches as users have them: checking, moving to the model's device, weighting.

A batch is an ``(inputs, targets)`` pair or a mapping such as a Hugging Face batch
(``{"input_ids": ..., "attention_mask": ..., "labels": ...}``), whose ``targets_key`` entry
is the targets and whose other entries are the model's keyword inputs. Inputs reach the
model as ``model(x)`` for a tensor, ``model(*x)`` for a tuple or list and ``model(**x)`` for
a mapping (:func:`call_args`).

Each batch counts in the mean with a weight w_b: its length by default, or what
``batch_weight(inputs, targets)`` returns (for a token-level loss, the number of targets
that are not ignored; see :func:`token_count`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "BatchWeight",
    "call_args",
    "check_data",
    "check_model",
    "is_classification",
    "is_single_batch",
    "token_count",
]

BatchWeight = Callable[[Any, Any], "int | float | Tensor"]

_DATA_HINT = (
    "pass a DataLoader, a list of (inputs, targets) batches, one (inputs, targets) tuple, "
    "or mappings with a targets entry"
)


def is_single_batch(data: Any, targets_key: str = "labels") -> bool:
    """Whether ``data`` is one batch (a pair or a mapping) rather than a collection of them.

    A pair whose second item is a tensor (the targets) is one batch, whatever its inputs;
    so is a mapping that holds ``targets_key``. (A collection of batches has batches, not
    tensors, as items.)
    """
    if isinstance(data, Mapping):
        return targets_key in data
    return isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[1], Tensor)


def split_batch(batch: Any, index: int | None = None, targets_key: str = "labels") -> tuple:
    """``(inputs, targets)`` of one batch; a clear error for anything else."""
    where = "a batch" if index is None else f"batch {index}"
    if isinstance(batch, Mapping):
        if targets_key not in batch:
            raise ValueError(
                f"{where} of data is a mapping without the targets entry {targets_key!r} "
                f"(keys: {sorted(batch)[:6]}); pass targets_key= to name it"
            )
        inputs = {k: v for k, v in batch.items() if k != targets_key}
        return inputs, batch[targets_key]
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        raise ValueError(f"{where} of data is not an (inputs, targets) pair; {_DATA_HINT}")
    return batch[0], batch[1]


def _leading(x: Any) -> int | None:
    if isinstance(x, Tensor):
        return int(x.shape[0]) if x.dim() > 0 else None
    if isinstance(x, Mapping):
        x = list(x.values())
    if isinstance(x, tuple | list):
        for t in x:
            n = _leading(t)
            if n is not None:
                return n
    return None


def check_data(data: Any, targets_key: str = "labels") -> None:
    """Refuse data that is not a re-iterable of batches, with what to pass instead."""
    if data is None:
        raise TypeError(f"data is None; {_DATA_HINT}")
    if isinstance(data, Tensor):
        raise TypeError(
            f"data is a bare tensor of shape {tuple(data.shape)}: the targets are missing; "
            f"{_DATA_HINT}"
        )
    if isinstance(data, str | bytes) or not isinstance(data, Iterable | Mapping):
        raise TypeError(f"data is a {type(data).__name__}, not batches; {_DATA_HINT}")
    if not isinstance(data, Mapping | list | tuple) and iter(data) is data:
        raise TypeError(
            "data is a one-shot iterator; pass something that can be iterated repeatedly "
            "(a DataLoader, a list of batches or one (inputs, targets) tuple)"
        )
    if is_single_batch(data, targets_key):
        batches = [data]
    elif isinstance(data, list | tuple):
        batches = data
    else:
        return
    for i, batch in enumerate(batches):
        x, y = split_batch(batch, i, targets_key)
        nx, ny = _leading(x), _leading(y)
        if isinstance(y, Tensor) and nx is not None and ny is not None and nx != ny:
            raise ValueError(
                f"batch {i} of data has {nx} inputs but {ny} targets; inputs and targets "
                "must have the same length along dimension 0"
            )


def default_weight(inputs: Any, targets: Any) -> int:
    """A batch's length: the targets' first dimension (else the inputs'), 1 for a scalar."""
    if isinstance(targets, Tensor):
        return int(targets.shape[0]) if targets.dim() > 0 else 1
    n = _leading(inputs)
    if n is not None:
        return n
    return len(targets)


def weight_of(batch_weight: BatchWeight | None, inputs: Any, targets: Any) -> float:
    """w_b for one batch as a Python number (a checked, finite value >= 0)."""
    if batch_weight is None:
        return default_weight(inputs, targets)
    value = batch_weight(inputs, targets)
    if isinstance(value, Tensor):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(
            f"batch_weight must return a finite number >= 0 for every batch, got {value!r}"
        )
    if value == float("inf"):
        raise ValueError("batch_weight returned inf; it must be a finite number >= 0")
    return value


def token_count(ignore_index: int = -100, *, shift: bool = False) -> BatchWeight:
    """A ``batch_weight`` counting the targets that are not ``ignore_index``.

    A token-level loss averaged over the non-ignored tokens of each batch is exact over
    uneven, padded batches when each batch counts with this weight:
    L = sum_b c_b loss_b / sum_b c_b, c_b = #{targets != ignore_index}.

    Args:
        ignore_index: The label of padding (Hugging Face uses -100).
        shift: Count ``targets[..., 1:]`` only, for a causal language model whose loss
            compares the logits at position t with the label at t + 1.
    """

    def count(inputs: Any, targets: Tensor) -> int:
        labels = targets[..., 1:] if shift else targets
        return int((labels != ignore_index).sum())

    return count


def call_args(inputs: Any) -> tuple[tuple, dict]:
    """Positional and keyword arguments of the model call for ``inputs``."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, tuple | list):
        return tuple(inputs), {}
    return (inputs,), {}


def move(x: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """``x`` (tensors, nested in tuples, lists and mappings) on ``device``; floating tensors
    in ``dtype``. A tensor on another accelerator is an error, not a silent copy."""
    if isinstance(x, Tensor):
        if x.device != device and x.device.type != "cpu":
            raise ValueError(
                f"a batch tensor is on {x.device} but the model is on {device}; "
                "put the data on the CPU or on the model's device"
            )
        x = x.to(device, non_blocking=True)
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, tuple | list):
        return type(x)(move(t, device, dtype) for t in x)
    if isinstance(x, Mapping):
        return {k: move(v, device, dtype) for k, v in x.items()}
    return x


def check_model(model: nn.Module) -> None:
    """Refuse a model that cannot be evaluated: no parameters, or parameters on ``meta``."""
    params = list(model.parameters())
    if not params:
        raise ValueError(
            f"the model ({type(model).__name__}) has no parameters: there is nothing to "
            "measure; pass the trained network"
        )
    if any(p.is_meta for p in params):
        raise ValueError(
            "the model's parameters are on the 'meta' device (shapes only, no values); "
            "load real weights first, e.g. model.to_empty(device='cpu') then "
            "model.load_state_dict(...)"
        )


def is_classification(outputs: Any, targets: Any) -> bool:
    return (
        isinstance(outputs, Tensor)
        and isinstance(targets, Tensor)
        and outputs.dim() == 2
        and targets.dim() == 1
        and not targets.is_floating_point()
    )
