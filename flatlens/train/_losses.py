"""Loss functions by name: ``cross_entropy``, ``smooth_cross_entropy``, ``mse`` or
``package.module:callable``.

The command line, :class:`~flatlens.train.TrainConfig` and the measures name a loss with a
plain string, so that a run can be stored and repeated; :func:`build_loss` turns the name
into the callable ``loss(outputs, targets) -> scalar`` (mean over the batch).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from flatlens.zoo import import_object

__all__ = [
    "LOSSES",
    "MSELoss",
    "SmoothCrossEntropy",
    "build_loss",
    "check_loss_spec",
    "check_loss_value",
]


class MSELoss(nn.Module):
    """Mean squared error that also takes class labels.

    For integer targets (class indices) the target of example i is the one-hot vector of
    its class, so ``L = mean_{i,c} (f_c(x_i) - [y_i = c])^2``; floating targets are used as
    they are (reshaped to the outputs' shape when they hold as many numbers).
    """

    reduction = "mean"

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The mean of the squared differences over every output entry."""
        if not targets.is_floating_point():
            targets = nn.functional.one_hot(targets.long(), outputs.shape[-1])
            targets = targets.to(outputs.dtype)
        elif targets.shape != outputs.shape and targets.numel() == outputs.numel():
            targets = targets.reshape(outputs.shape)
        return nn.functional.mse_loss(outputs, targets.to(outputs.dtype))


class SmoothCrossEntropy(nn.Module):
    """The label-smoothed loss of the GAM and SAM reference code (``smooth_crossentropy``).

    With n classes and smoothing ε the target of example i puts 1 − ε on its class and
    ε / (n − 1) on each other class (torch's ``label_smoothing`` puts ε / n on every class,
    the true one included), and the loss is the Kullback-Leibler divergence to the softmax,
    ``L = mean_i sum_c t_ic (log t_ic − log p_ic)``: the cross-entropy minus the targets'
    entropy, so the gradient is the smoothed cross-entropy's and L = 0 at a perfect fit.
    xxgege/GAM ``gam/smooth_cross_entropy.py`` and davda54/sam
    ``example/model/smooth_cross_entropy.py`` (both lines 6-13) compute it this way.
    """

    reduction = "mean"

    def __init__(self, label_smoothing: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing!r}")
        self.smoothing = float(label_smoothing)

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The mean over the batch of KL(t_i || softmax(outputs_i))."""
        n = outputs.shape[1]
        target = torch.full_like(outputs, self.smoothing / max(n - 1, 1))
        target.scatter_(1, targets.long().unsqueeze(1), 1.0 - self.smoothing)
        log_prob = nn.functional.log_softmax(outputs, dim=1)
        return nn.functional.kl_div(log_prob, target, reduction="none").sum(-1).mean()

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing}"


LOSSES: dict[str, Callable[[], Callable[..., Tensor]]] = {
    "cross_entropy": nn.CrossEntropyLoss,
    "smooth_cross_entropy": SmoothCrossEntropy,
    "mse": MSELoss,
}
SMOOTHED = ("cross_entropy", "smooth_cross_entropy")
"""The losses ``label_smoothing`` applies to."""


def check_loss_spec(spec: object) -> str:
    """Check the form of a loss spec without importing anything; returns ``spec``.

    Raises:
        TypeError: ``spec`` is not a string.
        ValueError: neither a known name nor ``package.module:callable``.
    """
    if not isinstance(spec, str):
        raise TypeError(f"loss must be a string, not {type(spec).__name__}")
    module, _, attr = spec.partition(":")
    if spec not in LOSSES and not (module and attr):
        raise ValueError(
            f"unknown loss {spec!r}; use one of {sorted(LOSSES)} or package.module:callable"
        )
    return spec


def build_loss(spec: str, label_smoothing: float = 0.0) -> Callable[..., Tensor]:
    """The loss a spec names.

    ``cross_entropy`` is :class:`torch.nn.CrossEntropyLoss` (with ``label_smoothing`` ε in
    torch's form: ε / n on every class); ``smooth_cross_entropy`` is
    :class:`SmoothCrossEntropy` (the GAM and SAM code's form: ε / (n − 1) on the wrong
    classes); ``mse`` is :class:`MSELoss` (one-hot targets for class labels);
    ``package.module:callable`` is imported: a ``torch.nn.Module`` subclass is instantiated
    without arguments, any other callable is used as ``loss(outputs, targets)`` and must
    return the mean loss over the batch.

    Raises:
        ValueError: an unknown name, a module that cannot be imported, something that is
            not callable, a loss class that cannot be built without arguments, or
            ``label_smoothing`` for a loss that does not smooth labels.
    """
    check_loss_spec(spec)
    if label_smoothing:
        if spec not in SMOOTHED:
            raise ValueError(
                f"label_smoothing applies to {' and '.join(SMOOTHED)}, not to loss {spec!r}"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing!r}")
        if spec == "cross_entropy":
            return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        return SmoothCrossEntropy(label_smoothing)
    if spec == "smooth_cross_entropy":
        return SmoothCrossEntropy(0.0)
    if spec in LOSSES:
        return LOSSES[spec]()
    found: Any = import_object(spec, "loss")
    if inspect.isclass(found) and issubclass(found, nn.Module):
        try:
            return found()
        except Exception as err:  # the user's class failed
            raise ValueError(
                f"loss {spec!r} cannot be built without arguments ({type(err).__name__}: "
                f"{' '.join(str(err).split())})"
            ) from err
    if not callable(found):
        raise ValueError(f"loss {spec!r} is a {type(found).__name__}, not a callable")
    return found


def check_loss_value(loss: Any, spec: str) -> None:
    """Refuse a loss value that is not a scalar tensor (a loss must be reduced)."""
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"loss {spec!r} returned {shape}, not a scalar tensor; return the mean over the batch"
        )
