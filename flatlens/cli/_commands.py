"""What each ``flatlens`` subcommand does, given its parsed arguments.

Every command first resolves and checks everything the user gave (model, data, loss,
checkpoint, settings, the ``--out`` folder) and raises :class:`~flatlens.cli._errors.UserError`
for what the user can fix; only then does it compute. Failures of the computation propagate;
:func:`flatlens.cli._main.main` turns both into one line on stderr and an exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flatlens.cli._errors import UserError
from flatlens.cli._outputs import claim_out
from flatlens.core._results import to_jsonable

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import Tensor, nn

    from flatlens.core._objective import Objective
    from flatlens.data import Dataset

__all__ = [
    "cmd_bound",
    "cmd_compare",
    "cmd_demo",
    "cmd_diagnose",
    "cmd_landscape",
    "cmd_train",
]


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``--model-kwargs`` as a dict (a JSON object)."""
    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as err:
        raise UserError(f"--model-kwargs is not valid JSON ({err}): {args.model_kwargs!r}") from err
    if not isinstance(kwargs, dict):
        raise UserError("--model-kwargs must be a JSON object like '{\"hidden\": 32}'")
    return kwargs


def load_data(args: argparse.Namespace) -> Dataset:
    """The data set ``--data`` names."""
    from flatlens.cli._resolve import load_data as load

    try:
        return load(args.data)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(str(err)) from err


def load_loss(args: argparse.Namespace) -> Callable[..., Tensor]:
    """The loss ``--loss`` names."""
    from flatlens.cli._resolve import build_loss

    try:
        return build_loss(args.loss)
    except (ValueError, TypeError) as err:
        raise UserError(str(err)) from err


def check_fit(
    args: argparse.Namespace,
    model: nn.Module,
    data: Dataset,
    loss_fn: Callable[..., Tensor],
    *,
    trainable: bool = False,
) -> None:
    """Model, data and loss on two examples (see :func:`~flatlens.cli._resolve.preflight`)."""
    from flatlens.cli._resolve import preflight

    try:
        preflight(
            model, data, loss_fn, model_spec=args.model, loss_spec=args.loss, trainable=trainable
        )
    except ValueError as err:
        raise UserError(str(err)) from err


def _load(args: argparse.Namespace, notes: list[str]) -> tuple[nn.Module, Dataset, Any]:
    """The model with the checkpoint's weights on ``--device``, the data in its dtype and
    the loss, all checked to fit together."""
    from flatlens.cli._models import resolve_model
    from flatlens.cli._resolve import match_dtype

    kwargs = model_kwargs(args)
    data = load_data(args)
    loss_fn = load_loss(args)
    try:
        # --model hf:DIR, timm/NAME, torchvision/NAME, zoo names and factories; .safetensors,
        # torch.save and Lightning .ckpt checkpoints (flatlens.cli._models).
        model, task_loss, args.loss = resolve_model(
            args.model,
            args.checkpoint,
            data,
            kwargs,
            loss_spec=args.loss,
            dtype=args.dtype,
            state_prefix=getattr(args, "state_prefix", None),
            notes=notes,
        )
    except (ValueError, TypeError) as err:
        raise UserError(str(err)) from err
    loss_fn = task_loss if task_loss is not None else loss_fn
    model.to(args.device)
    data = match_dtype(data, model)
    check_fit(args, model, data, loss_fn)
    for text in notes:
        note(args, text)
    return model, data, loss_fn


def progress(args: argparse.Namespace) -> bool:
    """Whether to show progress bars."""
    return not args.quiet


def emit(args: argparse.Namespace, result: Any, text: str) -> None:
    """JSON on stdout with ``--json``; else ``text`` unless ``--quiet``."""
    if args.json:
        print(json.dumps(to_jsonable(result), indent=2, allow_nan=False))
    elif not args.quiet:
        print(text)


def note(args: argparse.Namespace, text: str) -> None:
    """A remark on stderr unless ``--quiet`` (never a safety decision: those are errors)."""
    if not args.quiet:
        print(f"flatlens {args.command}: {text}", file=sys.stderr)


