"""Sharpness-aware minimization (SAM, Foret et al., ICLR 2021) around any base optimizer.

With g = grad L(theta)::

    e = rho * g / (||g|| + eps)                            (plain)
    e = rho * w^2 * g / (||w * g|| + eps)                  (adaptive, ASAM; w = theta, elementwise)
    theta <- base_step(theta, grad L(theta + e))
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatlens.core._checks import check_nonnegative
from flatlens.optim._perturbation import PerturbationOptimizer, Perturbations
from flatlens.optim._vectors import _ascent

__all__ = ["SAM"]


# ------------------------------------------------------------------------ SAM
class SAM(PerturbationOptimizer):
    """Sharpness-aware minimization around any base optimizer, in the closure style.

    One step with g = grad L(theta) from ``closure()``::

        e = rho * g / (||g|| + eps)                        (adaptive: rho w^2 g / (||w g|| + eps))
        g_sam = grad L(theta + e)                          (second closure call)
        theta <- base_optimizer.step() with theta.grad = g_sam

    Two forward-backward passes per step. ``eps`` only guards against g = 0.

    Args:
        params: The parameters (or param-group dicts) to optimize.
        base_optimizer: An optimizer instance over the same parameters, or an optimizer class
            that is built as ``base_optimizer(params, **base_kwargs)``.
        rho: Radius of the ascent step, >= 0 (rho = 0 gives the base optimizer).
        adaptive: ASAM (Kwon et al., 2021): scale the ascent by w^2 elementwise and measure
            its length in the norm ||w g||, with w = the parameters.
        model: The network. When given, BatchNorm running statistics (all buffers) are
            updated by the first pass only; without it every pass updates them. Pass the
            ``DistributedDataParallel`` module to train across processes (see below).
        eps: Guard in the denominator.
        grad_scaler: A ``torch.amp.GradScaler`` for float16 training: each pass's gradients
            are unscaled, and a step in which any pass overflows is skipped (the scaler's
            ``update()`` then lowers the scale). See ``docs/optimizers.md``.
        perturbations: Under DDP (``model`` a ``DistributedDataParallel``): ``"per_rank"``
            (each rank ascends with its own gradient; the final gradients are averaged, one
            all-reduce per step) or ``"synchronized"`` (each pass's gradient is averaged
            first, one all-reduce per pass: the one-process step on the union batch).
            Ignored without DDP. See ``docs/distributed.md``.
        **base_kwargs: Settings of the base optimizer when it is passed as a class.

    Example::

        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        optimizer = SAM(model.parameters(), base, rho=0.05, model=model)

        def closure():
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        loss = optimizer.step(closure)
    """

    _HYPERPARAMETERS = ("rho", "adaptive", "eps")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: Optimizer | type[Optimizer],
        *,
        rho: float = 0.05,
        adaptive: bool = False,
        model: nn.Module | None = None,
        eps: float = 1e-12,
        grad_scaler: torch.amp.GradScaler | None = None,
        perturbations: Perturbations = "per_rank",
        **base_kwargs: Any,
    ) -> None:
        rho = check_nonnegative("rho", rho)
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be True or False, not {adaptive!r}")
        super().__init__(
            params,
            base_optimizer,
            model=model,
            eps=eps,
            grad_scaler=grad_scaler,
            base_kwargs=base_kwargs,
            perturbations=perturbations,
        )
        self.rho = rho
        self.adaptive = adaptive

    def _set_hyperparameters(self, values: dict[str, Any]) -> None:
        self.rho = check_nonnegative("rho", values["rho"])
        self.adaptive = bool(values["adaptive"])
        self.eps = check_nonnegative("eps", values["eps"])

    def _direction(self, run, theta, device):
        start = run()
        weights = theta if self.adaptive else None
        self._move(theta, _ascent(start.grads, self.rho, self.eps, device, weights))
        return run().grads
