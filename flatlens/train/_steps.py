"""One optimizer step of the trainer, in float32 or mixed precision, and the update it took.

:class:`Stepper` runs ``optimizer.step(closure)`` for any optimizer: plain ones, and SAM and
GAM, which call the closure several times. With ``amp="bf16"`` or ``"fp16"`` the forward
pass and the loss run under ``torch.autocast``; float16 scales the loss with a
``torch.amp.GradScaler`` (handed to SAM and GAM as their ``grad_scaler``, which unscale
every pass and skip a step that overflows; for a plain optimizer ``scaler.step``). The
parameters, their gradients and the optimizer state stay in the parameters' dtype.

:class:`UpdateProbe` records the parameters before a step and returns the update direction
after it, Δ = (θ_before − θ_after) / lr per parameter group: the step the optimizer actually
took with the learning rate divided out (SGD: the gradient with weight decay; with momentum
the momentum buffer; Adam: the preconditioned moment), which the critical sharpness needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatlens.optim import PerturbationOptimizer

__all__ = ["AMP", "Stepper", "UpdateProbe"]

AMP = ("none", "bf16", "fp16")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Stepper:
    """``step(x, y, weight) -> loss``: one optimizer step on a batch (see the module docs).

    Args:
        optimizer: Any optimizer, SAM or GAM.
        model: The module the passes run through (the DDP wrapper when distributed).
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"``.
        device: The parameters' device (autocast's device type).
    """

    def __init__(
        self, optimizer: Optimizer, model: nn.Module, loss_fn: Callable, amp: str, device
    ) -> None:
        if amp not in AMP:
            raise ValueError(f"amp must be one of {list(AMP)}, not {amp!r}")
        self.optimizer, self.model, self.loss_fn, self.amp = optimizer, model, loss_fn, amp
        self.device_type = torch.device(device).type
        self.scaler: torch.amp.GradScaler | None = None
        if amp == "fp16":
            self.scaler = torch.amp.GradScaler(self.device_type)
            if isinstance(optimizer, PerturbationOptimizer):
                optimizer.grad_scaler = self.scaler

    def _autocast(self) -> Any:
        if self.amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=_AMP_DTYPES[self.amp])

    def closure(self, x: Tensor, y: Tensor, weight: float = 1.0) -> Callable[..., Tensor]:
        """The closure every optimizer here accepts (``create_graph`` for GAM's exact mode):
        it back-propagates ``weight * loss`` (scaled for float16) and returns the loss."""
        optimizer, model, loss_fn, scaler = self.optimizer, self.model, self.loss_fn, self.scaler

        def closure(create_graph: bool = False) -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                loss = loss_fn(model(x), y)
            scaled = loss if weight == 1.0 else loss * weight
            if scaler is not None:
                scaled = scaler.scale(scaled)
            scaled.backward(create_graph=create_graph)
            return loss

        return closure

    def step(self, x: Tensor, y: Tensor, weight: float = 1.0) -> Tensor:
        """One step on ``(x, y)``; returns the detached loss at the current parameters."""
        closure = self.closure(x, y, weight)
        if self.scaler is None:
            loss = self.optimizer.step(closure)
        elif isinstance(self.optimizer, PerturbationOptimizer):
            loss = self.optimizer.step(closure)
            self.scaler.update()
        else:
            loss = closure()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return loss.detach() if isinstance(loss, Tensor) else torch.as_tensor(loss)

    def state_dict(self) -> dict[str, Any] | None:
        """The GradScaler's state (None without one)."""
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


class UpdateProbe:
    """The update direction of one step: call :meth:`before`, step, then :meth:`direction`.

    Args:
        optimizer: The optimizer whose (base) param groups hold the learning rates.
        params: The parameters in the order of the flat vectors (an Objective's).
    """

    def __init__(self, optimizer: Optimizer, params: list[Tensor]) -> None:
        self.optimizer, self.params = optimizer, params
        self._before: list[Tensor] | None = None

    def before(self) -> None:
        """Copy the parameters before the step."""
        self._before = [p.detach().clone() for p in self.params]

    def point(self) -> Tensor:
        """The flat parameters before the step."""
        assert self._before is not None
        return torch.cat([t.reshape(-1) for t in self._before])

    def direction(self) -> Tensor | None:
        """Δ = (θ_before − θ_after) / lr, flat; None when the step did not move (a skipped
        float16 step) or a learning rate is 0."""
        assert self._before is not None
        lrs = {id(p): g["lr"] for g in self.optimizer.param_groups for p in g["params"]}
        parts = []
        for p, old in zip(self.params, self._before, strict=True):
            lr = float(lrs.get(id(p), 0.0))
            if lr == 0.0:
                return None
            parts.append(((old - p.detach()) / lr).reshape(-1))
        direction = torch.cat(parts)
        if not bool(torch.isfinite(direction).all()) or not bool(direction.any()):
            return None
        return direction