def _check_stores(out: Path, names: list[str]) -> None:
    """Refuse, before any work, a landscape store in ``out`` that cannot be read."""
    from flatlens.core._paths import not_a_file
    from flatlens.landscape._storage import read

    for name in names:
        path = out / name
        if os.path.lexists(path):
            try:
                problem = not_a_file(path)  # a named pipe would block the reader forever
                if problem:
                    raise ValueError(f"{path} {problem}")
                read(path)
            except (OSError, ValueError) as err:
                raise UserError(
                    f"landscape store {path} cannot be resumed: {err}. Delete it to recompute "
                    "it, or pass --overwrite instead of --resume to start afresh"
                ) from err


# ---------------------------------------------------------------------- diagnose
DIAGNOSE_SETTINGS = {
    "steps": "steps",
    "restarts": "restarts",
    "trace_probes": "trace_probes",
    "density_runs": "density_runs",
    "lanczos_steps": "lanczos_steps",
    "landscape_1d": "line_points",
    "landscape_2d": "plane_points",
    "landscape_span": "span",
}
"""``DiagnoseConfig`` field -> the ``diagnose`` option that sets it (None: the default)."""


def cmd_diagnose(args: argparse.Namespace) -> None:
    """Measure a checkpoint; write report.json, figures and report.html."""
    from flatlens.report._diagnose import DiagnoseConfig, diagnose

    given = {
        field: getattr(args, flag)
        for field, flag in DIAGNOSE_SETTINGS.items()
        if getattr(args, flag) is not None
    }
    try:
        config = DiagnoseConfig(
            rhos=args.measure_rho,
            k=args.k,
            measure_samples=args.samples,
            batch_size=args.batch_size,
            memory_budget=args.memory_budget,
            blocks=args.blocks,
            seed=args.seed,
            **_curvature_settings(args),
        )
        if args.quick:
            config = config.quick()
        config = replace(config, **given)
    except ValueError as err:
        raise UserError(str(err)) from err
    notes: list[str] = []
    model, data, loss_fn = _load(args, notes)
    out = claim_out(args)
    if args.resume:
        _check_stores(out, ["landscape_1d.npz", "landscape_2d.npz"])
    source = Path(args.checkpoint or args.model.removeprefix("hf:")).name
    title = args.title or f"flatlens diagnosis: {source} ({args.model})"
    report = diagnose(
        model,
        data,
        out,
        config=config,
        loss_fn=loss_fn,
        loss_name=args.loss,
        resume=args.resume,
        progress=progress(args),
        title=title,
        notes=notes,
    )
    files = ["report.json", "report.html", "figures", "parts"]
    report["files"] = [str(out / f) for f in files]
    lines = [
        f"{k:>12}: {v:.4g}" if isinstance(v, float) else f"{k:>12}: {v}"
        for k, v in report["summary"].items()
    ]
    if report["reused_parts"]:
        lines.append(f"{'reused':>12}: {', '.join(report['reused_parts'])}")
    emit(args, report, "\n".join(lines) + f"\nreport: {out / 'report.html'}")


# ---------------------------------------------------------------------- bound / landscape
def _objective(
    args: argparse.Namespace, model: nn.Module, data: Dataset, loss_fn: Any
) -> Objective:
    """The risk over the first ``--samples`` training examples, as ``diagnose`` measures it."""
    from flatlens.report._diagnose import DiagnoseConfig, measure_objective

    try:
        config = DiagnoseConfig(
            measure_samples=args.samples,
            batch_size=args.batch_size,
            memory_budget=args.memory_budget,
            **_curvature_settings(args),
        )
    except ValueError as err:
        raise UserError(str(err)) from err
    return measure_objective(model, data, config, loss_fn)


