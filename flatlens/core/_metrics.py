"""Metrics at parameter points: which ones were asked for, and how batches combine them.

For batches B_b of sizes n_b (N = sum_b n_b) and a point theta, the loss is
L(theta) = (1/N) sum_b n_b loss(B_b; theta) (sum_b loss(B_b; theta) for a summed loss), the
accuracy (1/N) sum_b #{i in B_b : argmax f(x_i; theta) = y_i}, and a callable metric m the
mean (1/N) sum_b n_b m(B_b; theta), or sum_b m(B_b; theta) when ``m.reduction == "sum"``.
The per-batch terms are formed in the model's dtype and summed per point in float64
(:class:`Sums`); :func:`finish` divides by N as :meth:`Objective.loss` does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from flatlens.core._objective import Objective

__all__ = [
    "BUILTIN_METRICS",
    "Metric",
    "MetricSet",
    "MetricsArg",
    "Sums",
    "finish",
    "resolve_metrics",
    "stack_weighted",
    "weighted",
]

BUILTIN_METRICS = ("loss", "accuracy")
MetricFn = Callable[[Any, Any], Tensor]
MetricsArg = str | MetricFn | Sequence[str | MetricFn] | Mapping[str, MetricFn] | None


@dataclass(frozen=True)
class Metric:
    """A callable metric: ``fn(outputs, targets)`` is a scalar per batch."""

    name: str
    fn: MetricFn
    mean: bool  # combined as (1/N) sum_b n_b m_b; else as sum_b m_b


@dataclass(frozen=True)
class MetricSet:
    """The metrics of one evaluation besides the loss, which is always computed.

    Attributes:
        accuracy: ``"yes"`` (requested: an error unless the task is classification),
            ``"no"`` or ``"auto"`` (included when every batch is classification).
        custom: The callable metrics, in the order given.
    """

    accuracy: Literal["yes", "no", "auto"] = "no"
    custom: tuple[Metric, ...] = ()

    def names(self, classify: bool) -> list[str]:
        """Result keys: ``"loss"``, then ``"accuracy"`` when held, then the callables'."""
        keep = self.accuracy == "yes" or (self.accuracy == "auto" and classify)
        return ["loss", *(["accuracy"] if keep else []), *(m.name for m in self.custom)]


def _metric(name: Any, fn: Any) -> Metric:
    if name in (None, "<lambda>"):
        raise ValueError(
            f"cannot name the metric {fn!r}; pass metrics={{'name': fn}} for a lambda, "
            "a functools.partial or a module instance"
        )
    if not isinstance(name, str) or not name or name in BUILTIN_METRICS:
        raise ValueError(
            f"a callable metric needs a non-empty name other than the built-ins "
            f"{list(BUILTIN_METRICS)}, got {name!r}; rename it with metrics={{'name': fn}}"
        )
    if not callable(fn):
        raise TypeError(f"metric {name!r} must be callable as fn(outputs, targets)")
    reduction = getattr(fn, "reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"metric {name!r} has reduction={reduction!r}; it must return a scalar per "
            "batch, reduced by 'mean' or 'sum'"
        )
    return Metric(name, fn, reduction == "mean")


def resolve_metrics(metrics: MetricsArg) -> MetricSet:
    """Parse ``metrics=``: ``None``, a name, a callable, a sequence of those, or a mapping.

    ``None`` means the loss plus accuracy when the task is classification (as
    :meth:`Objective.evaluate`). Strings name built-ins (``"loss"``, ``"accuracy"``); a
    callable is stored under its ``__name__``; a mapping gives ``{name: callable}``.

    Raises:
        ValueError: an unknown name, a nameless callable (a lambda, a ``functools.partial``,
            a module instance: pass a mapping), a name used twice or a built-in's name.
        TypeError: a mapping value that is not callable.
    """
    if metrics is None:
        return MetricSet("auto")
    if isinstance(metrics, Mapping):
        builtins, named = [], list(metrics.items())
    else:
        given = [metrics] if isinstance(metrics, str) or callable(metrics) else list(metrics)
        builtins = [m for m in given if isinstance(m, str)]
        named = [(getattr(m, "__name__", None), m) for m in given if not isinstance(m, str)]
    unknown = [b for b in builtins if b not in BUILTIN_METRICS]
    if unknown:
        raise ValueError(
            f"unknown metrics {unknown}; choose from {list(BUILTIN_METRICS)} or pass callables"
        )
    custom = tuple(_metric(name, fn) for name, fn in named)
    names = [m.name for m in custom]
    if len(set(names)) != len(names):
        raise ValueError(f"two metrics share a name in {names}; pass a mapping to rename them")
    return MetricSet("yes" if "accuracy" in builtins else "no", custom)


def weighted(value: Any, n: int, mean: bool, what: str) -> Tensor:
    """``w_b * value`` with w_b = n_b for a mean, 1 for a sum (as the Objective weights)."""
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError(f"{what} must return a scalar tensor per batch; use a reduced one")
    value = value.reshape(())
    return value * n if mean else value


def stack_weighted(values: list[Any], n: int, mean: bool, what: str) -> Tensor:
    """``stack(values) * n_b`` (mean) or ``stack(values)`` (sum): element by element the
    same products as :func:`weighted`."""
    if not all(isinstance(v, Tensor) and v.numel() == 1 for v in values):
        raise ValueError(f"{what} must return a scalar tensor per batch; use a reduced one")
    if any(v.dim() for v in values):
        values = [v.reshape(()) for v in values]
    stacked = torch.stack(values)
    return stacked * n if mean else stacked


class Sums:
    """Per-point float64 sums (rows: loss, hits, callable metrics), the sample count and
    whether every batch so far was classification."""

    def __init__(self, metrics: MetricSet, num_points: int, device: torch.device) -> None:
        rows = 2 + len(metrics.custom)
        self.totals = torch.zeros(rows, num_points, device=device, dtype=torch.float64)
        self.count = 0
        self.classify = metrics.accuracy != "no"


def finish(objective: Objective, metrics: MetricSet, sums: Sums, *, reduce: bool):
    """Sum over ranks (``reduce``) and divide by N: the metric values of a chunk.

    The mean scale is applied as ``S * (1.0 / N)`` and accuracy as ``hits / N``, the
    operations :meth:`Objective.loss` and :meth:`Objective.evaluate` perform.

    Raises:
        ValueError: the data held no samples (on any rank), or accuracy was requested for
            a task that is not classification.
    """
    totals, count, classify = sums.totals, sums.count, sums.classify
    if reduce:  # one collective per chunk: the sums, the sample count, a classification vote
        extra = [float(count), float(not classify)]
        packed = torch.cat([totals.reshape(-1), totals.new_tensor(extra)])
        torch.distributed.all_reduce(packed)
        totals = packed[:-2].view_as(totals)
        count, classify = int(packed[-2].item()), bool(packed[-1].item() == 0)
    if count == 0:
        raise ValueError("data is empty: it yielded no samples")
    if metrics.accuracy == "yes" and not classify:
        raise ValueError(
            "metric 'accuracy' needs a classification task (2-D outputs and integer targets)"
        )
    scale = 1.0 / count
    mean = objective.reduction == "mean"
    out = {"loss": totals[0] * scale if mean else totals[0].clone()}
    if "accuracy" in metrics.names(classify):
        out["accuracy"] = totals[1] / torch.tensor(float(count), device=totals.device)
    for row, m in enumerate(metrics.custom, start=2):
        out[m.name] = totals[row] * scale if m.mean else totals[row].clone()
    return out
