"""Runs defined by name: :class:`TrainConfig`, the builders it feeds, and :func:`train`.

The command line, the demo and :func:`~flatlens.train.compare` describe a run with plain
values only, so that it can be stored in a checkpoint and repeated exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from flatlens import distributed as fd
from flatlens import zoo
from flatlens.core._checks import check_positive
from flatlens.core._renames import RENAMES, warn_renamed
from flatlens.data import Dataset
from flatlens.optim import GAM, SAM
from flatlens.train._losses import build_loss, check_loss_spec
from flatlens.train._measures import MEASURES, check_measures
from flatlens.train._resume import check_resume
from flatlens.train._trainer import CHECKPOINT_NAME, Trainer, TrainResult

__all__ = [
    "OPTIMIZERS",
    "TrainConfig",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "train",
]

OPTIMIZERS = ("sgd", "adamw", "sam", "gam", "gam-exact")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class TrainConfig:
    """Everything that defines one run by name: for the CLI, the demo and studies.

    Attributes:
        model: A :mod:`flatlens.zoo` name (``mlp``, ``cnn``, ``resnet18``) or
            ``package.module:factory``; only its form is checked here, the factory is
            imported when the model is built (see :func:`flatlens.zoo.build`).
        model_kwargs: Extra arguments of the model builder.
        optimizer: ``sgd``, ``adamw``, ``sam``, ``gam`` (accelerated) or ``gam-exact``.
        base: Base optimizer of SAM/GAM: ``sgd`` or ``adamw``.
        lr, momentum, weight_decay: Base optimizer settings (momentum only for SGD).
        sam_rho: SAM's radius rho (:class:`~flatlens.optim.SAM`'s ``rho``).
        gam_rho: :class:`~flatlens.optim.GAM`'s ``rho``, the gradient-norm radius
            (GAM's own default, 0.2).
        gam_perturb_rho: GAM's ``perturb_rho`` (rho'); ``None`` is GAM's own default for
            the mode.
        gam_plus_weight, gam_minus_weight, gam_orthogonal_weight, gam_flatness_weight:
            GAM's ``plus_weight`` (alpha), ``minus_weight`` (beta), ``orthogonal_weight``
            (gamma) and ``flatness_weight`` (exact mode); ``None`` is GAM's own default.
        epochs, batch_size, seed: The run.
        scheduler: ``cosine`` (CosineAnnealingLR over the epochs) or ``none``.
        measure_every, measures, measure_samples, measure_rho, measure_steps, trace_probes:
            Periodic flatness measures (see :class:`Trainer`); ``measure_rho`` is the
            radius of R0 and R1, independent of the optimizers' radii.
        dtype, device: Where the model lives.
        checkpoint_dir: Where checkpoints go (None: none are written).
        loss: ``cross_entropy``, ``mse`` or ``package.module:callable`` (see
            :func:`flatlens.train._losses.build_loss`).
    """

    model: str = "mlp"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "sgd"
    base: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    sam_rho: float = 0.05
    gam_rho: float = 0.2
    gam_perturb_rho: float | None = None
    gam_plus_weight: float | None = None
    gam_minus_weight: float | None = None
    gam_orthogonal_weight: float | None = None
    gam_flatness_weight: float | None = None
    epochs: int = 10
    batch_size: int = 64
    seed: int = 0
    scheduler: str = "cosine"
    measure_every: int = 0
    measures: tuple[str, ...] = MEASURES
    measure_samples: int = 256
    measure_rho: float = 0.05
    measure_steps: int = 20
    trace_probes: int = 30
    dtype: str = "float32"
    device: str = "cpu"
    checkpoint_dir: str | None = None
    loss: str = "cross_entropy"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, not {self.optimizer!r}")
        if self.base not in ("sgd", "adamw"):
            raise ValueError(f"base must be 'sgd' or 'adamw', not {self.base!r}")
        if self.scheduler not in ("cosine", "none"):
            raise ValueError(f"scheduler must be 'cosine' or 'none', not {self.scheduler!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, not {self.dtype!r}")
        zoo.check_spec(self.model)
        check_loss_spec(self.loss)
        check_positive("lr", self.lr)
        check_positive("sam_rho", self.sam_rho)
        check_positive("gam_rho", self.gam_rho)
        self.measures = check_measures(self.measures)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON- and ``weights_only``-safe)."""
        out = dataclasses.asdict(self)
        out["measures"] = list(self.measures)
        return out

    def gam_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~flatlens.optim.GAM` these settings give
        (``None`` settings left out, so GAM's own defaults apply)."""
        given = {name: getattr(self, f"gam_{name}") for name in _GAM_SETTINGS}
        return {name: value for name, value in given.items() if value is not None}


_GAM_SETTINGS = (
    "rho",
    "perturb_rho",
    "plus_weight",
    "minus_weight",
    "orthogonal_weight",
    "flatness_weight",
)
_dataclass_init = TrainConfig.__init__


@functools.wraps(_dataclass_init)
def _init(self: TrainConfig, *args: Any, **kwargs: Any) -> None:
    """The dataclass ``__init__``, accepting the names of flatlens 0.1 with a warning:
    ``rho`` (SAM's radius, now ``sam_rho``), ``gam`` (a dict, now ``gam_*`` fields) and
    ``trace_samples`` (now ``trace_probes``)."""
    old_names = {"rho": "sam_rho", "trace_samples": "trace_probes"}
    gam = kwargs.pop("gam", None) or {}
    unknown = sorted(set(gam) - set(_GAM_SETTINGS))
    if unknown:
        raise TypeError(f"TrainConfig(gam=...) has unknown GAM settings {unknown}")
    if gam:
        warn_renamed("TrainConfig", "gam", "one field per setting: gam_rho, gam_perturb_rho, ...")
    moved = {f"gam_{name}": value for name, value in gam.items()}
    for old, new in old_names.items():
        if old in kwargs:
            warn_renamed("TrainConfig", old, new)
            moved[new] = kwargs.pop(old)
    both = sorted(set(moved) & set(kwargs))
    if both:
        raise TypeError(f"TrainConfig() got {both} under both their old and their new names")
    _dataclass_init(self, *args, **kwargs, **moved)


TrainConfig.__init__ = _init  # type: ignore[method-assign]
RENAMES[("TrainConfig", "rho")] = "sam_rho"
RENAMES[("TrainConfig", "gam")] = "gam_rho, gam_perturb_rho, ..."
RENAMES[("TrainConfig", "trace_samples")] = "trace_probes"


def build_model(config: TrainConfig, data: Dataset) -> nn.Module:
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
    """The optimizer named by ``config.optimizer`` over all of ``model``'s parameters."""

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
        )

    if config.optimizer in ("sgd", "adamw"):
        return base(config.optimizer)
    if config.optimizer == "sam":
        return SAM(model.parameters(), base(config.base), rho=config.sam_rho, model=model)
    mode = "exact" if config.optimizer == "gam-exact" else "accelerated"
    return GAM(model.parameters(), base(config.base), model=model, mode=mode, **config.gam_kwargs())


def build_scheduler(config: TrainConfig, optimizer: Optimizer) -> Any | None:
    """CosineAnnealingLR over ``config.epochs`` (stepped per epoch), or None."""
    if config.scheduler == "none":
        return None
    target = getattr(optimizer, "base_optimizer", optimizer)
    return torch.optim.lr_scheduler.CosineAnnealingLR(target, T_max=max(config.epochs, 1))


def train(
    config: TrainConfig,
    data: Dataset,
    *,
    resume: bool = True,
    progress: bool = False,
) -> TrainResult:
    """Build model, optimizer and scheduler from ``config``, train, return the result.

    A resumed run continues exactly where the checkpoint stopped, so it must be the same
    run: every setting that changes the result (model, data, loss, optimizer and its
    settings, batch size, schedule, seed, dtype, measures) must equal the checkpoint's.
    ``epochs`` may grow only without a schedule (``scheduler="none"``), where the longer
    run is exactly the one asked for from the start; a cosine schedule spans the epochs it
    was started with, so they must match.

    Args:
        config: The run.
        data: Train/test tensors.
        resume: Continue from ``config.checkpoint_dir``'s checkpoint when there is one.
        progress: tqdm bars.

    Returns:
        A :class:`TrainResult`; the trained network is ``result.model``.

    Raises:
        CheckpointError: (a ``ValueError``) the checkpoint is unreadable or holds another
            run (the message names every differing setting).
        ValueError: the model has no trainable parameters, or cannot be built.
        NonFiniteLossError: the training loss became NaN or infinite.
    """
    from flatlens.data import digest

    model = build_model(config, data)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer)
    trainer = Trainer(
        model,
        optimizer,
        data,
        loss_fn=build_loss(config.loss),
        batch_size=config.batch_size,
        scheduler=scheduler,
        seed=config.seed,
        measure_every=config.measure_every,
        measures=config.measures,
        measure_samples=config.measure_samples,
        measure_rho=config.measure_rho,
        measure_steps=config.measure_steps,
        trace_probes=config.trace_probes,
        checkpoint_dir=config.checkpoint_dir,
        settings={"config": config.to_dict(), "data_digest": digest(data)},
        progress=progress,
    )
    if resume and config.checkpoint_dir is not None:
        path = Path(config.checkpoint_dir) / CHECKPOINT_NAME
        if fd.broadcast_object(path.is_file()) if trainer.distributed else path.is_file():
            check_resume(config, data, path)
            trainer.load_checkpoint(path)
    return trainer.fit(config.epochs)