def _curvature_settings(args: argparse.Namespace) -> dict[str, Any]:
    """--hvp-method, --basis-device and --basis-dtype, where the command has them."""
    keys = ("hvp_method", "basis_device", "basis_dtype")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def cmd_bound(args: argparse.Namespace) -> None:
    """R0, R1 and ρ²λ_max over radii; write bound.json and bound.png."""
    from flatlens.core._io import write_json
    from flatlens.measures._bounds import check_bound

    notes: list[str] = []
    model, data, loss_fn = _load(args, notes)
    objective = _objective(args, model, data, loss_fn)
    out = claim_out(args)
    from flatlens.core._checks import floating_dtype

    basis_dtype = floating_dtype(getattr(args, "basis_dtype", None))  # the parser's choices
    report = check_bound(
        objective,
        list(args.measure_rho),
        steps=args.steps,
        restarts=args.restarts,
        seed=args.seed,
        progress=progress(args),
        basis_device=getattr(args, "basis_device", None),
        basis_dtype=basis_dtype,
    )
    report.plot(out / "bound.png")
    payload = {**report.to_dict(), "loss": args.loss, "notes": [*notes, *report.notes]}
    write_json(out / "bound.json", payload)
    payload["files"] = [str(out / "bound.json"), str(out / "bound.png")]
    verdict = "R0 <= R1 at every radius" if report.all_hold else "R0 > R1 somewhere: more --steps"
    emit(args, payload, f"{report.table()}\n{verdict}\nplot: {out / 'bound.png'}")


def cmd_landscape(args: argparse.Namespace) -> None:
    """A 1-D or 2-D loss slice; write the grid (.npz + .json) and plots."""
    from flatlens import landscape as fl
    from flatlens.landscape._storage import store_paths

    notes: list[str] = []
    model, data, loss_fn = _load(args, notes)
    objective = _objective(args, model, data, loss_fn)
    out = claim_out(args)
    stem = "line" if args.dim == 1 else "plane"
    store = out / f"{stem}.npz"
    if args.resume:
        _check_stores(out, [store.name])
    else:
        for stale in store_paths(store):
            stale.unlink(missing_ok=True)
    d1 = fl.random_direction(objective, seed=args.seed)
    span = (-args.span, args.span)
    common = {"span": span, "store": store, "progress": progress(args)}
    if args.dim == 1:
        result = fl.line(objective, d1, num_points=args.num_points, **common)
        fl.plot_line(result, out / "line.png", log=args.log)
        files = ["line.npz", "line.json", "line.png"]
    else:
        d2 = fl.random_direction(objective, seed=args.seed + 1)
        points = (args.num_points, args.num_points)
        result = fl.plane(objective, d1, d2, num_points=points, **common)
        fl.plot_contour(result, out / "plane.png", filled=True, log=args.log)
        fl.plot_surface(result, out / "plane.html", log=args.log)
        files = ["plane.npz", "plane.json", "plane.png", "plane.html"]
    if args.vtk:
        files.append(result.to_vtk(out / f"{stem}.vtp", log=args.log).name)
    loss = result.values["loss"]
    summary = {
        "dim": args.dim,
        "shape": list(result.shape),
        "span": list(span),
        "loss": args.loss,
        "loss_center": result.center.get("loss"),
        "loss_min": float(loss.min()),
        "loss_max": float(loss.max()),
        "cosine_d1_d2": result.cosine,
        "num_params": objective.num_params,
        "num_evaluated": result.num_evaluated,
        "notes": notes,
        "files": [str(out / f) for f in files],
    }
    emit(
        args,
        summary,
        f"loss at θ {summary['loss_center']:.4g}, range [{summary['loss_min']:.4g}, "
        f"{summary['loss_max']:.4g}]\nwritten: " + ", ".join(summary["files"]),
    )


# ---------------------------------------------------------------------- train / compare / demo
def cmd_train(args: argparse.Namespace) -> None:
    """Train one network; write model.pt, metrics.json and checkpoints/."""
    from flatlens.cli._training import run_train

    run_train(args)


def cmd_compare(args: argparse.Namespace) -> None:
    """Optimizers x seeds; write study.json, flatness_vs_gap.png and report.html."""
    from flatlens.cli._training import run_compare

    run_compare(args)


def cmd_demo(args: argparse.Namespace) -> None:
    """SGD, SAM and GAM on digits, each diagnosed, one comparison report."""
    from flatlens.cli._demo import run_demo

    out = claim_out(args)
    summary = run_demo(
        out,
        quick=args.quick,
        progress=progress(args),
        seed=args.seed,
        device=args.device,
    )
    emit(args, summary, summary["text"])
