"""Losses for models whose outputs are not a plain tensor: causal language models.

A Hugging Face causal LM returns an output object whose ``logits`` (batch, T, vocab)
predict token t + 1 at position t; padding carries the label -100. Its built-in loss casts
the logits to float32, so a float64 check must compute the loss itself:
:func:`causal_lm_loss` does, in the logits' own dtype. With
``batch_weight=token_count(shift=True)`` the Objective is the mean over every non-padding
token of the data set, exact over uneven, padded batches.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

__all__ = ["causal_lm_loss"]


def causal_lm_loss(outputs: Any, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy over the labels that are not ``ignore_index``.

    loss = (1/C) sum_{b, t : y_{b,t+1} != ignore} -log softmax(z_{b,t})[y_{b,t+1}], C the
    number of such terms.

    Args:
        outputs: The model's output: a tensor of logits (batch, T, vocab) or an object with
            a ``logits`` attribute or key (Hugging Face ``CausalLMOutput``).
        labels: Token ids (batch, T); -100 (``ignore_index``) marks padding.
        ignore_index: The label that does not count.
    """
    logits = outputs if isinstance(outputs, Tensor) else _logits(outputs)
    shifted = logits[..., :-1, :].reshape(-1, logits.shape[-1])
    targets = labels[..., 1:].reshape(-1)
    return F.cross_entropy(shifted, targets, ignore_index=ignore_index)


def _logits(outputs: Any) -> Tensor:
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, dict):
        logits = outputs.get("logits")
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"causal_lm_loss needs logits: a tensor or an output with .logits, got "
            f"{type(outputs).__name__}"
        )
    return logits
