"""The argument parser of the ``flatlens`` command: subcommands, options and their types.

Option values are checked while parsing, so a bad value is a one-line usage error (exit
code 2) before any data is loaded.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import NoReturn

from flatlens.cli import _commands as commands
from flatlens.cli._errors import EXIT_USAGE
from flatlens.core._checks import check_positive, check_positive_int, check_rho

__all__ = ["build_parser"]

_DATA_HELP = "digits, cifar10:DIR, cifar100:DIR, imagefolder:DIR or package.module:factory"


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
    """An option type: an integer >= ``least``."""

    def parse(text: str) -> int:
        try:
            return check_positive_int("value", int(text), least)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {least}, got {text!r}"
            ) from None

    return parse


def _positive_float(text: str) -> float:
    """An option type: a finite number > 0."""
    try:
        return check_positive("value", float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}") from None


def _rhos(text: str) -> tuple[float, ...]:
    """An option type: radii > 0 separated by commas."""
    try:
        return tuple(check_rho(float(v)) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"takes finite radii > 0 separated by commas, like 0.01,0.05; got {text!r}"
        ) from None


def _samples(text: str) -> int | None:
    """An option type: a number of examples >= 1, or ``all`` (None)."""
    if text == "all":
        return None
    return _int_at_least(1)(text)


def _names(text: str) -> list[str]:
    """An option type: names separated by commas."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated names, like sgd,sam,gam")
    return names


def _seeds(text: str) -> list[int]:
    """An option type: distinct seeds >= 0 separated by commas."""
    try:
        seeds = [check_positive_int("seed", int(v), 0) for v in text.split(",") if v.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(
            f"expected distinct integers >= 0 separated by commas, like 0,1,2; got {text!r}"
        )
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
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the outputs of an earlier run in --out (refused without it)",
    )
    g.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars, notes or summary text (errors and refusals still print)",
    )
    g.add_argument(
        "--json", action="store_true", help="print the result as JSON on stdout, nothing else"
    )


def _bytes(text: str) -> float:
    """A size in bytes: a number with an optional K, M, G or T suffix (powers of 1024), e.g.
    3G, 3GiB, 500M or 2e9; at least one byte."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*(?:([KMGT])(?:I?B)?|B)?\s*", text.upper())
    try:
        value = float(match.group(1)) * units[match.group(2) or ""] if match else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1):
        raise argparse.ArgumentTypeError(
            f"expected a size such as 3G, 500M or 2e9 (bytes), got {text!r}"
        )
    return value


def _measure_args(p: argparse.ArgumentParser, batch_size: int = 512) -> None:
    p.add_argument(
        "--batch-size",
        type=_int_at_least(1),
        default=batch_size,
        help="examples per data pass of the measures",
    )
    p.add_argument(
        "--memory-budget",
        metavar="SIZE",
        type=_bytes,
        default=None,
        help="memory the cached first-order graph may take, e.g. 3G (default: half the free "
        "memory); over it, HVPs stream batch by batch and the peak is one batch's graph",
    )


def _curvature_args(p: argparse.ArgumentParser) -> None:
    """How Hessian-vector products are made and where the Lanczos bases live."""
    p.add_argument(
        "--hvp-method",
        choices=["auto", "double_backward", "forward_over_reverse", "finite_difference"],
        default="auto",
        help="Hessian-vector products: auto (double backward, falling back to gradient "
        "differences when autograd cannot take or misses a second derivative), or one method",
    )
    p.add_argument(
        "--basis-device",
        metavar="DEVICE",
        default=None,
        help="keep the Lanczos bases there, e.g. cpu for a model on a GPU (default: the "
        "model's device)",
    )
    p.add_argument(
        "--basis-dtype",
        choices=["float64", "float32", "bfloat16", "float16"],
        default=None,
        help="store the Lanczos bases in this dtype, e.g. bfloat16 (default: the model's)",
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
    p.add_argument("--data", default="digits", help=_DATA_HELP)
    _loss_arg(p)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float64"],
        help="precision of the measures; auto: the checkpoint's when float32 or float64, "
        "else the model's",
    )


def _loss_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--loss",
        default="cross_entropy",
        help="cross_entropy, mse (one-hot targets for class labels) or package.module:callable",
    )


def _train_args(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("--model", default="mlp", help=model_help)
    p.add_argument(
        "--model-kwargs", metavar="JSON", default="{}", help="JSON object of model arguments"
    )
    p.add_argument("--data", default="digits", help=_DATA_HELP)
    _loss_arg(p)
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
        "and adaptive), R1 and the bound check over radii, a 1-D slice and a 2-D plane; with "
        "--blocks, the spectrum of each diagonal Hessian block.",
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
    p.add_argument(
        "--blocks",
        choices=["layers", "groups", "params"],
        default=None,
        help="also the top eigenvalue and density of each diagonal Hessian block: one per "
        "module (layers: CNNs, MLPs), per transformer group (groups: embedding, attention, "
        "MLP, norm, head) or per tensor (params); off by default",
    )
    _measure_args(p)
    _curvature_args(p)
    p.add_argument("--quick", action="store_true", help="small settings for a fast look")
    p.add_argument("--resume", action="store_true", help="reuse finished parts in --out")
    p.add_argument("--title", default="", help="title of report.html (default: from the file)")
    _common(p, "flatlens_diagnosis")
    p.set_defaults(func=commands.cmd_diagnose)

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
    p.set_defaults(func=commands.cmd_train)

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
    p.set_defaults(func=commands.cmd_compare)

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
    _measure_args(p)
    _curvature_args(p)
    _common(p, "flatlens_bound")
    p.set_defaults(func=commands.cmd_bound)

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
    _measure_args(p)
    p.add_argument("--log", action="store_true", help="log-scale loss in the plots")
    p.add_argument("--resume", action="store_true", help="continue an interrupted grid")
    _common(p, "flatlens_landscape")
    p.set_defaults(func=commands.cmd_landscape)

    p = sub.add_parser(
        "demo",
        formatter_class=fmt,
        help="SGD, SAM and GAM on digits, each diagnosed, one report (make demo)",
        description="3 seeds x SGD/SAM/GAM x 20 epochs on digits, each seed-0 network "
        "diagnosed, one comparison report.",
    )
    p.add_argument("--quick", action="store_true", help="2 seeds, 3 epochs, quick diagnoses")
    _common(p, "demo_out", threads=1)
    p.set_defaults(func=commands.cmd_demo)
    return parser
