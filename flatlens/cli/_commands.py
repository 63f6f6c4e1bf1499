"""What each ``flatlens`` subcommand does, given its parsed arguments.

A command raises :class:`~flatlens.cli._errors.UserError` for input the user can fix and
lets failures of the computation propagate; :func:`flatlens.cli._main.main` turns both into
one line on stderr and an exit code.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flatlens.cli._errors import UserError
from flatlens.core._results import to_jsonable

if TYPE_CHECKING:
    from torch import nn

    from flatlens.core._objective import Objective
    from flatlens.data import Dataset
    from flatlens.train import TrainConfig

__all__ = [
    "cmd_bound",
    "cmd_compare",
    "cmd_demo",
    "cmd_diagnose",
    "cmd_landscape",
    "cmd_train",
]


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``--model-kwargs`` as a dict (a JSON object)."""
    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as err:
        raise UserError(f"--model-kwargs is not valid JSON ({err}): {args.model_kwargs!r}") from err
    if not isinstance(kwargs, dict):
        raise UserError("--model-kwargs must be a JSON object like '{\"hidden\": 32}'")
    return kwargs


def _data(args: argparse.Namespace) -> Dataset:
    """The data set ``--data`` names."""
    from flatlens.cli._resolve import load_data

    try:
        return load_data(args.data)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from err


def _load(args: argparse.Namespace) -> tuple[nn.Module, Dataset]:
    """The model with the checkpoint's weights on ``--device``, and the data in its dtype."""
    from flatlens.cli._resolve import build_model, load_weights, match_dtype

    kwargs = _model_kwargs(args)
    data = _data(args)
    try:
        model = build_model(args.model, data, **kwargs)
    except (ValueError, TypeError) as err:
        raise UserError(str(err)) from err
    load_weights(model, args.checkpoint)
    model.to(args.device)
    return model, match_dtype(data, model)


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet


def _emit(args: argparse.Namespace, result: Any, text: str) -> None:
    """JSON on stdout with ``--json``; else ``text`` unless ``--quiet``."""
    if args.json:
        print(json.dumps(to_jsonable(result), indent=2, allow_nan=False))
    elif not args.quiet:
        print(text)


def _note(args: argparse.Namespace, text: str) -> None:
    """A remark on stderr unless ``--quiet``."""
    if not args.quiet:
        print(f"flatlens {args.command}: {text}", file=sys.stderr)


# ---------------------------------------------------------------------- diagnose
def cmd_diagnose(args: argparse.Namespace) -> None:
    """Measure a checkpoint; write report.json, figures and report.html."""
    from flatlens.report._diagnose import DiagnoseConfig, diagnose

    model, data = _load(args)
    try:
        config = DiagnoseConfig(
            rhos=args.rho, k=args.k, measure_samples=args.samples, seed=args.seed
        )
    except ValueError as err:
        raise UserError(str(err)) from err
    if args.quick:
        config = config.quick()
    out = Path(args.out)
    title = args.title or f"flatlens diagnosis: {Path(args.checkpoint).name} ({args.model})"
    report = diagnose(
        model, data, out, config=config, resume=args.resume, progress=_progress(args), title=title
    )
    files = ["report.json", "report.html", "figures", "parts"]
    report["files"] = [str(out / f) for f in files]
    lines = [
        f"{k:>12}: {v:.4g}" if isinstance(v, float) else f"{k:>12}: {v}"
        for k, v in report["summary"].items()
    ]
    if report["reused_parts"]:
        lines.append(f"{'reused':>12}: {', '.join(report['reused_parts'])}")
    _emit(args, report, "\n".join(lines) + f"\nreport: {out / 'report.html'}")


# ---------------------------------------------------------------------- train / compare
def _train_config(args: argparse.Namespace, optimizer: str, model: str) -> TrainConfig:
    from flatlens.train import TrainConfig

    try:
        return TrainConfig(
            model=model,
            model_kwargs=_model_kwargs(args),
            optimizer=optimizer,
            base=args.base,
            lr=args.lr,
            rho=args.rho,
            gam={"rho": args.rho} if optimizer.startswith("gam") else {},
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            scheduler=args.scheduler,
            measure_every=getattr(args, "measure_every", 0),
            measure_samples=args.measure_samples,
            measure_rho=args.rho,
            measure_steps=args.measure_steps,
            dtype=args.dtype,
            device=args.device,
        )
    except ValueError as err:
        raise UserError(str(err)) from err


def _check_resumable(config: TrainConfig, data: Dataset, path: Path) -> None:
    """Refuse to resume from a training checkpoint of another architecture (one line)."""
    from flatlens.cli._resolve import check_state_dict
    from flatlens.train import build_model, load_training_checkpoint

    payload = load_training_checkpoint(path)
    try:
        model = build_model(config, data)
    except (ValueError, TypeError) as err:
        raise UserError(str(err)) from err
    check_state_dict(model, payload["model"], path)


def cmd_train(args: argparse.Namespace) -> None:
    """Train one network; write model.pt, metrics.json and checkpoints/."""
    from flatlens.core._io import save_torch, write_json
    from flatlens.train import train
    from flatlens.train._trainer import CHECKPOINT_NAME

    data = _data(args)
    out = Path(args.out)
    config = _train_config(args, args.optimizer, args.model)
    config.checkpoint_dir = str(out / "checkpoints")
    last = Path(config.checkpoint_dir) / CHECKPOINT_NAME
    if last.is_file():
        if args.resume:
            _check_resumable(config, data, last)
        else:
            _note(args, f"starting afresh over {last} (--resume continues it)")
    result = train(config, data, resume=args.resume, progress=_progress(args))
    save_torch(out / "model.pt", result.model.state_dict())
    write_json(out / "metrics.json", result)
    payload = result.to_dict()
    payload["files"] = [str(out / f) for f in ("model.pt", "metrics.json", "checkpoints")]
    final = result.final
    _emit(
        args,
        payload,
        f"epoch {final.get('epoch')}: train loss {final.get('train_loss', math.nan):.4g}, test "
        f"acc {final.get('test_acc') or math.nan:.4f}, gap (loss) "
        f"{final.get('gap_loss', math.nan):.4g}\nweights: {out / 'model.pt'}",
    )


