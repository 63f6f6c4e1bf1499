"""The argument parser of the ``flatlens`` command: subcommands, options and their types.

Option values are checked while parsing, so a bad value is a one-line usage error (exit
code 2) before any data is loaded.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from flatlens.cli import _commands as commands
from flatlens.cli._argtypes import (
    _bytes,
    _Deprecated,
    _grid_points,
    _int_at_least,
    _names,
    _positive_float,
    _rhos,
    _samples,
    _seeds,
)
from flatlens.cli._errors import EXIT_USAGE

__all__ = ["build_parser"]

_DATA_HELP = (
    "digits, cifar10:DIR, cifar100:DIR, imagefolder:DIR, hf:DIR (tokenized, from "
    "datasets' save_to_disk; for diagnose, bound, landscape) or package.module:factory"
)
_MODEL_HELP = (
    "mlp, cnn, resnet18, wrn16_8, wrn28_10, package.module:factory, timm/NAME or torchvision/NAME"
)


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
def _measure_rho_arg(p: argparse.ArgumentParser, default: str, help_text: str) -> None:
    """``--measure-rho RHOS`` (radii of R0, R1 and the bound), and its old name ``--rho``."""
    p.add_argument("--measure-rho", metavar="RHOS", type=_rhos, default=default, help=help_text)
    p.add_argument(
        "--rho",
        dest="measure_rho",
        metavar="RHOS",
        type=_rhos,
        action=_Deprecated,
        new="--measure-rho",
        help=argparse.SUPPRESS,
    )


def _ascent_args(p: argparse.ArgumentParser, steps: int | None, restarts: int | None) -> None:
    """``--steps`` and ``--restarts`` of the projected ascent behind R0 and R1."""
    p.add_argument(
        "--steps",
        type=_int_at_least(1),
        default=steps,
        help="projected-ascent steps of R0 and R1 per start"
        + ("" if steps is not None else " (default: 10; --quick: 4)"),
    )
    p.add_argument(
        "--restarts",
        type=_int_at_least(0),
        default=restarts,
        help="random starts of R0 and R1 besides the gradient and eigenvector ones"
        + ("" if restarts is not None else " (default: 1)"),
    )


# ---------------------------------------------------------------------- shared options
def _common(p: argparse.ArgumentParser, out: str, threads: int = 0) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--out", metavar="DIR", default=out, help="output folder")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    g.add_argument(
        "--seed",
        type=_int_at_least(0, "a seed"),
        default=0,
        help="seed of every random choice (0 to 2**63 - 1)",
    )
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
    from flatlens.cli._models import DEFAULT_LOSS

    p.add_argument(
        "--model",
        required=True,
        help="mlp, cnn, resnet18, wrn16_8, wrn28_10, package.module:factory, timm/NAME or "
        "torchvision/NAME (an "
        "architecture by name, class count from the checkpoint), or hf:DIR (a Hugging Face "
        "save_pretrained folder: architecture from config.json, weights beside it, the loss "
        "its task implies unless --loss is given)",
    )
    p.add_argument(
        "--model-kwargs", metavar="JSON", default="{}", help="JSON object of factory arguments"
    )
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        default=None,
        help="the weights (required except for hf:DIR): .safetensors (read without pickle), "
        "a torch.save file (.pt: a state dict, or {'model': state_dict, ...}) or a Lightning "
        ".ckpt, all read with weights_only=True",
    )
    p.add_argument(
        "--state-prefix",
        metavar="PREFIX",
        default=None,
        help="prefix of the model's entries in the checkpoint, e.g. net. for a Lightning "
        "module's attribute (default: found when exactly one fits)",
    )
    p.add_argument("--data", default="digits", help=_DATA_HELP)
    _loss_arg(p)
    p.set_defaults(loss=DEFAULT_LOSS)
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
        help="cross_entropy, smooth_cross_entropy (the GAM/SAM code's smoothed loss), mse "
        "(one-hot targets for class labels) or package.module:callable",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``flatlens`` command."""
    from flatlens import __version__
    from flatlens.cli._train_args import record_given, train_args, train_only_args

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
    _measure_rho_arg(
        p,
        "0.01,0.02,0.05",
        "radii of R0, R1 and the bound check; the middle one is the summary's",
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
    g = p.add_argument_group(
        "measure settings (smaller than the library's defaults, so a report takes minutes)"
    )
    _ascent_args(g, None, None)
    g.add_argument(
        "--trace-probes",
        type=_int_at_least(3),
        default=None,
        help="random probes (HVPs) of the Hutch++ trace (default: 30; --quick: 9; "
        "hessian_trace's own default is 99)",
    )
    g.add_argument(
        "--density-runs",
        type=_int_at_least(1),
        default=None,
        help="Lanczos runs of the spectral density (default: 2; --quick: 1; "
        "hessian_density's own default is 4)",
    )
    g.add_argument(
        "--lanczos-steps",
        type=_int_at_least(2),
        default=None,
        help="Lanczos steps per density run (default: 40; --quick: 20; library: 64)",
    )
    g.add_argument(
        "--line-points",
        type=_grid_points,
        default=None,
        help="grid points of the 1-D slice, 0 to skip it (default: 41; --quick: 11)",
    )
    g.add_argument(
        "--plane-points",
        type=_grid_points,
        default=None,
        help="grid points per axis of the 2-D plane, 0 to skip it (default: 21; --quick: 7)",
    )
    g.add_argument(
        "--span",
        type=_positive_float,
        default=None,
        help="the slices cover [-span, span] along each direction (default: 1.0)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small settings for a fast look (k <= 3, 256 examples, and the --quick values "
        "above for the settings not given)",
    )
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
    train_args(p, _MODEL_HELP)
    p.add_argument(
        "--optimizer",
        default="sgd",
        choices=["sgd", "adamw", "sam", "gam", "gam-exact"],
        help="gam: GAM's accelerated mode; gam-exact: its exact Hessian-vector mode",
    )
    train_only_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    _common(p, "flatlens_train")
    record_given(p)
    p.set_defaults(func=commands.cmd_train)

    p = sub.add_parser(
        "compare",
        formatter_class=fmt,
        help="optimizers x seeds: flatness against the generalization gap",
        description="Train every optimizer with every seed, measure λ_max, tr(H), R0 and R1 "
        "of each final network and report Kendall's τ against the generalization gap.",
    )
    train_args(p, _MODEL_HELP)
    p.add_argument(
        "--optimizers",
        metavar="NAMES",
        type=_names,
        default="sgd,sam,gam",
        help="comma-separated: sgd, adamw, sam, gam, gam-exact",
    )
    p.add_argument("--seeds", type=_seeds, default="0,1,2", help="comma-separated seeds")
    _common(p, "flatlens_compare")
    record_given(p)
    p.set_defaults(func=commands.cmd_compare)

    p = sub.add_parser(
        "bound",
        formatter_class=fmt,
        help="check R0 <= R1 and R1/ρ² → λ_max over radii",
        description="R0, R1 and ρ²λ_max in the l2 ball for each radius; bound.json, bound.png.",
    )
    _model_args(p)
    _measure_rho_arg(p, "0.005,0.01,0.02,0.05", "radii of R0, R1 and ρ²λ_max")
    _ascent_args(p, 20, 1)
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
    p.add_argument("--num-points", type=_int_at_least(2), default=51, help="grid points per axis")
    p.add_argument(
        "--steps",
        dest="num_points",
        type=_int_at_least(2),
        action=_Deprecated,
        new="--num-points",
        help=argparse.SUPPRESS,
    )
    p.add_argument("--span", type=_positive_float, default=1.0, help="grid covers [-span, span]")
    p.add_argument(
        "--samples", metavar="N", type=_samples, default="all", help="training examples, or 'all'"
    )
    _measure_args(p)
    p.add_argument("--log", action="store_true", help="log-scale loss in the plots")
    p.add_argument(
        "--vtk",
        action="store_true",
        help="also write the loss surface as line.vtp / plane.vtp for ParaView (log(z + 0.1) "
        "heights with --log)",
    )
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
