"""SAM and GAM under PyTorch Lightning's automatic optimization.

Return :class:`~flatlens.optim.SAM` or :class:`~flatlens.optim.GAM` from
``configure_optimizers`` and Lightning drives them through their closure, as a plain
``optimizer.step(closure)`` loop does: the steps are bit-identical to such a loop (BatchNorm
statistics, ``precision="bf16-mixed"``, gradient clipping and ``.ckpt`` resume included).
Two things need more than that, and :class:`SharpnessAwareMixin` supplies them:

* **Gradient accumulation** (``Trainer(accumulate_grad_batches=k)``). Lightning runs the first
  k - 1 micro-batches of a window before the step and hands the optimizer a closure over the
  last one only. SAM's first pass then sees the whole window, but its perturbed passes would
  see the last micro-batch alone (scaled by 1/k). The mixin records the window's micro-batches
  and replays the earlier ones, through Lightning's own ``training_step`` and ``backward``,
  before every later pass, so each pass's gradient is that of the window's mean loss
  (1/k) sum_i L_i at its own point. Without the mixin, SAM and GAM refuse to step under
  accumulation (a ``RuntimeError`` that names the mixin) instead of stepping wrongly.
* **GAM's exact mode** needs ``backward(create_graph=True)`` for its Hessian-vector products;
  Lightning's closure takes no arguments. The mixin's closure accepts ``create_graph`` and
  passes it to ``backward``. Gradient clipping rescales the gradients in place, which would
  cut them from their graph, so exact mode with ``gradient_clip_val`` is refused.

``precision="16-mixed"`` with a CUDA ``GradScaler`` is not supported: Lightning then runs the
closure itself and steps without one, and SAM/GAM stop with "needs a closure"; use
``"bf16-mixed"``.

Schedule the learning rate with a scheduler built on the SAM/GAM instance itself (its
``param_groups`` are the base optimizer's, so the base steps with the scheduled rate)::

    def configure_optimizers(self):
        base = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        opt = SAM(self.parameters(), base, rho=0.05, model=self)
        return {"optimizer": opt, "lr_scheduler": CosineAnnealingLR(opt, T_max=100)}

(A scheduler built on ``base`` is refused by Lightning: "Some schedulers are attached with an
optimizer that wasn't returned from configure_optimizers".)

:class:`FlatnessMonitor` (a Lightning ``Callback``) measures λ_max, tr(H), R0/R1 and the
critical sharpness λ_c of the module on a fixed subset during training and logs them through
the trainer's loggers.

Lightning is imported lazily, through :mod:`flatlens._compat`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from flatlens._compat import prepare_torchvision
from flatlens.integrations._monitor import MonitorHooks
from flatlens.optim._perturbation import PerturbationOptimizer

# Importing this module before the framework makes a plain ``import lightning`` (or
# ``transformers``) work also where the torchvision wheel does not match torch.
prepare_torchvision()

__all__ = [  # noqa: F822 (FlatnessMonitor is built on first use)
    "FlatnessMonitor",
    "FlatnessMonitorHooks",
    "SharpnessAwareMixin",
    "unwrap_optimizer",
]


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside Lightning's ``LightningOptimizer`` wrapper (or ``optimizer``)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _closure_loss(output: Any) -> Tensor | None:
    """The loss of a ``training_step`` output: a tensor, ``output["loss"]`` or None (skip)."""
    if output is None or isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        loss = output.get("loss")
        if loss is None or isinstance(loss, Tensor):
            return loss
    raise TypeError(
        "training_step must return a loss tensor, a dict with the key 'loss', or None; got "
        f"{type(output).__name__}"
    )


class SharpnessAwareMixin:
    """Mix into a ``LightningModule`` that trains with SAM or GAM (put it first)::

        class Classifier(SharpnessAwareMixin, L.LightningModule):
            ...

    It changes nothing for other optimizers or for manual optimization. With SAM or GAM
    under automatic optimization it

    * replays the earlier micro-batches of a gradient-accumulation window before each pass
      after the first, so every pass accumulates over the whole window: with k micro-batches
      B_1..B_k, each pass at a point theta' computes grad (1/k) sum_i L_{B_i}(theta'), the
      gradient a plain loop over the window's mean loss computes;
    * lets GAM's exact mode ask for ``backward(create_graph=True)``.

    It overrides ``on_train_batch_start`` (to record the window), ``optimizer_step`` and
    ``backward``; a module that overrides them too must call ``super()``. A replayed
    micro-batch runs through ``trainer.strategy.training_step`` and
    ``trainer.strategy.backward`` (autocast, hooks and loss scaling as Lightning's own
    closure), so ``training_step`` runs once more per micro-batch and pass: what it logs is
    logged again, as for every SAM pass.
    """

    _flatlens_window: list[tuple[Any, int]]
    _flatlens_create_graph: bool = False

    # ------------------------------------------------------------------ hooks
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        """Record ``batch`` when it belongs to an accumulation window of more than one."""
        k = self._flatlens_accumulation()
        if k > 1:
            window = self.__dict__.setdefault("_flatlens_window", [])
            if batch_idx % k == 0:
                window.clear()
            window.append((batch, batch_idx))
        parent = getattr(super(), "on_train_batch_start", None)
        return parent(batch, batch_idx) if parent is not None else None

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[..., Any] | None = None,
    ) -> None:
        """Step with a closure that replays the window and accepts ``create_graph``."""
        inner = unwrap_optimizer(optimizer)
        if isinstance(inner, PerturbationOptimizer) and optimizer_closure is not None:
            optimizer_closure = self._flatlens_closure(optimizer_closure, inner, batch_idx)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)  # type: ignore[misc]

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's backward, with ``create_graph=True`` while GAM's exact mode asks for it."""
        if self._flatlens_create_graph:
            kwargs["create_graph"] = True
        super().backward(loss, *args, **kwargs)  # type: ignore[misc]

    # ------------------------------------------------------------------ machinery
    def _flatlens_trainer(self) -> Any:
        return getattr(self, "_trainer", None)

    def _flatlens_accumulation(self) -> int:
        trainer = self._flatlens_trainer()
        k = getattr(trainer, "accumulate_grad_batches", 1) if trainer is not None else 1
        if not getattr(self, "automatic_optimization", True):
            return 1
        strategy = getattr(trainer, "strategy", None)
        if getattr(strategy, "handles_gradient_accumulation", False):
            return 1
        return k if isinstance(k, int) else 1

    def _flatlens_earlier(self, batch_idx: int) -> list[tuple[Any, int]]:
        """The window's micro-batches before ``batch_idx`` (checked to be all of them)."""
        k = self._flatlens_accumulation()
        if k <= 1:
            return []
        window = self.__dict__.get("_flatlens_window", [])
        start = batch_idx - batch_idx % k
        if [i for _, i in window] != list(range(start, batch_idx + 1)):
            raise RuntimeError(
                f"SharpnessAwareMixin did not see the micro-batches {start}..{batch_idx} of this "
                "accumulation window: a subclass overrides on_train_batch_start without calling "
                "super().on_train_batch_start(batch, batch_idx)"
            )
        return window[:-1]

    def _flatlens_check_exact(self, optimizer: PerturbationOptimizer) -> None:
        trainer = self._flatlens_trainer()
        if optimizer._needs_graph() and getattr(trainer, "gradient_clip_val", None):
            raise RuntimeError(
                f"{type(optimizer).__name__} in exact mode under gradient_clip_val="
                f"{trainer.gradient_clip_val}: clipping rescales the gradients in place, which "
                "cuts them from the graph its Hessian-vector products need. Train exact mode "
                "without gradient clipping, or use mode='accelerated'"
            )

    def _flatlens_replay(self, earlier: list[tuple[Any, int]], optimizer: Any) -> None:
        """Forward and backward of the earlier micro-batches at the current parameters,
        accumulated into ``.grad`` the way Lightning's closure does it."""
        trainer = self._flatlens_trainer()
        strategy = trainer.strategy
        k = self._flatlens_accumulation()
        takes_index = _takes_batch_idx(self.training_step)  # type: ignore[attr-defined]
        for batch, idx in earlier:
            args = (batch, idx) if takes_index else (batch,)
            loss = _closure_loss(strategy.training_step(*args))
            if loss is not None:
                strategy.backward(loss / k, optimizer)

    def _flatlens_closure(
        self, closure: Callable[..., Any], optimizer: PerturbationOptimizer, batch_idx: int
    ) -> Callable[..., Any]:
        earlier = self._flatlens_earlier(batch_idx)
        self._flatlens_check_exact(optimizer)
        calls = [0]

        def replaying_closure(create_graph: bool = False) -> Any:
            calls[0] += 1
            # Lightning's precision wrapper calls this without arguments; SAM/GAM pass
            # create_graph through the attribute (see flatlens.optim._perturbation).
            create_graph = create_graph or replaying_closure.create_graph
            self._flatlens_create_graph = bool(create_graph)
            try:
                if calls[0] > 1 and earlier:
                    # The first pass runs at theta, where Lightning already accumulated the
                    # earlier micro-batches; every later pass starts from cleared gradients.
                    self._flatlens_replay(earlier, optimizer)
                return closure()
            finally:
                self._flatlens_create_graph = False

        replaying_closure.replays_window = True  # type: ignore[attr-defined]
        replaying_closure.create_graph = False  # type: ignore[attr-defined]
        return replaying_closure


