"""The checks that keep SAM and GAM from stepping silently wrong: the closure and the graph
exact mode needs, finiteness of the points, directions and updates of a step, with their
messages."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["_NonFinitePoint", "_all_finite", "check_closure", "check_graph", "non_finite_message"]

_CLOSURE_EXAMPLE = """
    def closure():
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        return loss

    loss = optimizer.step(closure)"""


def check_closure(
    name: str, closure: Callable[..., Any] | None, *, create_graph: bool = False
) -> Callable[..., Any]:
    """``closure`` when it can drive a step of optimizer ``name``; with ``create_graph``
    (exact mode) it must take a ``create_graph`` argument.

    Raises:
        ValueError: No closure.
        TypeError: Not callable, or (``create_graph``) no ``create_graph`` argument.
    """
    if closure is None:
        raise ValueError(
            f"{name}.step needs a closure that zeroes the gradients, runs the forward and "
            f"backward pass and returns the loss; it is called several times per step:"
            f"\n{_CLOSURE_EXAMPLE}"
        )
    if not callable(closure):
        raise TypeError(f"{name}.step: closure must be callable, not {type(closure)}")
    if create_graph:
        try:
            params = inspect.signature(closure).parameters.values()
        except (TypeError, ValueError):  # builtins without a signature
            params = []
        if not any(
            p.name == "create_graph" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params
        ):
            raise TypeError(
                f"{name} in exact mode needs Hessian-vector products: the closure must "
                "accept create_graph and pass it to backward, e.g.\n\n"
                "    def closure(create_graph=False):\n"
                "        optimizer.zero_grad()\n"
                "        loss = loss_fn(model(inputs), targets)\n"
                "        loss.backward(create_graph=create_graph)\n"
                "        return loss"
            )
    return closure


class _NonFinitePoint(Exception):
    """A perturbed point of a pass is not finite (turned into a NonFiniteLossError by
    :meth:`~flatlens.optim.PerturbationOptimizer.step`, which knows the loss at theta)."""


def _all_finite(tensors: Sequence[Tensor | None]) -> bool:
    """Whether every entry of every tensor is finite (one device synchronization)."""
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    return bool(torch.stack(flags).all()) if flags else True


def _finite_value(value: Any) -> bool:
    """Whether a loss (a number or a tensor) is finite; True for anything else."""
    if isinstance(value, Tensor):
        return bool(torch.isfinite(value.detach()).all())
    if isinstance(value, float | int):
        return math.isfinite(value)
    return True


def _radii(hyperparameters: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{k} = {hyperparameters[k]:g}"
        for k in ("rho", "perturb_rho")
        if isinstance(hyperparameters.get(k), float)
    )


def non_finite_message(
    name: str,
    what: str,
    loss: Any,
    hyperparameters: Mapping[str, Any],
    lrs: Sequence[Any],
) -> str:
    """The message of a step that would leave non-finite parameters.

    Args:
        name: ``"SAM.step"``, ``"SAM.first_step"``, ...
        what: The ``"gradient"`` at theta, a ``"perturbation"`` (a perturbed point), the
            final ``"direction"`` or the base optimizer's ``"update"``.
        loss: The loss at theta when known: a non-finite one is named as the cause.
        hyperparameters: The optimizer's settings (its radii are shown).
        lrs: The learning rates of the parameter groups.
    """
    kept = "the parameters are left as they were before the step"
    advice = "lower the learning rate or the radius if the run diverged, or check the data"
    if what == "gradient":
        return f"{name}: the gradient at the current parameters is not finite; {kept} ({advice})"
    if loss is not None and not _finite_value(loss):
        shown = float(loss.detach().float().flatten()[0]) if isinstance(loss, Tensor) else loss
        return f"{name}: the loss at the current parameters is {shown}; {kept} ({advice})"
    radii = _radii(hyperparameters)
    if what == "perturbation":
        return (
            f"{name}: a perturbed point theta + e is not finite ({radii}: a radius too large "
            f"for the parameters' dtype, or not finite); {kept}"
        )
    if what == "direction":
        return (
            f"{name}: the update direction is not finite (a gradient at a perturbed point "
            f"overflowed; {radii}); {kept}. Use a smaller radius"
        )
    shown = ", ".join(f"{lr:g}" if isinstance(lr, float) else str(lr) for lr in dict.fromkeys(lrs))
    return (
        f"{name}: the base optimizer's update made the parameters non-finite (learning rate "
        f"{shown or '?'}); {kept}. Lower the learning rate"
    )


def check_graph(name: str, grads: Sequence[Tensor | None]) -> None:
    """Raise unless some gradient of a pass run with ``create_graph`` carries a graph.

    Exact mode differentiates the gradients again (Hessian-vector products); a closure that
    accepts ``create_graph`` but does not pass it to ``backward`` leaves plain gradients,
    and every product would silently be zero.

    Raises:
        RuntimeError: No gradient requires grad.
    """
    if any(g is not None and g.requires_grad for g in grads):
        return
    raise RuntimeError(
        f"{name} in exact mode takes Hessian-vector products through the gradients, but the "
        "closure's backward built no graph (none of the gradients requires grad): pass "
        "create_graph on to backward, loss.backward(create_graph=create_graph); the "
        "parameters are unchanged. (A loss exactly linear in every parameter has no "
        "curvature to follow: use the accelerated mode.)"
    )
