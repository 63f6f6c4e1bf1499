"""The ``flatlens`` command (also ``python -m flatlens``).

Subcommands: ``diagnose``, ``train``, ``compare``, ``bound``, ``landscape``, ``demo``
(``flatlens SUBCOMMAND --help`` lists the options; docs/cli.md describes them all).

Exit codes: 0 success; 2 an error the user can fix (a missing, corrupt, untrusted or
mismatched checkpoint, a bad option value), printed as one line on stderr without a
traceback; 1 a failure while running (non-finite loss, out of memory, an unwritable output
folder), also one line; 130 interrupted. ``FLATLENS_DEBUG=1`` shows the traceback instead.

Under ``torchrun`` every rank runs the command and only rank 0 writes ``--out`` and prints
(see :func:`flatlens.distributed.cli_session`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from flatlens.core._io import CheckpointError
from flatlens.core._results import to_jsonable
from flatlens.distributed import cli_session

if TYPE_CHECKING:
    from torch import nn

    from flatlens.core._objective import Objective
    from flatlens.data import Dataset
    from flatlens.train import TrainConfig

__all__ = ["EXIT_FAILURE", "EXIT_USAGE", "UserError", "build_parser", "main"]

EXIT_USAGE = 2
EXIT_FAILURE = 1


class UserError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""


class _Help(argparse.HelpFormatter):
    """Help that shows an option's default when it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        quiet = default is None or default is False or default in ("", argparse.SUPPRESS)
        if action.option_strings and not quiet:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------- option types
def _int_at_least(least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _rhos(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"takes radii > 0 separated by commas, like 0.01,0.05; got {text!r}"
        ) from None
    if not all(math.isfinite(r) and r > 0 for r in values):
        raise argparse.ArgumentTypeError(f"radii must be finite and > 0, got {text!r}")
    return values


def _samples(text: str) -> int | None:
    if text == "all":
        return None
    return _int_at_least(1)(text)


def _names(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated names, like sgd,sam,gam")
    return names


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, like 0,1,2; got {text!r}"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected distinct seeds >= 0, got {text!r}")
    return seeds


# ---------------------------------------------------------------------- shared options
def _common(p: argparse.ArgumentParser, out: str, threads: int = 0) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--out", metavar="DIR", default=out, help="output folder")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    g.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of every random choice")
    g.add_argument(
        "--threads",
        metavar="N",
        type=_int_at_least(0),
        default=threads,
        help="CPU threads of torch (0: torch's default; 1 is fastest for tiny models)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bars and no summary text")
    g.add_argument(
        "--json", action="store_true", help="print the result as JSON on stdout, nothing else"
    )


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="mlp, cnn, resnet18 or package.module:factory")
    p.add_argument(
        "--model-kwargs", metavar="JSON", default="{}", help="JSON object of factory arguments"
    )
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        required=True,
        help="state dict file (.pt): plain, or {'model': state_dict, ...}",
    )
    p.add_argument("--data", default="digits", help="digits, cifar10:DIR or cifar100:DIR")


def _train_args(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("--model", default="mlp", help=model_help)
    p.add_argument(
        "--model-kwargs", metavar="JSON", default="{}", help="JSON object of model arguments"
    )
    p.add_argument("--data", default="digits", help="digits, cifar10:DIR or cifar100:DIR")
    p.add_argument("--epochs", type=_int_at_least(1), default=10, help="epochs of training")
    p.add_argument("--lr", type=_positive_float, default=0.05, help="base learning rate")
    p.add_argument("--rho", type=_positive_float, default=0.05, help="SAM/GAM radius")
    p.add_argument("--base", default="sgd", choices=["sgd", "adamw"], help="SAM/GAM base")
    p.add_argument("--batch-size", type=_int_at_least(1), default=64, help="training batch size")
    p.add_argument(
        "--scheduler", default="cosine", choices=["cosine", "none"], help="learning-rate schedule"
    )
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "float64"], help="parameter dtype"
    )
    p.add_argument(
        "--measure-samples",
        type=_int_at_least(1),
        default=256,
        help="training examples of the flatness measures",
    )
    p.add_argument(
        "--measure-steps", type=_int_at_least(1), default=20, help="ascent steps of R0 and R1"
    )


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as err:
        raise UserError(f"--model-kwargs is not valid JSON ({err}): {args.model_kwargs!r}") from err
    if not isinstance(kwargs, dict):
        raise UserError("--model-kwargs must be a JSON object like '{\"hidden\": 32}'")
    return kwargs


def _data(args: argparse.Namespace) -> Dataset:
    from flatlens.cli._resolve import load_data

    try:
        return load_data(args.data)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from err


def _load(args: argparse.Namespace) -> tuple[nn.Module, Dataset]:
    """The model with the checkpoint's weights on ``--device``, and the data (inputs in the
    model's dtype)."""
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