def _takes_batch_idx(step: Callable[..., Any]) -> bool:
    """Whether ``training_step`` takes a second argument (Lightning passes ``batch_idx`` then)."""
    try:
        params = list(inspect.signature(step).parameters.values())
    except (TypeError, ValueError):
        return True
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return True
    positional = [
        p
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    return len(positional) >= 2


class FlatnessMonitorHooks(MonitorHooks):
    """The hooks of :class:`FlatnessMonitor`, a Lightning ``Callback`` built on this class.

    Measures the ``LightningModule`` on a fixed subset of the training data and logs the
    values through every logger of the trainer (``logger.log_metrics``, under the names
    ``flatness/lambda_max``, ``flatness/trace``, ``flatness/r0``, ``flatness/r1`` and
    ``flatness/lambda_c``, at the trainer's ``global_step``):

    * λ_max, tr(H), R0 and R1 (``measures``) at the end of every ``measure_every``
      epochs and after every ``measure_every_steps`` optimizer steps, with a
      :class:`~flatlens.train.FlatnessTracker`: λ_max warm-starts from the previous
      eigenvector, R0 and R1 run under ``measure_budget`` HVP-equivalents;
    * λ_c = 2 / η_c along the optimizer's update Δ = (θ_before − θ_after) / lr of every
      ``critical_every_steps`` steps (forward passes only).

    Each measure costs its passes over the subset alone: never a pass over the rest of the
    training data. The module's parameters, buffers and modes, the optimizer and the random
    state of the run are as they were (a run with the monitor takes the same steps as one
    without). Under DDP every rank measures its contiguous block of the subset and the
    objective sums over the ranks, so the value is that of the whole subset, logged once
    (by the loggers of global rank 0); the ranks measure with rank 0's buffers (DDP keeps
    the parameters equal, not the BatchNorm statistics) and get their own back after. Every
    measurement, with its costs (HVPs, gradients, losses, seconds), is also kept in
    :attr:`history`; the warm-start state goes into the trainer's checkpoint.

    Args:
        data: The fixed subset: an ``(inputs, targets)`` pair of tensors or a map-style
            data set of ``(input, target)`` examples; the first ``measure_samples`` are used.
        loss_fn: ``loss_fn(module(inputs), targets)``, mean-reduced (default cross-entropy).
        measures: Which of ``"lambda_max"``, ``"trace"``, ``"r0"``, ``"r1"``.
        measure_every: Epochs between measurements (0: none at epoch ends).
        measure_every_steps: Optimizer steps between measurements (0: none within epochs).
        critical_every_steps: Steps between λ_c measurements (0: never).
        measure_samples: Examples of ``data`` measured (None: all of them).
        batch_size: Examples per batch of the measurement passes.
        measure_rho: Radius of R0 and R1.
        measure_steps: Ascent steps per start of R0 and R1.
        measure_budget: Cap on each of R0 and R1 in HVP-equivalents (None: no cap).
        trace_probes: Probes of the Hutch++ trace.
        seed: Seeds the random starts (the same for every measurement).
        prefix: Prepended to every logged name.

    Example::

        monitor = FlatnessMonitor((x_subset, y_subset), measures=["lambda_max", "r1"])
        trainer = L.Trainer(max_epochs=10, callbacks=[monitor], logger=CSVLogger("logs"))
    """

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        """Copy θ when the coming step's λ_c is due."""
        if self.core.critical_every_steps and trainer.optimizers:
            optimizer = unwrap_optimizer(trainer.optimizers[0])
            self.core.before_step(pl_module, optimizer, trainer.global_step)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """λ_c of the step just taken, and the measures every ``measure_every_steps``."""
        self._log(trainer, self.after_step(pl_module, trainer.global_step))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """The measures every ``measure_every`` epochs (unless this step was just measured)."""
        done = trainer.current_epoch + 1
        self._log(trainer, self.after_epoch(pl_module, done, trainer.global_step))

    def state_dict(self) -> dict[str, Any]:
        """The warm-start state (Lightning stores it in the checkpoint)."""
        return {"tracker": self.core.state_dict(), "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` from a checkpoint."""
        self.core.load_state_dict(state_dict.get("tracker", {}))
        self.history = list(state_dict.get("history", []))

    def _log(self, trainer: Any, values: dict[str, Any]) -> None:
        if not values:
            return
        metrics = self.record(values, trainer.current_epoch, trainer.global_step)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)


def __getattr__(name: str) -> Any:
    """``FlatnessMonitor``: :class:`FlatnessMonitorHooks` on Lightning's ``Callback``."""
    if name == "FlatnessMonitor":
        from flatlens._compat import import_module

        pl = import_module("lightning.pytorch", purpose="FlatnessMonitor")
        cls = type(
            "FlatnessMonitor",
            (FlatnessMonitorHooks, pl.Callback),
            {
                "__module__": __name__,
                "__doc__": "A Lightning ``Callback`` that measures and logs flatness during "
                "training (see :class:`FlatnessMonitorHooks`).",
            },
        )
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
