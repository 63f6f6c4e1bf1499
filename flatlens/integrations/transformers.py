"""SAM and GAM in the Hugging Face ``Trainer``.

The ``Trainer`` steps its optimizer with ``optimizer.step()`` and no closure (through
accelerate's optimizer wrapper), so SAM and GAM, which run several forward-backward passes
per step, cannot be passed as ``optimizers=(SAM(...), None)`` on their own.
:class:`SharpnessAwareTrainerMixin` (or the ready class ``SharpnessAwareTrainer``) supplies
the closure. With a gradient-accumulation window of micro-batches B_1..B_k:

* the first pass is the Trainer's own: ``training_step`` on each micro-batch at θ, under its
  accelerator (mixed precision, ``no_sync`` for all but the last micro-batch, loss scaled for
  accumulation: token-weighted over the window when the model takes ``num_items_in_batch``);
* every later pass, at the point SAM or GAM moved the parameters to, runs the same
  ``training_step`` on every micro-batch of the window, so each pass's gradient is that of the
  window's loss at its own point, as a plain ``optimizer.step(closure)`` loop over the window
  computes it;
* ``max_grad_norm`` clips the gradient of every pass (the Trainer clips the first; the closure
  clips the others), as Lightning's ``gradient_clip_val`` does;
* the learning-rate scheduler is built on the SAM/GAM instance (the Trainer's own
  ``create_scheduler``, or one you pass), whose ``param_groups`` are the base optimizer's.

``fp16`` (a ``GradScaler``) is refused: the scaler unscales and checks only the gradient the
Trainer computed, not the passes SAM runs inside its step; use ``bf16``. GAM's exact mode is
refused too: accelerate's ``backward`` cannot keep the graph of its Hessian-vector products.

transformers is imported lazily, through :mod:`flatlens._compat`::

    from flatlens.integrations.transformers import SharpnessAwareTrainer

    base = torch.optim.AdamW(model.parameters(), lr=5e-4)
    sam = SAM(model.parameters(), base, rho=0.05, model=model)
    trainer = SharpnessAwareTrainer(
        model=model, args=args, train_dataset=train, optimizers=(sam, None)
    )
    trainer.train()
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from flatlens._compat import prepare_torchvision
from flatlens.optim._perturbation import PerturbationOptimizer

# Importing this module before the framework makes a plain ``import lightning`` (or
# ``transformers``) work also where the torchvision wheel does not match torch.
prepare_torchvision()

__all__ = ["SharpnessAwareTrainer", "SharpnessAwareTrainerMixin"]  # noqa: F822 (lazy)


def _inner(optimizer: Any) -> Any:
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` (or ``optimizer``)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


class SharpnessAwareTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (first) to train with SAM or GAM::

        class MyTrainer(SharpnessAwareTrainerMixin, Trainer): ...

    Pass the optimizer as ``optimizers=(SAM(...), scheduler_or_None)``. With any other
    optimizer nothing changes. It overrides ``training_step``: a subclass that overrides it
    too must call ``super().training_step(model, inputs, num_items_in_batch)``.
    """

    _flatlens_window: list[tuple[Any, Any]]
    _flatlens_pending: Any = None

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> Tensor:
        """The Trainer's step on one micro-batch; the last one of a window also prepares the
        closure that SAM/GAM's ``step`` runs for its later passes."""
        optimizer = _inner(getattr(self, "optimizer", None))
        if not isinstance(optimizer, PerturbationOptimizer):
            return super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        self._flatlens_check(optimizer)
        window = self.__dict__.setdefault("_flatlens_window", [])
        if self.__dict__.get("_flatlens_closed", True):
            window.clear()
            self._flatlens_closed = False
        window.append((inputs, num_items_in_batch))
        loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        if self.accelerator.sync_gradients:  # type: ignore[attr-defined]
            self._flatlens_closed = True
            self._flatlens_pending = self._flatlens_closure(model, list(window), loss)
            self._flatlens_hook(optimizer)
        return loss

    # ------------------------------------------------------------------ machinery
    def _flatlens_check(self, optimizer: PerturbationOptimizer) -> None:
        args = self.args  # type: ignore[attr-defined]
        name = type(optimizer).__name__
        if getattr(args, "fp16", False):
            raise ValueError(
                f"{name} in the Trainer with fp16: the GradScaler unscales and checks only the "
                "Trainer's own gradient, not the passes inside the step; train with bf16=True "
                "(or in float32)"
            )
        if optimizer._needs_graph():
            raise ValueError(
                f"{name} in exact mode needs backward(create_graph=True) for its Hessian-vector "
                "products, which the Trainer's accelerator.backward does not keep; use "
                "mode='accelerated' in the Trainer (exact mode works in a plain loop and under "
                "Lightning with SharpnessAwareMixin)"
            )

    def _flatlens_hook(self, optimizer: PerturbationOptimizer) -> None:
        """Let ``optimizer.step()`` without a closure (as the Trainer calls it) take the
        pending one. Installed once per optimizer instance."""
        if optimizer.__dict__.get("_flatlens_hooked"):
            return
        trainer = self
        original = optimizer.step

        def step(closure: Any = None) -> Any:
            if closure is None and trainer._flatlens_pending is not None:
                closure, trainer._flatlens_pending = trainer._flatlens_pending, None
            return original(closure)

        optimizer.step = step  # type: ignore[method-assign]
        optimizer._flatlens_hooked = True

    def _flatlens_closure(self, model: nn.Module, window: list[tuple[Any, Any]], last: Tensor):
        calls = [0]
        parent = super()

        def closure() -> Tensor:
            calls[0] += 1
            if calls[0] == 1:
                # The Trainer's own micro-batch passes already left the window's gradient at
                # theta in .grad (clipped by the Trainer when max_grad_norm > 0).
                return last
            total = None
            for i, (inputs, num_items) in enumerate(window):
                context = (
                    self.accelerator.no_sync(model)  # type: ignore[attr-defined]
                    if i < len(window) - 1
                    else contextlib.nullcontext()
                )
                with context:
                    loss = parent.training_step(model, inputs, num_items)  # type: ignore[misc]
                total = loss if total is None else total + loss
            if self.args.max_grad_norm and self.args.max_grad_norm > 0:  # type: ignore[attr-defined]
                self._clip_grad_norm(model)  # type: ignore[attr-defined]
            return total

        return closure


def __getattr__(name: str) -> Any:
    """``SharpnessAwareTrainer``: the mixin on ``transformers.Trainer``, built on first use."""
    if name == "SharpnessAwareTrainer":
        from flatlens._compat import import_module

        trainer_module = import_module("transformers.trainer", purpose="SharpnessAwareTrainer")
        cls = type(
            "SharpnessAwareTrainer",
            (SharpnessAwareTrainerMixin, trainer_module.Trainer),
            {
                "__module__": __name__,
                "__doc__": "A ``transformers.Trainer`` that trains with SAM or GAM "
                "(see :class:`SharpnessAwareTrainerMixin`).",
            },
        )
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