def cmd_compare(args: argparse.Namespace) -> None:
    """Optimizers x seeds; write study.json, flatness_vs_gap.png and report.html."""
    from flatlens.core._io import write_json
    from flatlens.report._html import write_report
    from flatlens.report._study import study_sections
    from flatlens.train import OPTIMIZERS, build_model, compare

    unknown = [o for o in args.optimizers if o not in OPTIMIZERS]
    if unknown:
        raise UserError(f"unknown optimizers {unknown}; choose from {list(OPTIMIZERS)}")
    data = _data(args)
    out = Path(args.out)
    base = _train_config(args, "sgd", args.model)
    try:  # a model that cannot be built fails here, not under the progress bar
        build_model(base, data)
    except (ValueError, TypeError) as err:
        raise UserError(str(err)) from err
    study = compare(data, args.optimizers, seeds=args.seeds, base=base, progress=_progress(args))
    write_json(out / "study.json", study)
    sections = study_sections(study, out)
    write_report(
        out / "report.html",
        f"flatlens compare: {', '.join(args.optimizers)} on {data.name}",
        sections,
        subtitle=(
            f"model {args.model}, {args.epochs} epochs, seeds {args.seeds}, lr {args.lr}, "
            f"ρ {args.rho}"
        ),
    )
    payload = study.to_dict()
    payload["files"] = [str(out / f) for f in ("study.json", "flatness_vs_gap.png", "report.html")]
    _emit(args, payload, study.table() + f"\n\nreport: {out / 'report.html'}")


# ---------------------------------------------------------------------- bound / landscape
def _objective(args: argparse.Namespace, model: nn.Module, data: Dataset) -> Objective:
    """The risk over the first ``--samples`` training examples, as ``diagnose`` measures it."""
    from flatlens.report._diagnose import DiagnoseConfig, measure_objective

    return measure_objective(model, data, DiagnoseConfig(measure_samples=args.samples))


def cmd_bound(args: argparse.Namespace) -> None:
    """R0, R1 and ρ²λ_max over radii; write bound.json and bound.png."""
    from flatlens.core._io import write_json
    from flatlens.measures._bounds import check_bound

    model, data = _load(args)
    objective = _objective(args, model, data)
    report = check_bound(
        objective,
        list(args.rho),
        steps=args.steps,
        restarts=args.restarts,
        seed=args.seed,
        progress=_progress(args),
    )
    out = Path(args.out)
    report.plot(out / "bound.png")
    write_json(out / "bound.json", report)
    payload = report.to_dict()
    payload["files"] = [str(out / "bound.json"), str(out / "bound.png")]
    verdict = "R0 <= R1 at every radius" if report.all_hold else "R0 > R1 somewhere: more --steps"
    _emit(args, payload, f"{report.table()}\n{verdict}\nplot: {out / 'bound.png'}")


def cmd_landscape(args: argparse.Namespace) -> None:
    """A 1-D or 2-D loss slice; write the grid (.npz + .json) and plots."""
    from flatlens import landscape as fl
    from flatlens.landscape._storage import store_paths

    model, data = _load(args)
    objective = _objective(args, model, data)
    out = Path(args.out)
    stem = "line" if args.dim == 1 else "plane"
    store = out / f"{stem}.npz"
    if not args.resume:
        for stale in store_paths(store):
            stale.unlink(missing_ok=True)
    d1 = fl.random_direction(objective, seed=args.seed)
    span = (-args.span, args.span)
    common = {"span": span, "store": store, "progress": _progress(args)}
    if args.dim == 1:
        result = fl.line(objective, d1, steps=args.steps, **common)
        fl.plot_line(result, out / "line.png", log=args.log)
        files = ["line.npz", "line.json", "line.png"]
    else:
        d2 = fl.random_direction(objective, seed=args.seed + 1)
        result = fl.plane(objective, d1, d2, steps=(args.steps, args.steps), **common)
        fl.plot_contour(result, out / "plane.png", filled=True, log=args.log)
        fl.plot_surface(result, out / "plane.html", log=args.log)
        files = ["plane.npz", "plane.json", "plane.png", "plane.html"]
    loss = result.values["loss"]
    summary = {
        "dim": args.dim,
        "shape": list(result.shape),
        "span": list(span),
        "loss_center": result.center.get("loss"),
        "loss_min": float(loss.min()),
        "loss_max": float(loss.max()),
        "cosine_d1_d2": result.cosine,
        "num_params": objective.num_params,
        "num_evaluated": result.num_evaluated,
        "files": [str(out / f) for f in files],
    }
    _emit(
        args,
        summary,
        f"loss at θ {summary['loss_center']:.4g}, range [{summary['loss_min']:.4g}, "
        f"{summary['loss_max']:.4g}]\nwritten: " + ", ".join(summary["files"]),
    )


# ---------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> None:
    """SGD, SAM and GAM on digits, each diagnosed, one comparison report."""
    from flatlens.cli._demo import run_demo

    summary = run_demo(
        Path(args.out),
        quick=args.quick,
        progress=_progress(args),
        seed=args.seed,
        device=args.device,
    )
    _emit(args, summary, summary["text"])
