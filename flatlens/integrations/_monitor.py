"""What the Lightning and Hugging Face flatness callbacks share: the fixed subset, when to
measure, and the :class:`~flatlens.train.FlatnessTracker` that measures.

A :class:`MonitorCore` is framework-free. It turns the user's ``data`` into a fixed list of
batches once (the first ``measure_samples`` examples; under ``torch.distributed`` each rank
keeps its contiguous block of them and the objective sums over the ranks, so every rank
computes the value of the whole subset), builds one tracker on first use (so λ_max
warm-starts from one measurement to the next), and answers "is a measurement due?" from
the epoch and step counters the framework reports. It never touches the training data
loader, the optimizer or the random-number generators of the run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flatlens import distributed as fd
from flatlens.core._checks import check_positive_int
from flatlens.train._measures import check_measures
from flatlens.train._steps import UpdateProbe
from flatlens.train._tracker import FlatnessTracker

__all__ = ["MonitorCore", "subset_batches"]


def _take(data: Any, n: int | None) -> tuple[Any, Tensor]:
    """``(inputs, targets)`` of the first ``n`` examples of ``data``: an ``(x, y)`` pair, a
    mapping of tensors with ``labels`` (Hugging Face), or a map-style data set of examples
    in either form (collated with ``default_collate``)."""
    if isinstance(data, Mapping):
        if "labels" not in data:
            raise ValueError(
                "a mapping of tensors needs a 'labels' entry (the targets); the other "
                f"entries are the model's keyword inputs. Got keys {sorted(data)}"
            )
        inputs = {k: v[:n] for k, v in data.items() if k != "labels"}
        return inputs, data["labels"][:n]
    if isinstance(data, tuple | list) and len(data) == 2 and torch.is_tensor(data[1]):
        return data[0][:n], data[1][:n]
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        count = len(data) if n is None else min(n, len(data))
        if count == 0:
            raise ValueError("the measurement data set is empty: pass at least one example")
        batch = torch.utils.data.default_collate([data[i] for i in range(count)])
        return _take(batch, None)
    raise TypeError(
        "data must be an (inputs, targets) pair of tensors, a mapping of tensors with "
        f"'labels', or a map-style data set of such examples; got {type(data).__name__}"
    )


def _rows(inputs: Any, index: slice) -> Any:
    if isinstance(inputs, Mapping):
        return {k: v[index] for k, v in inputs.items()}
    return inputs[index]


def subset_batches(
    data: Any, measure_samples: int | None, batch_size: int
) -> tuple[list[tuple[Any, Tensor]], bool]:
    """The fixed measurement batches of this process and whether they are a shard.

    Returns ``(batches, distributed)``: the first ``measure_samples`` examples (all when
    None) in batches of ``batch_size``; under ``torch.distributed`` with more than one rank
    only this rank's contiguous block of them (:func:`flatlens.distributed.shard_range`),
    and ``distributed`` True (the objective then sums over the ranks).
    """
    inputs, targets = _take(data, measure_samples)
    n = len(targets)
    if n == 0:
        raise ValueError("the measurement subset is empty: pass at least one example")
    distributed = fd.world_size() > 1
    mine = fd.shard_range(n) if distributed else slice(0, n)
    cuts = [
        slice(i, min(i + batch_size, mine.stop)) for i in range(mine.start, mine.stop, batch_size)
    ]
    batches = [(_rows(inputs, cut), targets[cut]) for cut in cuts]
    return batches, distributed


class MonitorCore:
    """The schedule and the tracker of a flatness callback (see the module docstring).

    Args:
        data: The fixed subset (see :func:`subset_batches`).
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced; its ``batch_weight``
            attribute, when present, weights the batches (tokens of a language model). A
            callable ``model -> loss_fn`` may be given as ``loss_for`` instead, resolved
            when the model is first seen.
        measures: Which of ``lambda_max``, ``trace``, ``r0``, ``r1``.
        measure_every: Measure at the end of every this many epochs (0: never).
        measure_every_steps: Measure after every this many optimizer steps (0: never).
        critical_every_steps: Take λ_c along the update of every this many steps (0: never).
        measure_samples: Examples of ``data`` measured (None: all).
        batch_size: Examples per batch of the measurement passes.
        tracker_options: Settings of :class:`~flatlens.train.FlatnessTracker`
            (``measure_rho``, ``measure_steps``, ``measure_budget``, ``trace_probes``,
            ``seed``, ``tol``, ``warm_start``).
    """

    def __init__(
        self,
        data: Any,
        loss_fn: Callable[..., Tensor] | None,
        *,
        loss_for: Callable[[nn.Module], Callable[..., Tensor]] | None = None,
        measures: Sequence[str],
        measure_every: int,
        measure_every_steps: int,
        critical_every_steps: int,
        measure_samples: int | None,
        batch_size: int,
        tracker_options: dict[str, Any],
    ) -> None:
        if loss_fn is None and loss_for is None:
            raise ValueError("pass loss_fn")
        self.data, self.loss_fn, self.loss_for = data, loss_fn, loss_for
        self.measures = check_measures(measures)
        self.measure_every = check_positive_int("measure_every", measure_every, 0)
        self.measure_every_steps = check_positive_int("measure_every_steps", measure_every_steps, 0)
        self.critical_every_steps = check_positive_int(
            "critical_every_steps", critical_every_steps, 0
        )
        if measure_samples is not None:
            measure_samples = check_positive_int("measure_samples", measure_samples)
        self.measure_samples = measure_samples
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.tracker_options = dict(tracker_options)
        self.tracker: FlatnessTracker | None = None
        self._state: dict[str, Any] | None = None
        self._probe: UpdateProbe | None = None
        self._probe_step = -1

    # ------------------------------------------------------------------ schedule
    def epoch_due(self, epochs_done: int) -> bool:
        """Whether to measure after ``epochs_done`` finished epochs."""
        return bool(self.measure_every) and epochs_done % self.measure_every == 0

    def step_due(self, steps_done: int) -> bool:
        """Whether to measure after ``steps_done`` optimizer steps."""
        return bool(self.measure_every_steps) and steps_done % self.measure_every_steps == 0

    # ------------------------------------------------------------------ measures
    def tracker_for(self, model: nn.Module) -> FlatnessTracker:
        """The tracker of ``model`` (built on first use, with a restored warm-start state)."""
        if self.tracker is None or self.tracker.model is not model:
            batches, distributed = subset_batches(self.data, self.measure_samples, self.batch_size)
            if self.loss_fn is None:
                self.loss_fn = self.loss_for(model)
            device = next(p.device for p in model.parameters())
            batches = [(_to(x, device), _to(y, device)) for x, y in batches]
            self.tracker = FlatnessTracker(
                model,
                self.loss_fn,
                batches,
                measures=self.measures,
                distributed=distributed,
                **self.tracker_options,
            )
            if self._state is not None:
                self.tracker.load_state_dict(self._state)
        return self.tracker

    def measure(self, model: nn.Module) -> dict[str, Any]:
        """The measures now: ``{name: value, ..., "cost": {...}}`` (see
        :meth:`FlatnessTracker.measure <flatlens.train.FlatnessTracker.measure>`)."""
        tracker = self.tracker_for(model)
        with _buffers_of_rank_zero(model, tracker.distributed):
            return tracker.measure()

    def before_step(self, model: nn.Module, optimizer: Any, steps_done: int) -> None:
        """Copy the parameters when the coming step's λ_c is due (one copy of θ)."""
        self._probe = None
        if self.critical_every_steps and (steps_done + 1) % self.critical_every_steps == 0:
            params = [p for p in model.parameters() if p.requires_grad]
            self._probe = UpdateProbe(optimizer, params)
            self._probe.before()
            self._probe_step = steps_done

    def after_step(self, model: nn.Module, steps_done: int) -> dict[str, Any] | None:
        """λ_c along the step just taken (None when none was due or the step did not move)."""
        probe, self._probe = self._probe, None
        if probe is None or steps_done != self._probe_step + 1:
            return None
        direction = probe.direction()
        if direction is None:
            return None
        tracker = self.tracker_for(model)
        with _buffers_of_rank_zero(model, tracker.distributed):
            return tracker.critical(direction, at=probe.point())

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The tracker's warm-start state (for the framework's checkpoint)."""
        if self.tracker is not None:
            return self.tracker.state_dict()
        return dict(self._state or {})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; applied when the tracker is built."""
        self._state = dict(state) if state else None
        if self.tracker is not None and self._state:
            self.tracker.load_state_dict(self._state)


