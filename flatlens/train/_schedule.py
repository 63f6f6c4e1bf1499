"""Learning-rate schedules by name, stepped once per epoch: cosine, step, none, with warm-up.

The learning rate of epoch e (0-based) of E is lr * f(e) with, after W warm-up epochs,

* warm-up (e < W): f = (e + 1) / W, a linear ramp that reaches lr at epoch W − 1;
* ``cosine``: f = (1 + cos(π (e − W) / (E − W))) / 2 (``CosineAnnealingLR`` with
  ``T_max = E`` when W = 0, as the GAM code steps it, ``main_cifar.py`` line 291);
* ``step``: f = lr_decay^k with k the number of milestones m (fractions of E) with
  e >= m E (davda54/sam's ``StepLR``: 0.2 at 30%, 60% and 80% of the epochs);
* ``none``: f = 1.

``lr_update="step"`` applies f after every optimizer step instead, from the epoch of the step
just taken, as davda54/sam's loop calls ``scheduler(epoch)`` after each step
(``example/train.py`` line 65): after t steps of S per epoch the rate is lr * f((t − 1) // S),
so a new rate takes effect from the second step of an epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["LR_UPDATES", "SCHEDULERS", "LRFactor", "check_schedule", "make_scheduler"]

SCHEDULERS = ("cosine", "step", "none")
LR_UPDATES = ("epoch", "step")


class LRFactor:
    """f(e) of the module docstring, as a picklable callable for ``LambdaLR``."""

    def __init__(
        self,
        scheduler: str,
        epochs: int,
        warmup_epochs: int = 0,
        milestones: Sequence[float] = (),
        lr_decay: float = 0.1,
        steps_per_epoch: int = 0,
    ) -> None:
        self.scheduler, self.epochs, self.warmup_epochs = scheduler, epochs, warmup_epochs
        self.milestones, self.lr_decay = tuple(float(m) for m in milestones), float(lr_decay)
        self.steps_per_epoch = int(steps_per_epoch)

    def __call__(self, count: int) -> float:
        """f of the epoch ``count`` (per-epoch stepping), or of the epoch of the
        ``count``-th step (per-step stepping, ``steps_per_epoch`` > 0)."""
        if self.steps_per_epoch:
            count = max(count - 1, 0) // self.steps_per_epoch
        e, w, total = count, self.warmup_epochs, max(self.epochs, 1)
        if e < w:
            return (e + 1) / w
        if self.scheduler == "cosine":
            span = max(total - w, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(e - w, span) / span))
        if self.scheduler == "step":
            # milestone m starts at epoch m * E (davda54: epoch >= E * 3/10); the tolerance
            # keeps 0.3 * 200 = 60.000000000000007 at epoch 60
            passed = sum(e >= m * total - 1e-9 * total for m in self.milestones)
            return self.lr_decay**passed
        return 1.0


def check_schedule(
    scheduler: str, warmup_epochs: int, milestones: Sequence[float], lr_decay: float
) -> tuple[float, ...]:
    """Check the schedule settings; returns the milestones as a sorted tuple.

    Raises:
        ValueError: an unknown schedule, a negative warm-up, milestones outside (0, 1), or a
            decay outside (0, 1].
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {list(SCHEDULERS)}, not {scheduler!r}")
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
    marks = tuple(sorted(float(m) for m in milestones))
    if any(not 0.0 < m < 1.0 for m in marks):
        raise ValueError(
            f"milestones are fractions of the epochs in (0, 1), like 0.3,0.6,0.8; got {marks}"
        )
    if not 0.0 < lr_decay <= 1.0:
        raise ValueError(f"lr_decay must lie in (0, 1], got {lr_decay!r}")
    return marks


def make_scheduler(
    optimizer: Optimizer,
    *,
    scheduler: str,
    epochs: int,
    warmup_epochs: int = 0,
    milestones: Sequence[float] = (),
    lr_decay: float = 0.1,
    lr_update: str = "epoch",
    steps_per_epoch: int | None = None,
) -> Any | None:
    """The LR scheduler of these settings over the base optimizer's groups (None for
    ``none`` without warm-up); plain cosine stepped per epoch is
    ``CosineAnnealingLR(T_max=epochs)``. With ``lr_update="step"`` it is stepped after
    every optimizer step (its ``per_step`` attribute is True) and needs ``steps_per_epoch``.

    Raises:
        ValueError: bad settings, or ``lr_update="step"`` without the steps per epoch.
    """
    marks = check_schedule(scheduler, warmup_epochs, milestones, lr_decay)
    if lr_update not in LR_UPDATES:
        raise ValueError(f"lr_update must be one of {list(LR_UPDATES)}, not {lr_update!r}")
    target = getattr(optimizer, "base_optimizer", optimizer)
    if warmup_epochs == 0 and scheduler == "none":
        return None
    per_step = lr_update == "step"
    if per_step and not steps_per_epoch:
        raise ValueError(
            "lr_update='step' needs the number of steps per epoch (a data set with a length)"
        )
    if warmup_epochs == 0 and scheduler == "cosine" and not per_step:
        return torch.optim.lr_scheduler.CosineAnnealingLR(target, T_max=max(epochs, 1))
    factor = LRFactor(
        scheduler, epochs, warmup_epochs, marks, lr_decay, steps_per_epoch if per_step else 0
    )
    out = torch.optim.lr_scheduler.LambdaLR(target, factor)
    out.per_step = per_step
    return out
