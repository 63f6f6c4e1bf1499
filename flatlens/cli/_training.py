"""``flatlens train`` and ``flatlens compare``: check everything, then train.

A resumed ``train`` must be the run its checkpoint holds: every setting that changes the
result is compared with the checkpoint's and each difference is named (see
:func:`flatlens.train._resume.resume_conflicts`), so ``metrics.json`` always records what
actually ran.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flatlens.cli._commands import (
    emit,
    load_data,
    model_kwargs,
    note,
    progress,
)
from flatlens.cli._errors import UserError
from flatlens.cli._outputs import claim_out, outputs_of
from flatlens.core._results import to_jsonable

if TYPE_CHECKING:
    from torch import nn

    from flatlens.data import Dataset, Streams
    from flatlens.train import TrainConfig

__all__ = ["OPTION_NAMES", "load_train_data", "print_config", "run_compare", "run_train"]

_FIELDS = (
    "model",
    "optimizer",
    "base",
    "lr",
    "momentum",
    "weight_decay",
    "nesterov",
    "sam_rho",
    "sam_adaptive",
    "gam_rho",
    "gam_perturb_rho",
    "gam_plus_weight",
    "gam_minus_weight",
    "gam_orthogonal_weight",
    "gam_flatness_weight",
    "gam_adaptive",
    "gam_official",
    "epochs",
    "batch_size",
    "seed",
    "scheduler",
    "milestones",
    "lr_decay",
    "lr_update",
    "warmup_epochs",
    "label_smoothing",
    "augment",
    "augment_on",
    "num_workers",
    "data_mean",
    "data_std",
    "amp",
    "measure_every",
    "measure_every_steps",
    "measures",
    "measure_samples",
    "measure_rho",
    "measure_steps",
    "measure_budget",
    "trace_probes",
    "critical_every_steps",
    "log_every",
    "tensorboard",
    "dtype",
    "device",
    "loss",
)
"""The :class:`~flatlens.train.TrainConfig` fields an option of the same name sets."""

OPTION_NAMES = {
    "model_kwargs": "--model-kwargs",
    "data": "--data",
    **{name: "--" + name.replace("_", "-") for name in _FIELDS},
}
"""The option that sets each :class:`~flatlens.train.TrainConfig` field, for messages."""


def _radii(args: argparse.Namespace) -> dict[str, float]:
    """SAM's, GAM's and the measures' radii; the deprecated ``--rho`` sets the three at once
    (as it did in flatlens 0.1) where the new flags are not given."""
    radii = {name: getattr(args, name) for name in ("sam_rho", "gam_rho", "measure_rho")}
    old = getattr(args, "rho_all", None)
    if old is not None:
        given = set(getattr(args, "_given", ()))
        radii.update({name: old for name in radii if name not in given})
    return radii


def _given(args: argparse.Namespace) -> set[str]:
    """The TrainConfig fields whose options were given on the command line."""
    given = set(getattr(args, "_given", ()))
    if "rho_all" in given:
        given |= {"sam_rho", "gam_rho", "measure_rho"}
    return given


def _train_config(args: argparse.Namespace, optimizer: str | None = None) -> TrainConfig:
    """The run the options describe: the recipe's settings (if any), then every option
    given explicitly (``--model-kwargs`` updates the recipe's model arguments)."""
    from flatlens._recipes import RECIPES
    from flatlens.train import TrainConfig

    values: dict[str, Any] = {name: getattr(args, name) for name in _FIELDS if hasattr(args, name)}
    values.update(_radii(args))
    values["model_kwargs"] = model_kwargs(args)
    if optimizer is not None:
        values["optimizer"] = optimizer
    if args.recipe is not None:
        given = _given(args)
        recipe = RECIPES[args.recipe].settings
        for name, value in recipe.items():
            if name == "model_kwargs":
                values[name] = {**value, **(values[name] if name in given else {})}
            elif name not in given and not (name == "optimizer" and optimizer is not None):
                values[name] = value
        values["recipe"] = args.recipe
    try:
        return TrainConfig(**values)
    except (ValueError, TypeError) as err:
        raise UserError(str(err)) from err


def print_config(args: argparse.Namespace, config: TrainConfig) -> None:
    """``--print-config``: the settings that would run, each recipe setting with its source
    and the options that replaced the recipe's."""
    from flatlens._recipes import RECIPES

    payload: dict[str, Any] = {"config": config.to_dict(), "recipe": config.recipe}
    if config.recipe is not None:
        recipe = RECIPES[config.recipe]
        given = _given(args)
        payload["sources"] = recipe.sources
        payload["overridden"] = sorted(
            n for n in recipe.settings if n in given or (n == "model_kwargs" and n in given)
        )
        payload["published_data"] = recipe.data
    text = json.dumps(to_jsonable(payload), indent=2)
    print(text)


def _stream_factory(spec: str) -> Streams:
    """The data sets a ``package.module:factory`` returns, read every epoch."""
    from flatlens.data import stream_datasets
    from flatlens.zoo import import_object

    make = import_object(spec, "data factory")
    if not callable(make):
        raise ValueError(f"data factory {spec!r} is a {type(make).__name__}, not a function")
    try:
        made = make()
    except Exception as err:  # the user's factory failed
        text = " ".join(str(err).split()) or "(no message)"
        raise ValueError(f"data factory {spec!r} raised {type(err).__name__}: {text}") from err
    try:
        streams = stream_datasets(made, name=spec)
        streams.check()
    except (TypeError, ValueError) as err:
        raise ValueError(f"data factory {spec!r}: {err}") from err
    return streams


def load_train_data(args: argparse.Namespace, config: TrainConfig) -> Dataset | Streams:
    """The training data ``--data`` names: ``digits`` in memory, everything else read every
    epoch (:class:`~flatlens.data.Streams`), normalized with ``--data-mean``/``--data-std``
    when given."""
    from flatlens.data import stream_cifar, stream_imagefolder

    spec = args.data
    name, _, rest = spec.partition(":")
    norm = {"mean": config.data_mean, "std": config.data_std}
    try:
        if name in ("cifar10", "cifar100", "imagefolder"):
            if not rest:
                raise ValueError(f"--data {name} needs a folder: {name}:/path/to/folder")
            if name == "imagefolder":
                return stream_imagefolder(rest, **norm)
            return stream_cifar(Path(rest), num_classes=10 if name == "cifar10" else 100, **norm)
        if name != "digits" and rest and name:
            return _stream_factory(spec)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(str(err)) from err
    return load_data(args)


def _built(args: argparse.Namespace, config: TrainConfig, data: Dataset | Streams) -> nn.Module:
    """The run's model, built as training builds it, checked against data and loss."""
    from flatlens.cli._resolve import preflight
    from flatlens.train import build_model
    from flatlens.train._losses import build_loss

    try:
        model = build_model(config, data)
        loss_fn = build_loss(config.loss, config.label_smoothing)
        preflight(
            model, data, loss_fn, model_spec=config.model, loss_spec=config.loss, trainable=True
        )
    except (ValueError, TypeError) as err:
        raise UserError(str(err)) from err
    return model


def _check_resume(
    args: argparse.Namespace, config: TrainConfig, data: Dataset, model: nn.Module
) -> None:
    """Refuse ``--resume`` unless the checkpoint in ``--out`` holds this very run."""
    from flatlens.cli._resolve import check_state_dict
    from flatlens.train import load_training_checkpoint
    from flatlens.train._resume import resume_conflicts, resume_message
    from flatlens.train._trainer import CHECKPOINT_NAME

    out = Path(args.out)
    last = out / "checkpoints" / CHECKPOINT_NAME
    if not os.path.lexists(last):  # present but odd (a pipe, a folder): the load says why
        found = [n for n in outputs_of(args) if (out / n).exists()]
        if found:
            raise UserError(
                f"--resume finds no checkpoints/{CHECKPOINT_NAME} in {out} to continue, but "
                f"the folder holds {', '.join(found)}; pass --overwrite to replace them"
            )
        note(args, f"no checkpoint in {out} yet: starting a new run")
        return
    payload = load_training_checkpoint(last)
    check_state_dict(model, payload["model"], last)
    conflicts = resume_conflicts(config, data, payload, last)
    shown, seen = [], set()
    for name, before, now in conflicts:
        if OPTION_NAMES.get(name, name) not in seen:
            seen.add(OPTION_NAMES.get(name, name))
            shown.append((name, before, now))
    if shown:
        raise UserError(
            resume_message(
                last,
                payload,
                shown,
                OPTION_NAMES,
                fresh="start a new run (another --out, or --overwrite to replace this one)",
            )
        )


def _check_tensorboard(config: TrainConfig) -> None:
    if config.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError as err:
            raise UserError(
                "--tensorboard needs the tensorboard package: pip install 'flatlens[tensorboard]'"
            ) from err


def _note_recipe_data(args: argparse.Namespace, config: TrainConfig, data: Any) -> None:
    from flatlens._recipes import RECIPES

    if config.recipe is not None:
        published = RECIPES[config.recipe].data
        if not data.name.startswith(published):
            note(args, f"recipe {config.recipe} was published on {published}, not {data.name}")


def run_train(args: argparse.Namespace) -> None:
    """Train one network; write model.pt, metrics.json, log.jsonl and checkpoints/."""
    from flatlens.core._io import save_torch, write_json
    from flatlens.train import train

    config = _train_config(args)
    if args.print_config:
        print_config(args, config)
        return
    _check_tensorboard(config)
    data = load_train_data(args, config)
    _note_recipe_data(args, config, data)
    model = _built(args, config, data)
    out = claim_out(args)  # the folder's lock first: a run writing there is never read
    if args.resume:
        _check_resume(args, config, data, model)
    config.checkpoint_dir = str(out / "checkpoints")
    result = train(config, data, resume=args.resume, progress=progress(args), log_dir=out)
    save_torch(out / "model.pt", result.model.state_dict())
    write_json(out / "metrics.json", result)
    payload = result.to_dict()
    files = ["model.pt", "metrics.json", "log.jsonl", "checkpoints"]
    payload["files"] = [
        str(out / f) for f in files + (["tensorboard"] if config.tensorboard else [])
    ]
    final, costs = result.final, result.costs
    overhead = costs.get("overhead")
    emit(
        args,
        payload,
        f"epoch {final.get('epoch')}: train loss {final.get('train_loss', math.nan):.4g}, test "
        f"acc {final.get('test_acc') or math.nan:.4f}, gap (loss) "
        f"{final.get('gap_loss', math.nan):.4g}\n{costs.get('images_per_second') or 0:.0f} "
        f"images/s; measures {costs.get('measure_seconds', 0):.1f} s"
        + (f" ({100 * overhead:.1f}% of training)" if overhead else "")
        + f"\nweights: {out / 'model.pt'}",
    )


def run_compare(args: argparse.Namespace) -> None:
    """Optimizers x seeds; write study.json, flatness_vs_gap.png and report.html."""
    from flatlens.core._io import write_json
    from flatlens.report._html import write_report
    from flatlens.report._study import study_sections
    from flatlens.train import OPTIMIZERS, compare

    unknown = [o for o in args.optimizers if o not in OPTIMIZERS]
    if unknown:
        raise UserError(f"unknown optimizers {unknown}; choose from {list(OPTIMIZERS)}")
    base = _train_config(args, None if args.recipe else "sgd")
    if args.print_config:
        print_config(args, base)
        return
    data = load_train_data(args, base)
    _built(args, base, data)  # a model that cannot be built fails here, not under the bar
    out = claim_out(args)
    study = compare(data, args.optimizers, seeds=args.seeds, config=base, progress=progress(args))
    write_json(out / "study.json", study)
    sections = study_sections(study, out)
    write_report(
        out / "report.html",
        f"flatlens compare: {', '.join(args.optimizers)} on {data.name}",
        sections,
        subtitle=(
            f"model {args.model}, loss {args.loss}, {args.epochs} epochs, seeds {args.seeds}, "
            f"lr {args.lr}, SAM ρ {base.sam_rho}, GAM ρ {base.gam_rho}, "
            f"measured at ρ {base.measure_rho}"
        ),
    )
    payload: dict[str, Any] = study.to_dict()
    payload["files"] = [str(out / f) for f in ("study.json", "flatness_vs_gap.png", "report.html")]
    emit(args, payload, study.table() + f"\n\nreport: {out / 'report.html'}")
