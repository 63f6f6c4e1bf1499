"""Hugging Face folders: a ``save_pretrained`` model (``--model hf:DIR``) and a tokenized
data set written by ``datasets.Dataset.save_to_disk`` (``--data hf:DIR``). Local files only.

**Model.** The architecture is the class ``config.json`` names (``architectures[0]``), built
from the config with random weights; the weights are then read from the files beside it
(``model.safetensors``, the shards an ``model.safetensors.index.json`` lists, else
``pytorch_model.bin`` with ``weights_only=True``) or from ``--checkpoint``, with the tied
weights ``save_pretrained`` leaves out restored. The model returns its logits tensor (a
forward hook takes ``.logits`` from the output object), and the architecture implies the loss
(:func:`task_loss`):

* ``...ForCausalLM``, ``...LMHeadModel``: next-token cross-entropy
  (:func:`~flatlens.core.causal_lm_loss`), weighted by tokens, no accuracy;
* ``...ForMaskedLM``, ``...ForTokenClassification``: cross-entropy per token, weighted by
  tokens, no accuracy;
* ``...ForSequenceClassification``, ``...ForImageClassification``: cross-entropy (``mse``
  for one regression label), weighted by examples, with accuracy.

**Data.** Columns ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when present)
become the model's keyword inputs and ``labels`` (or ``label``) the targets; sequences must
have one length (pad them when tokenizing). A ``DatasetDict`` gives its ``train`` and
``test`` (else ``validation``) splits; a single data set is split in order, the first 80% for
training. A loss averaged over the non-ignored tokens of each batch carries the weight that
makes the objective the mean over every token of the data set (``batch_weight``, a
:func:`~flatlens.core.token_count`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatlens.core._data import token_count
from flatlens.core._io import CheckpointError, load_safetensors, load_trusted_tensors
from flatlens.core._losses import causal_lm_loss
from flatlens.data import Dataset

__all__ = [
    "HF_PREFIX",
    "TokenCrossEntropy",
    "build_hf_model",
    "hf_folder",
    "load_hf_data",
    "read_hf_weights",
    "task_loss",
]

HF_PREFIX = "hf:"
INPUT_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")


def hf_folder(spec: str) -> Path | None:
    """The folder of an ``hf:DIR`` spec, or None for any other spec."""
    if not isinstance(spec, str) or not spec.startswith(HF_PREFIX):
        return None
    return Path(spec[len(HF_PREFIX) :]).expanduser()


def _transformers() -> Any:
    from flatlens._compat import import_module

    try:
        return import_module("transformers", purpose="hf:DIR")
    except ImportError as err:
        raise ValueError(str(err)) from err


# ---------------------------------------------------------------------- losses
class TokenCrossEntropy(nn.Module):
    """Cross-entropy per token, averaged over the labels that are not -100 (masked LM, token
    classification); ``batch_weight`` counts them, so batches mix exactly."""

    reduction = "mean"

    def __init__(self) -> None:
        super().__init__()
        self.batch_weight = token_count()

    def forward(self, outputs: Tensor, labels: Tensor) -> Tensor:
        """(1/C) sum over non-ignored (b, t) of -log softmax(z_{b,t})[y_{b,t}]."""
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), labels.reshape(-1))


class _CausalLM(nn.Module):
    """:func:`~flatlens.core.causal_lm_loss` with its token weighting."""

    reduction = "mean"

    def __init__(self) -> None:
        super().__init__()
        self.batch_weight = token_count(shift=True)

    def forward(self, outputs: Tensor, labels: Tensor) -> Tensor:
        """Mean next-token cross-entropy over the labels that are not -100."""
        return causal_lm_loss(outputs, labels)


def task_loss(architecture: str, config: Any = None) -> tuple[str, Callable[..., Tensor]]:
    """``(name, loss)`` the architecture's task implies (see the module docstring).

    Raises:
        ValueError: an architecture whose loss cannot be told from its name.
    """
    if architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm", _CausalLM()
    if architecture.endswith(("ForMaskedLM", "ForTokenClassification")):
        return "token_cross_entropy", TokenCrossEntropy()
    if architecture.endswith(("ForSequenceClassification", "ForImageClassification")):
        if getattr(config, "num_labels", 2) == 1 or getattr(config, "problem_type", None) == (
            "regression"
        ):
            from flatlens.train._losses import MSELoss

            return "mse", MSELoss()
        return "cross_entropy", nn.CrossEntropyLoss()
    raise ValueError(
        f"cannot tell the loss of a {architecture} from its name; pass --loss "
        "package.module:callable (called as loss(logits, labels))"
    )


# ---------------------------------------------------------------------- model
def _logits_hook(module: nn.Module, args: Any, output: Any) -> Any:
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, Tensor) else output


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not folder.is_dir():
        raise ValueError(f"--model hf:{folder}: the folder does not exist")
    if not path.is_file():
        raise ValueError(
            f"--model hf:{folder}: no config.json in the folder; pass the folder "
            "model.save_pretrained() wrote"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds no JSON object")
    return config


def build_hf_model(folder: str | os.PathLike, **kwargs: Any) -> tuple[nn.Module, str, Any]:
    """The architecture a ``save_pretrained`` folder names, with random weights.

    Returns:
        ``(model, architecture, config)``; the model returns its logits tensor.

    Raises:
        ValueError: no folder or config.json, no architecture named, an architecture
            transformers does not have, or a config it cannot build.
    """
    folder = Path(folder)
    raw = _read_config(folder)
    names = raw.get("architectures") or []
    if not names or not isinstance(names[0], str):
        raise ValueError(
            f"{folder / 'config.json'} names no architecture ('architectures' is missing); "
            "save the model with model.save_pretrained(), which writes it"
        )
    architecture = names[0]
    transformers = _transformers()
    cls = getattr(transformers, architecture, None)
    if cls is None:
        raise ValueError(
            f"{folder / 'config.json'} names the architecture {architecture!r}, which "
            f"transformers {transformers.__version__} does not have"
        )
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its remarks on the config are not ours
    try:
        config = transformers.AutoConfig.from_pretrained(
            str(folder), local_files_only=True, **kwargs
        )
        model = cls(config)
    except Exception as err:  # the config does not build this architecture
        text = " ".join(str(err).split())
        raise ValueError(
            f"--model hf:{folder}: building {architecture} from config.json failed "
            f"({type(err).__name__}: {text})"
        ) from err
    finally:
        transformers.logging.set_verbosity(verbosity)
    model.eval()
    model.register_forward_hook(_logits_hook)
    return model, architecture, config


def read_hf_weights(folder: str | os.PathLike) -> dict[str, Tensor]:
    """The weights beside config.json: ``model.safetensors``, the shards of
    ``model.safetensors.index.json``, else ``pytorch_model.bin`` (``weights_only=True``).

    Raises:
        CheckpointError: none of them is there, or one is unreadable.
    """
    folder = Path(folder)
    single = folder / "model.safetensors"
    if single.is_file():
        return load_safetensors(single)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(
                set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index} is not a shard index ({err})") from err
        state: dict[str, Tensor] = {}
        for name in files:
            state.update(load_safetensors(folder / name))
        return state
    legacy = folder / "pytorch_model.bin"
    if legacy.is_file():
        obj = load_trusted_tensors(legacy)
        if isinstance(obj, dict) and all(isinstance(v, Tensor) for v in obj.values()):
            return obj
        raise CheckpointError(f"{legacy} holds no state dict")
    raise CheckpointError(
        f"--model hf:{folder}: no weights beside config.json (model.safetensors, "
        "model.safetensors.index.json or pytorch_model.bin); pass them with --checkpoint"
    )


# ---------------------------------------------------------------------- data
def _column(table: Any, name: str, where: str) -> Tensor:
    try:
        # Rows as one batch: with the torch format, equal-length sequences come as a tensor.
        values = table[:][name]
        tensor = values if isinstance(values, Tensor) else torch.as_tensor(values)
    except (ValueError, TypeError, RuntimeError) as err:
        raise ValueError(
            f"{where}: column {name!r} holds sequences of different lengths; pad them to one "
            "length when tokenizing (tokenizer(..., padding='max_length', max_length=T))"
        ) from err
    return tensor


def _split(table: Any, where: str) -> tuple[Tensor, Tensor, tuple[str, ...]]:
    columns = list(table.column_names)
    label = "labels" if "labels" in columns else "label" if "label" in columns else None
    if label is None or "input_ids" not in columns:
        raise ValueError(
            f"{where} needs the columns input_ids and labels (and optionally attention_mask, "
            f"token_type_ids); it has {columns}"
        )
    table = table.with_format("torch")
    names = tuple(c for c in INPUT_COLUMNS if c in columns)
    parts = [_column(table, c, where).long() for c in names]
    shapes = {tuple(p.shape) for p in parts}
    if len(shapes) != 1 or len(parts[0].shape) != 2:
        raise ValueError(
            f"{where}: the input columns {list(names)} must be (examples, tokens) of one "
            f"shape, got {sorted(shapes)}"
        )
    x = torch.stack(parts, dim=1)  # (N, columns, T)
    y = _column(table, label, where)
    if y.is_floating_point():
        y = y.to(torch.float32)
    return x, y, names


def load_hf_data(folder: str | os.PathLike) -> Dataset:
    """A tokenized data set from ``datasets``' ``save_to_disk`` folder (see the module
    docstring).

    The returned :class:`~flatlens.data.Dataset` holds the input columns stacked as
    ``x`` of shape (examples, columns, tokens) with ``input_names`` naming the columns, so
    each batch reaches the model as ``model(input_ids=..., attention_mask=...)``.

    Raises:
        ValueError: no such folder, not a saved data set, ``datasets`` missing, missing
            columns, or sequences of different lengths.
    """
    from flatlens._compat import import_module

    root = Path(folder).expanduser()
    where = f"--data hf:{folder}"
    if not root.is_dir():
        raise ValueError(f"{where}: the folder does not exist")
    try:
        datasets = import_module("datasets", purpose="--data hf:DIR")
    except ImportError as err:
        raise ValueError(str(err)) from err
    try:
        saved = datasets.load_from_disk(str(root))
    except Exception as err:  # not a folder save_to_disk wrote
        text = " ".join(str(err).split())
        raise ValueError(
            f"{where} is not a data set written by save_to_disk ({type(err).__name__}: {text})"
        ) from err
    if isinstance(saved, datasets.DatasetDict):
        test_name = "test" if "test" in saved else "validation" if "validation" in saved else None
        if "train" not in saved or test_name is None:
            raise ValueError(
                f"{where} holds the splits {sorted(saved)}; it needs 'train' and 'test' (or "
                "'validation')"
            )
        x, y, names = _split(saved["train"], f"{where} (train)")
        xt, yt, names_t = _split(saved[test_name], f"{where} ({test_name})")
        if names != names_t or x.shape[2] != xt.shape[2]:
            raise ValueError(
                f"{where}: the train and {test_name} splits differ in columns or length"
            )
    else:
        x_all, y_all, names = _split(saved, where)
        if len(y_all) < 2:
            raise ValueError(f"{where} holds {len(y_all)} example; at least 2 are needed")
        cut = max(1, min(len(y_all) - 1, round(0.8 * len(y_all))))
        x, y, xt, yt = x_all[:cut], y_all[:cut], x_all[cut:], y_all[cut:]
    labels = torch.cat([y.reshape(-1), yt.reshape(-1)])
    valid = labels[labels != -100] if not labels.is_floating_point() else labels[:0]
    num_classes = int(valid.max()) + 1 if valid.numel() else 0
    return Dataset(x, y, xt, yt, num_classes, f"hf:{folder}", input_names=names)
