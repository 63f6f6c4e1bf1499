"""The ``flatlens`` command (also ``python -m flatlens``).

Subcommands: ``diagnose``, ``train``, ``landscape``, ``bound``, ``compare``, ``demo``.
Errors a user can fix (a missing or corrupt checkpoint, a bad argument) print one line on
stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from flatlens.io import CheckpointError
from flatlens.results import to_jsonable

__all__ = ["main"]

EXIT_USAGE = 2


class UserError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def _model_args(p: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    p.add_argument("--model", required=True, help="mlp, cnn, resnet18 or package.module:factory")
    p.add_argument("--model-kwargs", default="{}", help="JSON dict of factory arguments")
    p.add_argument("--data", default="digits", help="digits, cifar10:DIR or cifar100:DIR")
    if checkpoint:
        p.add_argument("--checkpoint", required=True, help="state dict file (.pt)")


def _rhos(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--rho takes numbers like 0.01,0.05: {text!r}") from err
    if not values or any(not r > 0 for r in values):
        raise argparse.ArgumentTypeError(f"--rho values must be > 0, got {text!r}")
    return values


def _load(args: argparse.Namespace, checkpoint: bool = True):
    from flatlens.resolve import build_model, load_data, load_weights

    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as err:
        raise UserError(f"--model-kwargs is not valid JSON: {err}") from err
    if not isinstance(kwargs, dict):
        raise UserError("--model-kwargs must be a JSON object")
    try:
        data = load_data(args.data)
        model = build_model(args.model, data, **kwargs)
        if checkpoint:
            load_weights(model, args.checkpoint)
    except (FileNotFoundError, ValueError, TypeError) as err:
        raise UserError(str(err)) from err
    return model.to(args.device), data


def _emit(args: argparse.Namespace, result: Any, text: str) -> None:
    if args.json:
        print(json.dumps(to_jsonable(result), indent=2))
    elif not args.quiet:
        print(text)


def cmd_diagnose(args: argparse.Namespace) -> None:
    from flatlens.report.diagnose import DiagnoseConfig, diagnose

    model, data = _load(args)
    config = DiagnoseConfig(rhos=args.rho, k=args.k, seed=args.seed)
    if args.quick:
        config = _quick(config)
    out = Path(args.out or "flatlens_diagnosis")
    report = diagnose(model, data, out, config=config, resume=args.resume, progress=not args.quiet)
    lines = [
        f"{k:>12}: {v:.4g}" if isinstance(v, float) else f"{k:>12}: {v}"
        for k, v in report["summary"].items()
    ]
    _emit(args, report, "\n".join(lines) + f"\nreport: {out / 'report.html'}")


def _quick(config):
    from dataclasses import replace

    return replace(
        config,
        k=min(config.k, 3),
        measure_samples=256,
        trace_samples=9,
        density_runs=1,
        density_steps=20,
        ascent_steps=4,
        landscape_1d=11,
        landscape_2d=7,
    )


def _train_config(args: argparse.Namespace, optimizer: str):
    from flatlens.train import TrainConfig

    try:
        kwargs = json.loads(args.model_kwargs)
        return TrainConfig(
            model=args.model,
            model_kwargs=kwargs,
            optimizer=optimizer,
            base=args.base,
            lr=args.lr,
            rho=args.rho,
            gam={"rho": args.rho} if optimizer.startswith("gam") else {},
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            measure_every=args.measure_every,
            device=args.device,
        )
    except (json.JSONDecodeError, ValueError, TypeError) as err:
        raise UserError(str(err)) from err


def cmd_train(args: argparse.Namespace) -> None:
    from flatlens.io import save_torch, write_json
    from flatlens.resolve import load_data
    from flatlens.train import train

    try:
        data = load_data(args.data)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from err
    out = Path(args.out or f"flatlens_train_{args.optimizer}")
    config = _train_config(args, args.optimizer)
    config.checkpoint_dir = str(out / "checkpoints")
    result = train(config, data, resume=args.resume, progress=not args.quiet)
    save_torch(out / "model.pt", result.model.state_dict())
    write_json(out / "metrics.json", result)
    final = result.final
    _emit(
        args,
        result,
        f"test acc {final.get('test_acc', float('nan')):.4f}, gap (loss) "
        f"{final.get('gap_loss', float('nan')):.4g}; weights: {out / 'model.pt'}",
    )


def cmd_compare(args: argparse.Namespace) -> None:
    from flatlens.io import write_json
    from flatlens.report.html import Section, write_report
    from flatlens.resolve import load_data
    from flatlens.train import compare

    try:
        data = load_data(args.data)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from err
    out = Path(args.out or "flatlens_compare")
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    seeds = [int(v) for v in args.seeds.split(",")]
    base = _train_config(args, "sgd")
    if not base.measure_every:
        base.measure_every = base.epochs
    study = compare(data, optimizers, seeds=seeds, base=base, progress=not args.quiet)
    study.plot(out / "flatness_vs_gap.png")
    write_json(out / "study.json", study)
    write_report(
        out / "report.html",
        f"flatlens compare: {', '.join(optimizers)} on {data.name}",
        [
            Section("Mean over seeds", table=study.summary),
            Section(
                "Flatness against the generalization gap",
                text="Kendall's τ between each measure and the gap, over all runs.",
                table=[
                    {"measure": m, **{g: v["tau"] for g, v in gaps.items()}}
                    for m, gaps in study.kendall.items()
                ],
                images=[("measures vs gap", out / "flatness_vs_gap.png")],
            ),
            Section("Runs", table=study.runs),
        ],
    )
    _emit(args, study, study.table() + f"\nreport: {out / 'report.html'}")


def cmd_bound(args: argparse.Namespace) -> None:
    from flatlens.bounds import check_bound
    from flatlens.io import write_json
    from flatlens.report.diagnose import DiagnoseConfig, measure_objective

    model, data = _load(args)
    objective = measure_objective(model, data, DiagnoseConfig(measure_samples=args.samples))
    report = check_bound(
        objective, list(args.rho), steps=args.steps, seed=args.seed, progress=not args.quiet
    )
    out = Path(args.out or "flatlens_bound")
    report.plot(out / "bound.png")
    write_json(out / "bound.json", report)
    _emit(args, report, f"{report.table()}\nplot: {out / 'bound.png'}")


def cmd_landscape(args: argparse.Namespace) -> None:
    from flatlens import landscape as fl
    from flatlens.report.diagnose import DiagnoseConfig, measure_objective

    model, data = _load(args)
    objective = measure_objective(model, data, DiagnoseConfig(measure_samples=args.samples))
    out = Path(args.out or "flatlens_landscape")
    d1 = fl.random_direction(objective, seed=args.seed)
    span = (-args.span, args.span)
    if args.dim == 1:
        result = fl.line(
            objective,
            d1,
            span=span,
            steps=args.steps,
            store=out / "line.npz",
            progress=not args.quiet,
        )
        fl.plot_line(result, out / "line.png", log=args.log)
        files = ["line.npz", "line.png"]
    else:
        d2 = fl.random_direction(objective, seed=args.seed + 1)
        result = fl.plane(
            objective,
            d1,
            d2,
            span=span,
            steps=(args.steps, args.steps),
            store=out / "plane.npz",
            progress=not args.quiet,
        )
        fl.plot_contour(result, out / "plane.png", filled=True, log=args.log)
        fl.plot_surface(result, out / "plane.html", log=args.log)
        files = ["plane.npz", "plane.png", "plane.html"]
    loss = result.values["loss"]
    summary = {
        "files": [str(out / f) for f in files],
        "loss_min": float(loss.min()),
        "loss_max": float(loss.max()),
    }
    _emit(args, summary, "written: " + ", ".join(summary["files"]))


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mlp", help="zoo model: mlp, cnn or resnet18")
    p.add_argument("--model-kwargs", default="{}", help="JSON dict of model arguments")
    p.add_argument("--data", default="digits", help="digits, cifar10:DIR or cifar100:DIR")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--rho", type=float, default=0.05, help="SAM/GAM radius")
    p.add_argument("--base", default="sgd", choices=["sgd", "adamw"], help="base optimizer")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--measure-every", type=int, default=0, help="epochs between flatness measures")


def cmd_demo(args: argparse.Namespace) -> None:
    from flatlens.demo import run_demo

    summary = run_demo(
        Path(args.out or "demo_out"), quick=args.quick, progress=not args.quiet, seed=args.seed
    )
    _emit(args, summary, summary["text"])


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``flatlens`` command."""
    parser = argparse.ArgumentParser(
        prog="flatlens",
        description="Hessian spectra, sharpness, first-order flatness and loss landscapes.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("diagnose", help="measure a checkpoint and write report.json/report.html")
    _model_args(p)
    _common(p)
    p.add_argument("--rho", type=_rhos, default=(0.01, 0.02, 0.05), help="radii, e.g. 0.01,0.05")
    p.add_argument("--k", type=int, default=5, help="number of top Hessian eigenvalues")
    p.add_argument("--quick", action="store_true", help="small settings for a fast look")
    p.add_argument("--resume", action="store_true", help="reuse finished parts in --out")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("train", help="train with sgd, adamw, sam or gam; checkpoints and metrics")
    _train_args(p)
    _common(p)
    p.add_argument("--optimizer", default="sgd", help="sgd, adamw, sam, gam or gam-exact")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="optimizers x seeds: flatness against the gap")
    _train_args(p)
    _common(p)
    p.add_argument("--optimizers", default="sgd,sam,gam", help="comma-separated optimizers")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("bound", help="check R0 <= R1 and R1/rho^2 -> lambda_max over radii")
    _model_args(p)
    _common(p)
    p.add_argument("--rho", type=_rhos, default=(0.005, 0.01, 0.02, 0.05), help="radii")
    p.add_argument("--steps", type=int, default=20, help="projected-ascent steps")
    p.add_argument("--samples", type=int, default=512, help="training examples measured")
    p.set_defaults(func=cmd_bound)

    p = sub.add_parser("landscape", help="1-D or 2-D loss slice around a checkpoint")
    _model_args(p)
    _common(p)
    p.add_argument("--dim", type=int, choices=[1, 2], default=2)
    p.add_argument(
        "--steps", type=int, default=41, help="grid points per axis (odd keeps the centre)"
    )
    p.add_argument("--span", type=float, default=1.0, help="grid covers [-span, span]")
    p.add_argument("--samples", type=int, default=None, help="training examples (default all)")
    p.add_argument("--log", action="store_true", help="log-scale loss")
    p.set_defaults(func=cmd_landscape)

    p = sub.add_parser("demo", help="SGD, SAM and GAM on digits, each diagnosed, one report")
    _common(p)
    p.add_argument("--quick", action="store_true", help="fewer epochs and smaller settings")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        if args.device != "cpu" and not _device_ok(args.device):
            raise UserError(f"--device {args.device} is not available on this machine")
        func(args)
    except (UserError, CheckpointError) as err:
        print(f"flatlens {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"flatlens {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


def _device_ok(device: str) -> bool:
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError):
        return False
    return True


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
