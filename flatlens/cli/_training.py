"""``flatlens train`` and ``flatlens compare``: check everything, then train.

A resumed ``train`` must be the run its checkpoint holds: every setting that changes the
result is compared with the checkpoint's and each difference is named (see
:func:`flatlens.train._resume.resume_conflicts`), so ``metrics.json`` always records what
actually ran.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flatlens.cli._commands import (
    check_fit,
    emit,
    load_data,
    load_loss,
    model_kwargs,
    note,
    progress,
)
from flatlens.cli._errors import UserError
from flatlens.cli._outputs import claim_out, outputs_of

if TYPE_CHECKING:
    from torch import nn

    from flatlens.data import Dataset
    from flatlens.train import TrainConfig

__all__ = ["OPTION_NAMES", "run_compare", "run_train"]

OPTION_NAMES = {
    "model": "--model",
    "model_kwargs": "--model-kwargs",
    "data": "--data",
    "loss": "--loss",
    "optimizer": "--optimizer",
    "base": "--base",
    "lr": "--lr",
    "sam_rho": "--sam-rho",
    "gam_rho": "--gam-rho",
    "gam_perturb_rho": "--gam-perturb-rho",
    "gam_plus_weight": "--gam-plus-weight",
    "gam_minus_weight": "--gam-minus-weight",
    "gam_orthogonal_weight": "--gam-orthogonal-weight",
    "gam_flatness_weight": "--gam-flatness-weight",
    "measure_rho": "--measure-rho",
    "trace_probes": "--trace-probes",
    "epochs": "--epochs",
    "batch_size": "--batch-size",
    "seed": "--seed",
    "scheduler": "--scheduler",
    "dtype": "--dtype",
    "measure_every": "--measure-every",
    "measure_samples": "--measure-samples",
    "measure_steps": "--measure-steps",
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


def _train_config(args: argparse.Namespace, optimizer: str) -> TrainConfig:
    from flatlens.train import TrainConfig

    try:
        return TrainConfig(
            model=args.model,
            model_kwargs=model_kwargs(args),
            optimizer=optimizer,
            base=args.base,
            lr=args.lr,
            **_radii(args),
            gam_perturb_rho=args.gam_perturb_rho,
            gam_plus_weight=args.gam_plus_weight,
            gam_minus_weight=args.gam_minus_weight,
            gam_orthogonal_weight=args.gam_orthogonal_weight,
            gam_flatness_weight=args.gam_flatness_weight,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            scheduler=args.scheduler,
            measure_every=getattr(args, "measure_every", 0),
            measure_samples=args.measure_samples,
            measure_steps=args.measure_steps,
            trace_probes=args.trace_probes,
            dtype=args.dtype,
            device=args.device,
            loss=args.loss,
        )
    except (ValueError, TypeError) as err:
        raise UserError(str(err)) from err


def _built(args: argparse.Namespace, config: TrainConfig, data: Dataset) -> nn.Module:
    """The run's model, built as training builds it, checked against data and loss."""
    from flatlens.train import build_model

    try:
        model = build_model(config, data)
    except (ValueError, TypeError) as err:
        raise UserError(str(err)) from err
    check_fit(args, model, data, load_loss(args), trainable=True)
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


def run_train(args: argparse.Namespace) -> None:
    """Train one network; write model.pt, metrics.json and checkpoints/."""
    from flatlens.core._io import save_torch, write_json
    from flatlens.train import train

    data = load_data(args)
    config = _train_config(args, args.optimizer)
    model = _built(args, config, data)
    out = claim_out(args)  # the folder's lock first: a run writing there is never read
    if args.resume:
        _check_resume(args, config, data, model)
    config.checkpoint_dir = str(out / "checkpoints")
    result = train(config, data, resume=args.resume, progress=progress(args))
    save_torch(out / "model.pt", result.model.state_dict())
    write_json(out / "metrics.json", result)
    payload = result.to_dict()
    payload["files"] = [str(out / f) for f in ("model.pt", "metrics.json", "checkpoints")]
    final = result.final
    emit(
        args,
        payload,
        f"epoch {final.get('epoch')}: train loss {final.get('train_loss', math.nan):.4g}, test "
        f"acc {final.get('test_acc') or math.nan:.4f}, gap (loss) "
        f"{final.get('gap_loss', math.nan):.4g}\nweights: {out / 'model.pt'}",
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
    data = load_data(args)
    base = _train_config(args, "sgd")
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