# ---------------------------------------------------------------------- parser and main
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``flatlens`` command."""
    from flatlens import __version__

    fmt = _Help
    parser = _Parser(
        prog="flatlens",
        formatter_class=fmt,
        description="Hessian spectra, sharpness, first-order flatness and loss landscapes of "
        "PyTorch checkpoints. Errors a user can fix exit with code 2 and one line on stderr.",
    )
    parser.add_argument("--version", action="version", version=f"flatlens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "diagnose",
        formatter_class=fmt,
        help="measure a checkpoint; write report.json, figures and report.html",
        description="Performance, top-k Hessian eigenvalues, trace, spectral density, R0 (l2 "
        "and adaptive), R1 and the bound check over radii, a 1-D slice and a 2-D plane.",
    )
    _model_args(p)
    p.add_argument(
        "--rho",
        metavar="RHOS",
        type=_rhos,
        default="0.01,0.02,0.05",
        help="radii of R0, R1 and the bound check; the middle one is the summary's",
    )
    p.add_argument("--k", type=_int_at_least(1), default=5, help="top Hessian eigenvalues")
    p.add_argument(
        "--samples",
        metavar="N",
        type=_samples,
        default=512,
        help="training examples of the curvature measures and slices, or 'all'",
    )
    p.add_argument("--quick", action="store_true", help="small settings for a fast look")
    p.add_argument("--resume", action="store_true", help="reuse finished parts in --out")
    p.add_argument("--title", default="", help="title of report.html (default: from the file)")
    _common(p, "flatlens_diagnosis")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser(
        "train",
        formatter_class=fmt,
        help="train with sgd, adamw, sam or gam; write checkpoints and metrics",
        description="Train one network; --out gets model.pt (the final state dict), "
        "metrics.json (the per-epoch history) and checkpoints/ (for --resume).",
    )
    _train_args(p, "mlp, cnn, resnet18 or package.module:factory")
    p.add_argument(
        "--optimizer",
        default="sgd",
        choices=["sgd", "adamw", "sam", "gam", "gam-exact"],
        help="gam: GAM's accelerated mode; gam-exact: its exact Hessian-vector mode",
    )
    p.add_argument(
        "--measure-every",
        metavar="EPOCHS",
        type=_int_at_least(0),
        default=0,
        help="epochs between flatness measures (0: never)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    _common(p, "flatlens_train")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "compare",
        formatter_class=fmt,
        help="optimizers x seeds: flatness against the generalization gap",
        description="Train every optimizer with every seed, measure λ_max, tr(H), R0 and R1 "
        "of each final network and report Kendall's τ against the generalization gap.",
    )
    _train_args(p, "mlp, cnn, resnet18 or package.module:factory")
    p.add_argument(
        "--optimizers",
        metavar="NAMES",
        type=_names,
        default="sgd,sam,gam",
        help="comma-separated: sgd, adamw, sam, gam, gam-exact",
    )
    p.add_argument("--seeds", type=_seeds, default="0,1,2", help="comma-separated seeds")
    _common(p, "flatlens_compare")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "bound",
        formatter_class=fmt,
        help="check R0 <= R1 and R1/ρ² → λ_max over radii",
        description="R0, R1 and ρ²λ_max in the l2 ball for each radius; bound.json, bound.png.",
    )
    _model_args(p)
    p.add_argument(
        "--rho", metavar="RHOS", type=_rhos, default="0.005,0.01,0.02,0.05", help="radii"
    )
    p.add_argument("--steps", type=_int_at_least(1), default=20, help="projected-ascent steps")
    p.add_argument("--restarts", type=_int_at_least(0), default=1, help="random restarts")
    p.add_argument(
        "--samples", metavar="N", type=_samples, default=512, help="training examples, or 'all'"
    )
    _common(p, "flatlens_bound")
    p.set_defaults(func=cmd_bound)

    p = sub.add_parser(
        "landscape",
        formatter_class=fmt,
        help="1-D or 2-D loss slice around a checkpoint",
        description="L(θ + a·d1) or L(θ + a·d1 + b·d2) along filter-normalized random "
        "directions (seeds --seed and --seed + 1).",
    )
    _model_args(p)
    p.add_argument("--dim", type=int, choices=[1, 2], default=2, help="a line or a plane")
    p.add_argument("--steps", type=_int_at_least(2), default=41, help="grid points per axis")
    p.add_argument("--span", type=_positive_float, default=1.0, help="grid covers [-span, span]")
    p.add_argument(
        "--samples", metavar="N", type=_samples, default="all", help="training examples, or 'all'"
    )
    p.add_argument("--log", action="store_true", help="log-scale loss in the plots")
    p.add_argument("--resume", action="store_true", help="continue an interrupted grid")
    _common(p, "flatlens_landscape")
    p.set_defaults(func=cmd_landscape)

    p = sub.add_parser(
        "demo",
        formatter_class=fmt,
        help="SGD, SAM and GAM on digits, each diagnosed, one report (make demo)",
        description="3 seeds x SGD/SAM/GAM x 20 epochs on digits, each seed-0 network "
        "diagnosed, one comparison report (about a minute on one core).",
    )
    p.add_argument("--quick", action="store_true", help="2 seeds, 3 epochs, quick diagnoses")
    _common(p, "demo_out", threads=1)
    p.set_defaults(func=cmd_demo)
    return parser


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _device_ok(device: str) -> bool:
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError):
        return False
    return True


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _fail(command: str, err: BaseException, code: int, hint: str = "") -> int:
    if os.environ.get("FLATLENS_DEBUG"):
        raise err
    print(f"flatlens {command}: error: {_one_line(err)}{hint}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    debug = " (FLATLENS_DEBUG=1 shows the traceback)"
    try:
        if args.device != "cpu" and not _device_ok(args.device):
            raise UserError(f"--device {args.device} is not available on this machine")
        with cli_session(args), _threads(args.threads):
            func(args)
    except (UserError, CheckpointError) as err:
        return _fail(args.command, err, EXIT_USAGE)
    except (ValueError, TypeError) as err:
        return _fail(args.command, err, EXIT_USAGE, debug)
    except torch.OutOfMemoryError as err:
        return _fail(args.command, err, EXIT_FAILURE, "; try fewer --samples or a smaller model")
    except (FloatingPointError, OSError) as err:
        return _fail(args.command, err, EXIT_FAILURE, debug)
    except KeyboardInterrupt:
        hint = "; rerun with --resume to continue" if hasattr(args, "resume") else ""
        print(f"flatlens {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
