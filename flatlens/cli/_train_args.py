"""The options of ``flatlens train`` and ``flatlens compare``: the model, data, loss,
optimizer and schedule, augmentation, precision and the measures taken while training, and
the record of which options were given (a recipe's settings yield to them)."""

from __future__ import annotations

import argparse

from flatlens.cli._argtypes import (
    _Deprecated,
    _fraction,
    _Given,
    _int_at_least,
    _nonnegative_float,
    _positive_float,
)
from flatlens.cli._parser import (
    _DATA_HELP,
    _loss_arg,
)
from flatlens.core._checks import check_finite

__all__ = ["record_given", "train_args", "train_only_args"]


def _fractions(text: str) -> tuple[float, ...]:
    """An option type: numbers in (0, 1) separated by commas (fractions of the epochs)."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(not 0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected fractions of the epochs in (0, 1) separated by commas, like 0.3,0.6,0.8; "
            f"got {text!r}"
        )
    return values


def _numbers(text: str) -> tuple[float, ...]:
    """An option type: finite numbers separated by commas (one per channel)."""
    try:
        values = tuple(check_finite("value", float(v)) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, one per channel, like 0.49,0.48,0.45; "
            f"got {text!r}"
        )
    return values


def _smoothing(text: str) -> float:
    """An option type: a number in [0, 1)."""
    value = _fraction(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _budget(text: str) -> float | None:
    """An option type: a number > 0, or ``none``."""
    return None if text.lower() == "none" else _positive_float(text)


_RECORDING: dict[type, type] = {}


def _recording(cls: type) -> type:
    """A subclass of the action class ``cls`` that also notes its destination in
    ``namespace._given`` (which flags were given, so a recipe's settings yield to them)."""
    if cls not in _RECORDING:

        def __call__(self, parser, namespace, values, option_string=None) -> None:
            cls.__call__(self, parser, namespace, values, option_string)
            namespace._given = [*getattr(namespace, "_given", []), self.dest]

        _RECORDING[cls] = type(f"Given{cls.__name__}", (cls,), {"__call__": __call__})
    return _RECORDING[cls]


def record_given(p: argparse.ArgumentParser) -> None:
    """Let every option of ``p`` note when it is given (see :func:`_recording`)."""
    for action in p._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            action.__class__ = _recording(type(action))


def train_args(p: argparse.ArgumentParser, model_help: str) -> None:
    from flatlens._recipes import RECIPES

    p.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=None,
        help="start from a published setup (docs/recipes.md: every setting and its source); "
        "options given explicitly override it",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the settings that would run (recipe and options resolved) and exit",
    )
    p.add_argument("--model", default="mlp", help=model_help)
    p.add_argument(
        "--model-kwargs", metavar="JSON", default="{}", help="JSON object of model arguments"
    )
    p.add_argument("--data", default="digits", help=_DATA_HELP)
    _loss_arg(p)
    p.add_argument(
        "--label-smoothing",
        type=_smoothing,
        default=0.0,
        help="ε of the loss: torch's form (ε/n on every class) for cross_entropy, the GAM/SAM "
        "code's (ε/(n-1) on the wrong classes) for smooth_cross_entropy",
    )
    p.add_argument("--epochs", type=_int_at_least(1), default=10, help="epochs of training")
    p.add_argument("--lr", type=_positive_float, default=0.05, help="base learning rate")
    p.add_argument("--base", default="sgd", choices=["sgd", "adamw"], help="SAM/GAM base")
    p.add_argument(
        "--momentum", type=_nonnegative_float, default=0.9, help="SGD's momentum coefficient"
    )
    p.add_argument(
        "--weight-decay",
        type=_nonnegative_float,
        default=5e-4,
        help="the base optimizer's weight decay",
    )
    p.add_argument("--nesterov", action="store_true", help="Nesterov momentum (SGD)")
    g = p.add_argument_group("SAM and GAM (flatlens.optim; docs/optimizers.md)")
    g.add_argument(
        "--sam-rho", type=_positive_float, default=0.05, action=_Given, help="SAM's radius ρ"
    )
    g.add_argument(
        "--sam-adaptive",
        action="store_true",
        help="ASAM: SAM's ascent scaled elementwise by |θ| (ρ about 10x larger, e.g. 2.0)",
    )
    g.add_argument(
        "--gam-rho",
        type=_positive_float,
        default=0.2,
        action=_Given,
        help="GAM's gradient-norm radius ρ",
    )
    g.add_argument(
        "--gam-perturb-rho",
        type=_nonnegative_float,
        default=None,
        help="GAM's SAM radius ρ' (default: 0.03 accelerated, 0 exact)",
    )
    g.add_argument(
        "--gam-plus-weight",
        type=_fraction,
        default=None,
        help="GAM's α, weight of g1 against g3 in h+ (accelerated; default 0.1)",
    )
    g.add_argument(
        "--gam-minus-weight",
        type=_fraction,
        default=None,
        help="GAM's β, weight of g0 against g2 in h- (accelerated; default 0.1)",
    )
    g.add_argument(
        "--gam-orthogonal-weight",
        type=_nonnegative_float,
        default=None,
        help="GAM's γ, share of h-'s part orthogonal to h+ removed (accelerated; default 0.05)",
    )
    g.add_argument(
        "--gam-flatness-weight",
        type=_nonnegative_float,
        default=None,
        help="GAM's weight of R1 in L + α R1 (gam-exact; default 0.1)",
    )
    g.add_argument(
        "--gam-adaptive", action="store_true", help="GAM's ascents scaled by |θ| (accelerated)"
    )
    g.add_argument(
        "--gam-official",
        action="store_true",
        help="GAM as the authors' code computes it, h- = g0 + |1-β| g2 (GAM.from_official)",
    )
    p.add_argument(
        "--rho",
        dest="rho_all",
        type=_positive_float,
        action=_Deprecated,
        new="--sam-rho, --gam-rho and --measure-rho (it set all three)",
        help=argparse.SUPPRESS,
    )
    p.add_argument("--batch-size", type=_int_at_least(1), default=64, help="training batch size")
    s = p.add_argument_group("learning-rate schedule")
    s.add_argument(
        "--scheduler",
        default="cosine",
        choices=["cosine", "step", "none"],
        help="cosine annealing to 0, a step decay at --milestones, or a constant rate",
    )
    s.add_argument(
        "--milestones",
        type=_fractions,
        default="0.5,0.75",
        help="fractions of the epochs where the step schedule multiplies the rate by --lr-decay",
    )
    s.add_argument(
        "--lr-decay",
        type=_positive_float,
        default=0.1,
        help="factor of the step schedule at each milestone, in (0, 1]",
    )
    s.add_argument(
        "--lr-update",
        default="epoch",
        choices=["epoch", "step"],
        help="epoch: the rate changes at epoch boundaries; step: it is set after every step "
        "from the epoch of that step (davda54/sam's loop)",
    )
    s.add_argument(
        "--warmup-epochs",
        type=_int_at_least(0),
        default=0,
        help="epochs of linear warm-up before the schedule",
    )
    d = p.add_argument_group("data, augmentation and precision")
    d.add_argument(
        "--augment",
        default="none",
        choices=["none", "crop-flip", "crop-flip-cutout"],
        help="image augmentation, fresh each epoch: crop with padding 4 and horizontal flip, "
        "and Cutout 16 (p=0.5, after normalization); never on evaluation and measures",
    )
    d.add_argument(
        "--augment-on",
        default="device",
        choices=["device", "workers"],
        help="device: per batch on the training device (tensors); workers: per example in "
        "the DataLoader workers (torchvision.transforms.v2)",
    )
    d.add_argument(
        "--num-workers",
        type=_int_at_least(0),
        default=0,
        help="DataLoader workers reading the data (cifar10:DIR, imagefolder:DIR, factories)",
    )
    d.add_argument(
        "--data-mean",
        metavar="MEANS",
        type=_numbers,
        default=None,
        help="per-channel normalization means, e.g. 0.4914,0.4822,0.4465 (default: the "
        "training set's own statistics); with --data-std",
    )
    d.add_argument(
        "--data-std",
        metavar="STDS",
        type=_numbers,
        default=None,
        help="per-channel normalization standard deviations; with --data-mean",
    )
    d.add_argument(
        "--amp",
        default="none",
        choices=["none", "bf16", "fp16"],
        help="mixed precision of the training passes (fp16 with a GradScaler); measures run "
        "in the parameters' dtype",
    )
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "float64"], help="parameter dtype"
    )
    m = p.add_argument_group("flatness measures during training")
    m.add_argument(
        "--measure-samples",
        type=_int_at_least(1),
        default=256,
        help="training examples of the flatness measures",
    )
    m.add_argument(
        "--measure-rho",
        type=_positive_float,
        default=0.05,
        action=_Given,
        help="radius ρ of the R0 and R1 measures (independent of the optimizers' radii)",
    )
    m.add_argument(
        "--measure-steps", type=_int_at_least(1), default=20, help="ascent steps of R0 and R1"
    )
    m.add_argument(
        "--measure-budget",
        type=_budget,
        default=40.0,
        help="cap on each of R0 and R1 in HVP-equivalents, or none",
    )
    m.add_argument(
        "--trace-probes",
        type=_int_at_least(3),
        default=30,
        help="random probes (HVPs) of the Hutch++ trace measure",
    )


def train_only_args(p: argparse.ArgumentParser) -> None:
    """The options of ``train`` that ``compare`` does not take."""
    title = "flatness measures during training"
    g = next(g for g in p._action_groups if g.title == title)
    g.add_argument(
        "--measure-every",
        metavar="EPOCHS",
        type=_int_at_least(0),
        default=0,
        help="epochs between flatness measures (0: never)",
    )
    g.add_argument(
        "--measure-every-steps",
        metavar="STEPS",
        type=_int_at_least(0),
        default=0,
        help="optimizer steps between flatness measures (0: never)",
    )
    g.add_argument(
        "--critical-every-steps",
        metavar="STEPS",
        type=_int_at_least(0),
        default=0,
        help="optimizer steps between critical-sharpness measures λ_c = 2/η_c along the "
        "update (forward passes only; 0: never)",
    )
    p.add_argument(
        "--log-every",
        metavar="STEPS",
        type=_int_at_least(0),
        default=1,
        help="steps between the JSON lines of log.jsonl (0: epochs and measures only)",
    )
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard event files to --out/tensorboard (pip install "
        "'flatlens[tensorboard]')",
    )
