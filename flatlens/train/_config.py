"""Runs defined by name: :class:`TrainConfig` and :func:`train` (the builders it feeds are
in ``flatlens.train._builders``).

The command line, the demo and :func:`~flatlens.train.compare` describe a run with plain
values only, so that it can be stored in a checkpoint and repeated exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flatlens import distributed as fd
from flatlens import zoo
from flatlens._recipes import RECIPES
from flatlens.core._checks import check_nonnegative, check_positive, check_positive_int
from flatlens.core._renames import RENAMES, warn_renamed
from flatlens.data import AUGMENTATIONS, Dataset, Streams
from flatlens.train._builders import (
    _DTYPES,
    augmentation,
    build_model,
    build_optimizer,
    build_scheduler,
    steps_per_epoch,
)
from flatlens.train._feed import AUGMENT_ON
from flatlens.train._losses import build_loss, check_loss_spec
from flatlens.train._measures import MEASURES, check_measures
from flatlens.train._resume import check_resume
from flatlens.train._schedule import LR_UPDATES, check_schedule
from flatlens.train._trainer import AMP, CHECKPOINT_NAME, Trainer, TrainResult

__all__ = [
    "OPTIMIZERS",
    "TrainConfig",
    "augmentation",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "train",
]

OPTIMIZERS = ("sgd", "adamw", "sam", "gam", "gam-exact")


@dataclass
class TrainConfig:
    """Everything that defines one run by name: for the CLI, the demo and studies.

    Attributes:
        model: A :mod:`flatlens.zoo` name (``mlp``, ``cnn``, ``resnet18``, ``wrn16_8``,
            ``wrn28_10``), ``package.module:factory``, ``timm/NAME`` or ``torchvision/NAME``;
            only its form is checked here,
            the factory is imported when the model is built (see :func:`flatlens.zoo.build`).
        model_kwargs: Extra arguments of the model builder.
        optimizer: ``sgd``, ``adamw``, ``sam``, ``gam`` (accelerated) or ``gam-exact``.
        base: Base optimizer of SAM/GAM: ``sgd`` or ``adamw``.
        lr, momentum, weight_decay, nesterov: Base optimizer settings (momentum and
            Nesterov only for SGD).
        sam_rho, sam_adaptive: SAM's radius rho and ASAM's elementwise scaling
            (:class:`~flatlens.optim.SAM`'s ``rho`` and ``adaptive``).
        gam_rho: :class:`~flatlens.optim.GAM`'s ``rho`` (the gradient-norm radius).
        gam_perturb_rho: GAM's ``perturb_rho`` (rho'); ``None`` (this and the next four):
            GAM's own default for the mode.
        gam_plus_weight: GAM's ``plus_weight`` (alpha).
        gam_minus_weight: GAM's ``minus_weight`` (beta).
        gam_orthogonal_weight: GAM's ``orthogonal_weight`` (gamma).
        gam_flatness_weight: GAM's ``flatness_weight`` (exact mode).
        gam_adaptive: GAM's ASAM-style scaling of its ascents (accelerated mode).
        gam_official: Build GAM with :meth:`~flatlens.optim.GAM.from_official` (the
            authors' code: h- = g0 + |1 - beta| g2) instead of the paper's h- form.
        epochs, batch_size, seed: The run.
        scheduler: ``cosine``, ``step`` or ``none``, stepped per epoch (see
            ``flatlens.train._schedule``); ``milestones`` (fractions of the epochs) and
            ``lr_decay`` (the factor at each) shape ``step``; ``warmup_epochs`` ramps the
            rate linearly first; ``lr_update="step"`` sets the rate after every step from
            the epoch of that step (davda54/sam's loop) instead of at epoch boundaries.
        label_smoothing: epsilon of the loss: torch's form (epsilon / n on every class) for
            ``cross_entropy``, the GAM/SAM code's (epsilon / (n - 1) on the wrong classes)
            for ``smooth_cross_entropy``.
        augment: ``none``, ``crop-flip`` or ``crop-flip-cutout`` (image data; see
            :class:`~flatlens.data.Augmentation`), drawn fresh each epoch.
        augment_on: ``device`` (per batch, on the training device) or ``workers`` (per
            example, in the DataLoader workers, through torchvision.transforms.v2).
        num_workers: DataLoader workers for streamed data.
        data_mean, data_std: Per-channel normalization constants of the inputs (None: the
            data set's own statistics, as the data was loaded).
        amp: Mixed precision of the training passes: ``none``, ``bf16`` or ``fp16`` (with a
            GradScaler). Measures run in the parameters' dtype.
        measure_every, measure_every_steps: Take the measures every this many epochs and
            every this many optimizer steps (0: never).
        measures: Which measures (see :class:`~flatlens.train.FlatnessTracker`).
        measure_samples: Training examples of the fixed subset they run on.
        measure_rho: The radius of R0 and R1, independent of the optimizers' radii.
        measure_steps: Ascent steps per start of R0 and R1.
        measure_budget: Cap on each of R0 and R1 in HVP-equivalents (None: no cap).
        trace_probes: Probes of the trace.
        critical_every_steps: Measure the critical sharpness lambda_c along the optimizer's
            update every this many steps (0: never).
        log_every: Write a JSON line every this many steps (0: epochs only).
        tensorboard: Also write TensorBoard event files (needs ``tensorboard``).
        recipe: The recipe the settings started from (see :meth:`from_recipe`), or None.
        dtype, device: Where the model lives.
        checkpoint_dir: Where checkpoints go (None: none are written).
        loss: ``cross_entropy``, ``smooth_cross_entropy``, ``mse`` or
            ``package.module:callable`` (see :func:`flatlens.train._losses.build_loss`).
    """

    model: str = "mlp"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "sgd"
    base: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    sam_rho: float = 0.05
    sam_adaptive: bool = False
    gam_rho: float = 0.2
    gam_perturb_rho: float | None = None
    gam_plus_weight: float | None = None
    gam_minus_weight: float | None = None
    gam_orthogonal_weight: float | None = None
    gam_flatness_weight: float | None = None
    gam_adaptive: bool = False
    gam_official: bool = False
    epochs: int = 10
    batch_size: int = 64
    seed: int = 0
    scheduler: str = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)
    lr_decay: float = 0.1
    warmup_epochs: int = 0
    lr_update: str = "epoch"
    label_smoothing: float = 0.0
    augment: str = "none"
    augment_on: str = "device"
    num_workers: int = 0
    data_mean: tuple[float, ...] | None = None
    data_std: tuple[float, ...] | None = None
    amp: str = "none"
    measure_every: int = 0
    measure_every_steps: int = 0
    measures: tuple[str, ...] = MEASURES
    measure_samples: int = 256
    measure_rho: float = 0.05
    measure_steps: int = 20
    measure_budget: float | None = 40.0
    trace_probes: int = 30
    critical_every_steps: int = 0
    log_every: int = 1
    tensorboard: bool = False
    recipe: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    checkpoint_dir: str | None = None
    loss: str = "cross_entropy"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, not {self.optimizer!r}")
        if self.base not in ("sgd", "adamw"):
            raise ValueError(f"base must be 'sgd' or 'adamw', not {self.base!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, not {self.dtype!r}")
        if self.amp not in AMP:
            raise ValueError(f"amp must be one of {list(AMP)}, not {self.amp!r}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {list(AUGMENTATIONS)}, not {self.augment!r}")
        if self.augment_on not in AUGMENT_ON:
            raise ValueError(
                f"augment_on must be one of {list(AUGMENT_ON)}, not {self.augment_on!r}"
            )
        if self.lr_update not in LR_UPDATES:
            raise ValueError(f"lr_update must be one of {list(LR_UPDATES)}, not {self.lr_update!r}")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose from {sorted(RECIPES)}")
        self.milestones = check_schedule(
            self.scheduler, self.warmup_epochs, self.milestones, self.lr_decay
        )
        zoo.check_spec(self.model)
        check_loss_spec(self.loss)
        check_positive("lr", self.lr)
        check_positive("sam_rho", self.sam_rho)
        check_positive("gam_rho", self.gam_rho)
        check_nonnegative("momentum", self.momentum)
        check_nonnegative("weight_decay", self.weight_decay)
        if self.nesterov and (self.momentum == 0 or "adamw" in (self.optimizer, self.base)):
            raise ValueError("nesterov needs SGD with momentum > 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing!r}")
        if self.label_smoothing and self.loss not in ("cross_entropy", "smooth_cross_entropy"):
            raise ValueError(
                f"label_smoothing applies to cross_entropy and smooth_cross_entropy, not to "
                f"loss {self.loss!r}"
            )
        for name in (
            "num_workers",
            "measure_every",
            "measure_every_steps",
            "critical_every_steps",
            "log_every",
        ):
            check_positive_int(name, getattr(self, name), 0)
        if self.measure_budget is not None:
            check_positive("measure_budget", self.measure_budget)
        for name in ("data_mean", "data_std"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(float(v) for v in value))
        if (self.data_mean is None) != (self.data_std is None):
            raise ValueError("data_mean and data_std go together: give both or neither")
        if self.data_std is not None and (
            len(self.data_std) != len(self.data_mean) or min(self.data_std) <= 0
        ):
            raise ValueError("data_std needs one value > 0 per channel of data_mean")
        self.measures = check_measures(self.measures)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON- and ``weights_only``-safe)."""
        out = dataclasses.asdict(self)
        out["measures"] = list(self.measures)
        out["milestones"] = list(self.milestones)
        for name in ("data_mean", "data_std"):
            if out[name] is not None:
                out[name] = list(out[name])
        return out

    def gam_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~flatlens.optim.GAM` these settings give
        (``None`` settings left out, so GAM's own defaults apply)."""
        given = {name: getattr(self, f"gam_{name}") for name in _GAM_SETTINGS}
        return {name: value for name, value in given.items() if value is not None}

    @classmethod
    def from_recipe(cls, recipe: str, **overrides: Any) -> TrainConfig:
        """The settings of a published recipe (:data:`~flatlens.train.RECIPES`), with
        ``overrides`` (any fields) replacing the recipe's.

        Raises:
            ValueError: an unknown recipe, or settings that do not fit together.
        """
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; choose from {sorted(RECIPES)}")
        settings = {**RECIPES[recipe].settings, **overrides, "recipe": recipe}
        return cls(**settings)


_GAM_SETTINGS = (
    "rho",
    "perturb_rho",
    "plus_weight",
    "minus_weight",
    "orthogonal_weight",
    "flatness_weight",
)
_dataclass_init = TrainConfig.__init__


def current_names(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` (TrainConfig fields by keyword) with the names of flatlens 0.1 replaced,
    with a warning: ``rho`` (SAM's radius, now ``sam_rho``), ``gam`` (a dict, now
    ``gam_*`` fields) and ``trace_samples`` (now ``trace_probes``).

    Raises:
        TypeError: a setting given under both its old and its new name, or an unknown key
            in ``gam``.
    """
    settings = dict(settings)
    gam = settings.pop("gam", None) or {}
    unknown = sorted(set(gam) - set(_GAM_SETTINGS))
    if unknown:
        raise TypeError(f"TrainConfig(gam=...) has unknown GAM settings {unknown}")
    if gam:
        warn_renamed("TrainConfig", "gam", "one field per setting: gam_rho, gam_perturb_rho, ...")
    moved = {f"gam_{name}": value for name, value in gam.items()}
    for old, new in (("rho", "sam_rho"), ("trace_samples", "trace_probes")):
        if old in settings:
            warn_renamed("TrainConfig", old, new)
            moved[new] = settings.pop(old)
    both = sorted(set(moved) & set(settings))
    if both:
        raise TypeError(f"TrainConfig() got {both} under both their old and their new names")
    return {**settings, **moved}


@functools.wraps(_dataclass_init)
def _init(self: TrainConfig, *args: Any, **kwargs: Any) -> None:
    """The dataclass ``__init__``, accepting the names of flatlens 0.1 (see
    :func:`current_names`)."""
    _dataclass_init(self, *args, **current_names(kwargs))


TrainConfig.__init__ = _init  # type: ignore[method-assign]
RENAMES[("TrainConfig", "rho")] = "sam_rho"
RENAMES[("TrainConfig", "gam")] = "gam_rho, gam_perturb_rho, ..."
RENAMES[("TrainConfig", "trace_samples")] = "trace_probes"


def train(
    config: TrainConfig,
    data: Dataset | Streams,
    *,
    resume: bool = True,
    progress: bool = False,
    log_dir: str | Path | None = None,
) -> TrainResult:
    """Build model, optimizer and scheduler from ``config``, train, return the result.

    A resumed run continues exactly where the checkpoint stopped, so it must be the same
    run: every setting that changes the result (model, data, loss, optimizer and its
    settings, batch size, schedule, augmentation, precision, seed, dtype, measures) must
    equal the checkpoint's. ``epochs`` may grow only without a schedule
    (``scheduler="none"``), where the longer run is exactly the one asked for from the
    start; a cosine or step schedule spans the epochs it was started with, so they must
    match.

    Args:
        config: The run.
        data: Train/test tensors (:class:`~flatlens.data.Dataset`) or data sets read every
            epoch (:class:`~flatlens.data.Streams`); ``config.data_mean``/``data_std``
            renormalize it (:func:`~flatlens.data.with_normalization`).
        resume: Continue from ``config.checkpoint_dir``'s checkpoint when there is one.
        progress: A progress bar (images per second and the time left).
        log_dir: Where ``log.jsonl`` (one line per step and per epoch) and, with
            ``config.tensorboard``, TensorBoard's event files go (None: no logs).

    Returns:
        A :class:`TrainResult`; the trained network is ``result.model``.

    Raises:
        CheckpointError: (a ``ValueError``) the checkpoint is unreadable or holds another
            run (the message names every differing setting).
        ValueError: the model has no trainable parameters, or cannot be built.
        NonFiniteLossError: the training loss became NaN or infinite.
    """
    from flatlens.data import digest, with_normalization

    if config.data_mean is not None:
        data = with_normalization(data, config.data_mean, config.data_std)
    model = build_model(config, data)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch(data, config.batch_size))
    trainer = Trainer(
        model,
        optimizer,
        data,
        loss_fn=build_loss(config.loss, config.label_smoothing),
        batch_size=config.batch_size,
        scheduler=scheduler,
        seed=config.seed,
        measure_every=config.measure_every,
        measure_every_steps=config.measure_every_steps,
        measures=config.measures,
        measure_samples=config.measure_samples,
        measure_rho=config.measure_rho,
        measure_steps=config.measure_steps,
        measure_budget=config.measure_budget,
        trace_probes=config.trace_probes,
        critical_every_steps=config.critical_every_steps,
        augment=augmentation(config, data),
        augment_on=config.augment_on,
        num_workers=config.num_workers,
        amp=config.amp,
        checkpoint_dir=config.checkpoint_dir,
        log_dir=log_dir,
        log_every=config.log_every,
        tensorboard=config.tensorboard,
        settings={"config": config.to_dict(), "data_digest": digest(data)},
        progress=progress,
    )
    if resume and config.checkpoint_dir is not None:
        path = Path(config.checkpoint_dir) / CHECKPOINT_NAME
        if fd.broadcast_object(path.is_file()) if trainer.distributed else path.is_file():
            check_resume(config, data, path)
            trainer.load_checkpoint(path)
    return trainer.fit(config.epochs)