@contextlib.contextmanager
def _buffers_of_rank_zero(model: nn.Module, distributed: bool) -> Iterator[None]:
    """Every rank measures with rank 0's buffers (DDP keeps the parameters equal, not the
    BatchNorm statistics each rank's last forward pass left); its own are put back after."""
    if not distributed:
        yield
        return
    saved = [b.detach().clone() for b in model.buffers()]
    fd.broadcast_buffers(model)
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, old in zip(model.buffers(), saved, strict=True):
                buffer.copy_(old)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Mapping):
        return {k: _to(v, device) for k, v in value.items()}
    return value.to(device) if torch.is_tensor(value) else value


def scalars(values: dict[str, Any], prefix: str) -> dict[str, float]:
    """The measured numbers of a tracker result as ``{prefix + name: float}`` (costs,
    brackets and flags left out, λ_c's bracket kept as its value only)."""
    keep = ("lambda_max", "trace", "r0", "r1", "lambda_c")
    return {f"{prefix}{k}": float(values[k]) for k in keep if k in values}


def merge(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two tracker results as one (their costs side by side)."""
    cost = {**first.get("cost", {}), **second.get("cost", {})}
    return {**first, **second, "cost": cost}


class MonitorHooks:
    """The settings and the bookkeeping both framework callbacks share (see
    :class:`~flatlens.integrations.lightning.FlatnessMonitorHooks` for the arguments).

    A subclass supplies the framework's hooks and, where the model's output is not what
    ``loss_fn`` takes, :meth:`_wrap_loss` and :meth:`_default_loss`.
    """

    def __init__(
        self,
        data: Any,
        loss_fn: Callable[..., Tensor] | None = None,
        *,
        measures: Sequence[str] = ("lambda_max",),
        measure_every: int = 1,
        measure_every_steps: int = 0,
        critical_every_steps: int = 0,
        measure_samples: int | None = 256,
        batch_size: int = 64,
        measure_rho: float = 0.05,
        measure_steps: int = 20,
        measure_budget: float | None = 40.0,
        trace_probes: int = 30,
        seed: int = 0,
        prefix: str = "flatness/",
    ) -> None:
        super().__init__()
        self.core = MonitorCore(
            data,
            None if loss_fn is None else self._wrap_loss(loss_fn),
            loss_for=lambda model: self._wrap_loss(self._default_loss(model)),
            measures=measures,
            measure_every=measure_every,
            measure_every_steps=measure_every_steps,
            critical_every_steps=critical_every_steps,
            measure_samples=measure_samples,
            batch_size=batch_size,
            tracker_options={
                "measure_rho": measure_rho,
                "measure_steps": measure_steps,
                "measure_budget": measure_budget,
                "trace_probes": trace_probes,
                "seed": seed,
            },
        )
        self.prefix = prefix
        self.history: list[dict[str, Any]] = []
        self._measured_step = -1

    def _wrap_loss(self, loss_fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """``loss_fn`` as the tracker calls it, ``loss(model(inputs), targets)``."""
        return loss_fn

    def _default_loss(self, model: nn.Module) -> Callable[..., Tensor]:
        """The loss when none was given: cross-entropy."""
        return nn.CrossEntropyLoss()

    def after_step(self, model: nn.Module, step: int) -> dict[str, Any]:
        """λ_c of the step just taken and, when due, the measures (``{}``: nothing)."""
        record = self.core.after_step(model, step) or {}
        if step > 0 and step != self._measured_step and self.core.step_due(step):
            record = merge(record, self.core.measure(model))
            self._measured_step = step
        return record

    def after_epoch(self, model: nn.Module, epochs_done: int, step: int) -> dict[str, Any]:
        """The measures when an epoch end is due (unless this step was just measured)."""
        if step == self._measured_step or not self.core.epoch_due(epochs_done):
            return {}
        self._measured_step = step
        return self.core.measure(model)

    def record(self, values: dict[str, Any], epoch: float, step: int) -> dict[str, float]:
        """Keep a measurement in :attr:`history`; returns its logged numbers."""
        metrics = scalars(values, self.prefix)
        entry = {"epoch": epoch, "step": step, **metrics}
        self.history.append({**entry, "cost": values.get("cost", {})})
        return metrics
