"""SAM and GAM stepped by Lightning's automatic optimization: recognizing its closure, and
refusing what that closure cannot give them (see :mod:`flatlens.integrations.lightning`).
Lightning is never imported here."""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["_check_lightning"]


def _lightning_closure(closure: Any) -> tuple[Any, Any] | None:
    """``(LightningModule, inner closure)`` when ``closure`` is the one Lightning's automatic
    optimization hands ``optimizer.step`` (its precision plugin's ``partial(_wrap_closure,
    module, optimizer, closure)``); None for any other closure. Lightning is not imported."""
    if not isinstance(closure, functools.partial) or len(closure.args) < 3:
        return None
    module = closure.args[0]
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(module).__mro__}
    if not names & {
        "lightning.pytorch.core.module.LightningModule",
        "pytorch_lightning.core.module.LightningModule",
    }:
        return None
    return module, closure.args[2]


def _check_lightning(name: str, closure: Any, create_graph: bool) -> Any:
    """Refuse, with what to do, what Lightning's closure cannot give SAM/GAM: the whole window
    of micro-batches in every pass, and ``create_graph``. Returns the closure to call: for
    the closure of :class:`flatlens.integrations.lightning.SharpnessAwareMixin`, one that
    takes ``create_graph`` past Lightning's wrapper (which passes no arguments)."""
    found = _lightning_closure(closure)
    if found is None:
        return closure
    module, inner = found
    if getattr(inner, "replays_window", False):

        def adapted(create_graph: bool = False) -> Any:
            inner.create_graph = create_graph  # read by the mixin's closure
            try:
                return closure()
            finally:
                inner.create_graph = False

        return adapted
    trainer = getattr(module, "_trainer", None)
    k = getattr(trainer, "accumulate_grad_batches", 1)
    mixin = (
        "mix flatlens.integrations.lightning.SharpnessAwareMixin into the LightningModule "
        "(class Model(SharpnessAwareMixin, LightningModule))"
    )
    if isinstance(k, int) and k > 1:
        raise RuntimeError(
            f"{name} under Lightning with accumulate_grad_batches={k}: Lightning's closure "
            f"reruns only the last of the {k} micro-batches, so every pass after the first "
            f"would see 1/{k} of the window; {mixin}, which replays the window in every pass, "
            "or set accumulate_grad_batches=1"
        )
    if create_graph:
        raise TypeError(
            f"{name} in exact mode needs backward(create_graph=True), which Lightning's "
            f"closure cannot pass; {mixin}, or use mode='accelerated'"
        )
    return closure
