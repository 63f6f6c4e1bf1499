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
