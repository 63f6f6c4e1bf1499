"""What a :class:`~flatlens.train.TrainConfig` builds: the model, the optimizer, the
learning-rate schedule and the augmentation of a run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim import Optimizer

from flatlens import zoo
from flatlens.data import Augmentation, Dataset, Streams
from flatlens.optim import GAM, SAM
from flatlens.train._schedule import make_scheduler

if TYPE_CHECKING:
    from flatlens.train._config import TrainConfig

__all__ = [
    "_DTYPES",
    "augmentation",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "steps_per_epoch",
]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
"""The parameter dtypes a run may ask for, by name."""


def build_model(config: TrainConfig, data: Dataset | Streams) -> nn.Module:
    """The model ``config.model`` names, sized for ``data``, on ``config``'s device and dtype.

    Built by :func:`flatlens.zoo.build` with ``config.model_kwargs`` and initialized from
    ``config.seed`` without touching the caller's global RNG.

    Raises:
        ValueError: the factory cannot be imported or does not take the arguments.
        TypeError: the factory did not return a ``torch.nn.Module``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = zoo.build(config.model, data, **config.model_kwargs)
    return model.to(device=config.device, dtype=_DTYPES[config.dtype])


def build_optimizer(config: TrainConfig, model: nn.Module) -> Optimizer:
    """The optimizer named by ``config.optimizer`` over all of ``model``'s parameters.

    SAM and GAM get ``model=`` (BatchNorm statistics from the first pass only, as the
    reference code's ``disable_running_stats``); with ``gam_official`` GAM is built by
    :meth:`~flatlens.optim.GAM.from_official` from the settings of ``main_cifar.py``
    (grad_rho = rho', grad_norm_rho = rho, grad_beta_0 = beta, grad_beta_1 = alpha,
    grad_gamma = gamma).
    """

    def base(name: str) -> Optimizer:
        if name == "adamw":
            return torch.optim.AdamW(
                model.parameters(), lr=config.lr, weight_decay=config.weight_decay
            )
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=config.nesterov,
        )

    if config.optimizer in ("sgd", "adamw"):
        return base(config.optimizer)
    if config.optimizer == "sam":
        return SAM(
            model.parameters(),
            base(config.base),
            rho=config.sam_rho,
            adaptive=config.sam_adaptive,
            model=model,
        )
    mode = "exact" if config.optimizer == "gam-exact" else "accelerated"
    if config.gam_official:
        if mode != "accelerated":
            raise ValueError("gam_official is the accelerated algorithm: use optimizer='gam'")
        if config.gam_flatness_weight is not None:
            raise ValueError("gam_flatness_weight belongs to gam-exact, not to gam_official")
        given = config.gam_kwargs()
        return GAM.from_official(
            model.parameters(),
            base(config.base),
            model=model,
            grad_rho=given.get("perturb_rho", 0.03),
            grad_norm_rho=given.get("rho", 0.2),
            grad_beta_0=given.get("minus_weight", 0.1),
            grad_beta_1=given.get("plus_weight", 0.1),
            grad_gamma=given.get("orthogonal_weight", 0.05),
            adaptive=config.gam_adaptive,
        )
    return GAM(
        model.parameters(),
        base(config.base),
        model=model,
        mode=mode,
        adaptive=config.gam_adaptive,
        **config.gam_kwargs(),
    )


def build_scheduler(
    config: TrainConfig, optimizer: Optimizer, steps_per_epoch: int | None = None
) -> Any | None:
    """The LR schedule of ``config`` (``scheduler``, ``warmup_epochs``, ``milestones``,
    ``lr_decay``, ``lr_update``; see ``flatlens.train._schedule``), or None.

    Args:
        config: The run.
        optimizer: Its optimizer (SAM/GAM: the schedule drives the base optimizer).
        steps_per_epoch: Optimizer steps per epoch; needed for ``lr_update="step"``.
    """
    return make_scheduler(
        optimizer,
        scheduler=config.scheduler,
        epochs=config.epochs,
        warmup_epochs=config.warmup_epochs,
        milestones=config.milestones,
        lr_decay=config.lr_decay,
        lr_update=config.lr_update,
        steps_per_epoch=steps_per_epoch,
    )


def steps_per_epoch(data: Dataset | Streams, batch_size: int) -> int | None:
    """Optimizer steps in one epoch over ``data`` (None when its length is unknown)."""
    if isinstance(data, Streams):
        from torch.utils.data import DataLoader

        if isinstance(data.train, DataLoader):
            try:
                return len(data.train)
            except TypeError:
                return None
        n = data.size("train")
    else:
        n = len(data.y_train)
    return None if n is None else -(-n // batch_size)


def augmentation(config: TrainConfig, data: Dataset | Streams) -> Augmentation | None:
    """``config.augment`` for ``data``: padding with black, −mean/std of the data's
    normalization (0 for unnormalized inputs); None for ``"none"``."""
    if config.augment == "none":
        return None
    if data.mean is not None and data.std is not None:
        fill = tuple(-m / s for m, s in zip(data.mean, data.std, strict=True))
        return Augmentation(config.augment, fill=fill)
    return Augmentation(config.augment)
