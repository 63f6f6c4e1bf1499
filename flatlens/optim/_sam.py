"""Sharpness-aware minimization (SAM, Foret et al., ICLR 2021) around any base optimizer.

With g = grad L(theta)::

    e = rho * g / (||g|| + eps)                            (plain)
    e = rho * w^2 * g / (||w * g|| + eps)                  (adaptive, ASAM; w = theta, elementwise)
    theta <- base_step(theta, grad L(theta + e))
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatlens.core._checks import check_nonnegative
from flatlens.core._errors import NonFiniteLossError
from flatlens.optim._finite import _all_finite, _NonFinitePoint
from flatlens.optim._perturbation import PerturbationOptimizer, Perturbations
from flatlens.optim._vectors import _ascent

__all__ = ["SAM"]


@dataclass
class _Ascended:
    """What :meth:`SAM.first_step` keeps for :meth:`SAM.second_step`."""

    theta: list[Tensor]
    buffers: list[Tensor]


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

    Code written for davda54/sam's two-call form runs unchanged, with the same result as
    ``step(closure)`` (see :meth:`first_step`)::

        loss_fn(model(x), y).backward()
        optimizer.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        optimizer.second_step(zero_grad=True)
    """

    _HYPERPARAMETERS = ("rho", "adaptive", "eps")
    _KIND = "SAM"

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
        self._ascended: _Ascended | None = None

    def _set_hyperparameters(self, values: dict[str, Any]) -> None:
        self.rho = check_nonnegative("rho", values["rho"])
        self.adaptive = bool(values["adaptive"])
        self.eps = check_nonnegative("eps", values["eps"])

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to theta + e using the gradients the caller's backward left (davda54/sam).

        e = rho g / (||g|| + eps) (adaptive: rho w^2 g / (||w g|| + eps)) with g the current
        ``.grad`` of the parameters, the same ascent :meth:`step` takes. theta, and with
        ``model=`` the buffers after this first pass (BatchNorm statistics), are kept until
        :meth:`second_step` restores them.

        Args:
            zero_grad: Drop the gradients afterwards, ready for the second backward pass.

        Raises:
            RuntimeError: ``first_step`` twice without ``second_step``, or a GradScaler in
                use (the two-call form cannot unscale or skip a step: use ``step``).
            NonFiniteLossError: the gradient or the perturbed point theta + e is not finite
                (the parameters are not moved).
        """
        if self._ascended is not None:
            raise RuntimeError("SAM.first_step called twice: call second_step() in between")
        if self._scaling():
            raise RuntimeError(
                "SAM.first_step/second_step cannot unscale gradients or skip an overflowing "
                "step; with a GradScaler use step(closure)"
            )
        params = self._params
        theta = [p.detach().clone() for p in params]
        buffers = [] if self.model is None else [b.detach().clone() for b in self.model.buffers()]
        grads = [None if p.grad is None else p.grad.detach() for p in params]
        if not _all_finite(grads):
            raise NonFiniteLossError(self._non_finite("gradient", None, "first_step"))
        weights = theta if self.adaptive else None
        try:
            self._move(theta, _ascent(grads, self.rho, self.eps, params[0].device, weights))
        except _NonFinitePoint:
            raise NonFiniteLossError(self._non_finite("perturbation", None, "first_step")) from None
        self._ascended = _Ascended(theta, buffers)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return to theta and take the base step with the gradient at theta + e (davda54/sam).

        Args:
            zero_grad: Drop the gradients after the step.

        Raises:
            RuntimeError: No :meth:`first_step` before it.
            NonFiniteLossError: the gradient at theta + e, or the parameters after the base
                step, are not finite (the parameters are back at theta).
        """
        if self._ascended is None:
            raise RuntimeError("SAM.second_step called without first_step")
        saved, self._ascended = self._ascended, None
        for p, t in zip(self._params, saved.theta, strict=True):
            p.copy_(t)
        if self.model is not None:
            for b, kept in zip(self.model.buffers(), saved.buffers, strict=True):
                b.copy_(kept)
        if not _all_finite([p.grad for p in self._params]):
            raise NonFiniteLossError(self._non_finite("direction", None, "second_step"))
        self._base_step(saved.theta, "second_step")
        if zero_grad:
            self.zero_grad()

    def _direction(self, run, theta, device):
        start = run()
        weights = theta if self.adaptive else None
        self._move(theta, _ascent(start.grads, self.rho, self.eps, device, weights))
        return run().grads
