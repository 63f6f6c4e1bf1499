"""The result of a training run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from flatlens.core._results import Result

__all__ = ["TrainResult"]


@dataclass
class TrainResult(Result):
    """A finished (or resumed and finished) training run.

    Attributes:
        history: One row per epoch: ``epoch``, ``step`` (optimizer steps so far), ``lr``,
            ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc``, ``gap_loss`` (test -
            train loss), ``gap_acc`` (train - test accuracy), ``train_loss_running``,
            ``seconds``, the measures (None when not measured that epoch) and ``lambda_c``
            (the epoch's last critical sharpness, None when none was taken).
        final: The last row.
        settings: The trainer's settings.
        checkpoint: Path of the last checkpoint written, if any.
        model: The trained model (left out of ``to_dict``).
        measurements: Every measurement taken within epochs (``measure_every_steps``,
            ``critical_every_steps``): step, epoch, values and costs.
        costs: Seconds of training, evaluation and measures, the overhead (measure seconds
            over training seconds), images per second, per-epoch timings and each measure's
            totals (count, products, forward passes, seconds).
    """

    history: list[dict[str, Any]]
    final: dict[str, Any]
    settings: dict[str, Any]
    checkpoint: str | None = None
    model: nn.Module | None = field(default=None, repr=False, metadata={"json": False})
    measurements: list[dict[str, Any]] = field(default_factory=list)
    costs: dict[str, Any] = field(default_factory=dict)
