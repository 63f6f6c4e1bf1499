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

:class:`FlatnessCallback` (a ``TrainerCallback``) measures λ_max, tr(H), R0/R1 and λ_c on a
fixed, token-weighted subset during training and appends them to
``trainer.state.log_history``.

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
from flatlens.integrations._monitor import MonitorHooks
from flatlens.optim._perturbation import PerturbationOptimizer

# Importing this module before the framework makes a plain ``import lightning`` (or
# ``transformers``) work also where the torchvision wheel does not match torch.
prepare_torchvision()

__all__ = [  # noqa: F822 (FlatnessCallback and SharpnessAwareTrainer are built on first use)
    "FlatnessCallback",
    "FlatnessCallbackHooks",
    "SharpnessAwareTrainer",
    "SharpnessAwareTrainerMixin",
]


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


class _OnLogits(nn.Module):
    """``loss(logits, labels)`` for a model that returns an output object with ``.logits``
    (its ``batch_weight``, the token count of a language-model loss, kept)."""

    def __init__(self, loss: Any) -> None:
        super().__init__()
        self.loss = loss
        self.batch_weight = getattr(loss, "batch_weight", None)
        self.reduction = getattr(loss, "reduction", "mean")

    def forward(self, outputs: Any, labels: Tensor) -> Tensor:
        """The wrapped loss of ``outputs.logits`` (or of ``outputs``, a tensor)."""
        logits = outputs if isinstance(outputs, Tensor) else outputs["logits"]
        return self.loss(logits, labels)


class FlatnessCallbackHooks(MonitorHooks):
    """The hooks of :class:`FlatnessCallback`, a ``transformers.TrainerCallback`` built on
    this class.

    Measures the Trainer's model on a fixed subset of examples and appends the values to
    ``trainer.state.log_history`` as ``{"flatness/lambda_max": ..., "epoch": ..., "step":
    ...}`` entries (``flatness/trace``, ``flatness/r0``, ``flatness/r1``,
    ``flatness/lambda_c`` likewise), where ``trainer.state.save_to_json`` and every later
    reader find them:

    * λ_max, tr(H), R0 and R1 (``measures``) after every ``measure_every_steps``
      optimizer steps and at the end of every ``measure_every`` epochs, with a
      :class:`~flatlens.train.FlatnessTracker` (λ_max warm-started, R0/R1 under
      ``measure_budget`` HVP-equivalents);
    * λ_c = 2 / η_c along the update of every ``critical_every_steps`` steps (forward
      passes only).

    The objective is the loss the model's task implies, weighted by tokens: for a causal
    language model the mean next-token cross-entropy over every non-padding token of the
    subset (labels -100 do not count), however the batches split it (the loss of
    :mod:`flatlens.cli._hf`; pass ``loss_fn`` for another). It runs in eval mode (no
    dropout), in the parameters' dtype; the model, the optimizer and the run's random state
    are left as they were. Each measurement's costs are kept in :attr:`history`.

    The settings after ``loss_fn`` (``measures``, ``measure_every``,
    ``measure_every_steps``, ``critical_every_steps``, ``measure_samples``, ``batch_size``,
    ``measure_rho``, ``measure_steps``, ``measure_budget``, ``trace_probes``, ``seed``,
    ``prefix``) mean what they mean for
    :class:`~flatlens.integrations.lightning.FlatnessMonitorHooks`.

    Args:
        data: The fixed subset: a mapping of tensors (``input_ids``, ``attention_mask``,
            ..., and ``labels``), or a data set of such examples (the Trainer's
            ``train_dataset``); the first ``measure_samples`` examples are used. The entries
            other than ``labels`` are the model's keyword inputs.
        loss_fn: ``loss_fn(logits, labels)``; default: the loss of the model's task.

    Example::

        callback = FlatnessCallback(train_dataset, measure_every_steps=100)
        trainer = Trainer(model=model, args=args, train_dataset=train_dataset,
                          callbacks=[callback])
    """

    def _wrap_loss(self, loss_fn: Any) -> Any:
        """The loss on the logits of the model's output object."""
        return _OnLogits(loss_fn)

    def _default_loss(self, model: nn.Module) -> Any:
        """The loss of the model's task (:func:`flatlens.cli._hf.task_loss`)."""
        from flatlens.cli._hf import task_loss

        return task_loss(type(model).__name__, getattr(model, "config", None))[1]

    # ------------------------------------------------------------------ Trainer hooks
    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Copy θ when the coming step's λ_c is due."""
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if self.core.critical_every_steps and model is not None and optimizer is not None:
            self.core.before_step(model, _inner(optimizer), state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """λ_c of the step just taken, and the measures every ``measure_every_steps``."""
        model = kwargs.get("model")
        if model is not None:
            self._log(state, self.after_step(model, state.global_step))

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The measures every ``measure_every`` epochs (unless this step was just measured)."""
        model = kwargs.get("model")
        if model is not None:
            done = round(state.epoch or 0)
            self._log(state, self.after_epoch(model, done, state.global_step))

    def _log(self, state: Any, values: dict[str, Any]) -> None:
        if values:
            metrics = self.record(values, state.epoch, state.global_step)
            state.log_history.append({**metrics, "epoch": state.epoch, "step": state.global_step})


def __getattr__(name: str) -> Any:
    """``SharpnessAwareTrainer`` (the mixin on ``transformers.Trainer``) and
    ``FlatnessCallback`` (the hooks on ``TrainerCallback``), built on first use."""
    if name == "FlatnessCallback":
        from flatlens._compat import import_module

        callbacks = import_module("transformers.trainer_callback", purpose="FlatnessCallback")
        cls = type(
            "FlatnessCallback",
            (FlatnessCallbackHooks, callbacks.TrainerCallback),
            {
                "__module__": __name__,
                "__doc__": "A ``TrainerCallback`` that measures flatness during training and "
                "logs it into ``trainer.state.log_history`` (see "
                ":class:`FlatnessCallbackHooks`).",
            },
        )
        globals()[name] = cls
        return cls
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
