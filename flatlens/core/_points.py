"""The risk and other metrics at many parameter points: the engine of ``Objective.evaluate_points``.

For points theta_k and batches B_b of sizes n_b (N = sum_b n_b), one data pass per chunk of
points gives L(theta_k) = (1/N) sum_b n_b loss(B_b; theta_k) (sum_b loss(B_b; theta_k) for a
summed loss), the accuracy (1/N) sum_b #{i in B_b : argmax f(x_i; theta_k) = y_i}, and for a
callable metric m the mean (1/N) sum_b n_b m(B_b; theta_k), or sum_b m(B_b; theta_k) when
``m.reduction == "sum"``. The terms are formed in the model's dtype and summed in float64 in
batch order, as :meth:`Objective.loss` does (bit for bit on the serial path).

* :class:`VmapEvaluator`: per batch, one :func:`torch.func.vmap` over the chunk of
  :meth:`Objective.forward`.
* :class:`SerialEvaluator`: per batch, one plain forward per point through a private deep
  copy of the model whose selected parameters view one flat buffer: the next point is one
  ``copy_`` away and the forward pays no ``functional_call`` overhead. :meth:`Objective.forward`
  is used instead when the model cannot be deep-copied, a subclass overrides ``forward``,
  or in train mode.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from flatlens.core._checks import check_positive_int
from flatlens.core._data import call_args, is_classification
from flatlens.core._objective import Objective
from flatlens.core._params import eval_mode

__all__ = [
    "BUILTIN_METRICS",
    "MetricSet",
    "PointEvaluation",
    "SerialEvaluator",
    "VmapEvaluator",
    "chunk_size_for",
    "per_point_bytes",
    "preferred_method",
    "resolve_metrics",
]

BUILTIN_METRICS = ("loss", "accuracy")
MetricFn = Callable[[Any, Any], Tensor]
MetricsArg = str | MetricFn | Sequence[str | MetricFn] | Mapping[str, MetricFn] | None
Method = Literal["auto", "serial", "vmap"]
SERIAL_CHUNK = 16
"""Default points per data pass of the serial evaluator."""


# ---------------------------------------------------------------------------- metrics
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


def _weighted(value: Any, n: int, mean: bool, what: str) -> Tensor:
    """``w_b * value`` with w_b = n_b for a mean, 1 for a sum (as the Objective weights)."""
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError(f"{what} must return a scalar tensor per batch; use a reduced one")
    value = value.reshape(())
    return value * n if mean else value


def _stack_weighted(values: list[Any], n: int, mean: bool, what: str) -> Tensor:
    """``stack(values) * n_b`` (mean) or ``stack(values)`` (sum): element by element the
    same products as :func:`_weighted`."""
    if not all(isinstance(v, Tensor) and v.numel() == 1 for v in values):
        raise ValueError(f"{what} must return a scalar tensor per batch; use a reduced one")
    if any(v.dim() for v in values):
        values = [v.reshape(()) for v in values]
    stacked = torch.stack(values)
    return stacked * n if mean else stacked


class _Sums:
    """Per-point float64 sums (rows: loss, hits, callable metrics), the sample count and
    whether every batch so far was classification."""

    def __init__(self, metrics: MetricSet, num_points: int, device: torch.device) -> None:
        rows = 2 + len(metrics.custom)
        self.totals = torch.zeros(rows, num_points, device=device, dtype=torch.float64)
        self.count = 0
        self.classify = metrics.accuracy != "no"


# ---------------------------------------------------------------------------- evaluators
class _Evaluator:
    """Calling one with a ``(C, n)`` chunk of points returns their :class:`_Sums`."""

    def __init__(self, objective: Objective, metrics: MetricSet) -> None:
        self.objective = objective
        self.metrics = metrics

    def __call__(self, thetas: Tensor) -> _Sums:
        with torch.no_grad(), eval_mode(self.objective.model, self.objective.eval_mode):
            return self._run(thetas)

    def _run(self, thetas: Tensor) -> _Sums:
        raise NotImplementedError


class VmapEvaluator(_Evaluator):
    """Sums at a chunk of points with ``torch.func.vmap`` over :meth:`Objective.forward`."""

    name = "vmap"

    def _run(self, thetas: Tensor) -> _Sums:
        obj, custom = self.objective, self.metrics.custom
        mean = obj.reduction == "mean"
        sums = _Sums(self.metrics, len(thetas), obj.device)
        for x, y, n in obj.batches():
            state = {"classify": sums.classify}

            def point(theta: Tensor, x=x, y=y, n=n, state=state) -> tuple[Tensor, ...]:
                out = obj.forward(theta, x)
                state["classify"] = state["classify"] and is_classification(out, y)
                hits = (
                    (out.argmax(dim=-1) == y).sum()
                    if state["classify"]
                    else torch.zeros((), device=obj.device)
                )
                return (
                    _weighted(obj.loss_fn(out, y), n, mean, "loss_fn"),
                    hits,
                    *(_weighted(m.fn(out, y), n, m.mean, f"metric {m.name!r}") for m in custom),
                )

            values = torch.func.vmap(point, randomness="error")(thetas)
            sums.classify = state["classify"]
            for row, value in enumerate(values):
                sums.totals[row] += value
            sums.count += n
        return sums


_COPIES: weakref.WeakKeyDictionary[Objective, _WorkingCopy] = weakref.WeakKeyDictionary()
"""Each objective's serial working copy, kept between calls and refreshed at each."""


class _WorkingCopy:
    """A deep copy of the model in eval mode whose selected parameters view one flat buffer."""

    def __init__(self, objective: Objective) -> None:
        self.base = copy.deepcopy(objective.model)
        self.buf = objective.theta
        params = dict(self.base.named_parameters())
        for p in params.values():
            p.grad = None
        for name, sl, shape in objective.space.segments():
            params[name].data = self.buf[sl].view(shape)
        self.base.requires_grad_(False)
        self.base.eval()
        self.module = self.base

    def refresh(self, objective: Objective) -> bool:
        """Copy the model's buffers and unselected parameters in (they may have changed
        since the last call); False when the model's structure no longer matches."""
        selected = set(objective.space.names)
        mine = {**dict(self.base.named_buffers()), **dict(self.base.named_parameters())}
        theirs = dict(objective.model.named_buffers())
        theirs.update((n, p) for n, p in objective.model.named_parameters() if n not in selected)
        if not all(
            n in mine and mine[n].shape == t.shape and mine[n].dtype == t.dtype
            for n, t in theirs.items()
        ):
            return False
        with torch.no_grad():
            for name, t in theirs.items():
                mine[name].copy_(t)
        return True


def _working_copy(objective: Objective) -> _WorkingCopy | None:
    if not objective.eval_mode or type(objective).forward is not Objective.forward:
        return None
    work = _COPIES.get(objective)
    if work is not None and work.refresh(objective):
        return work
    try:
        work = _WorkingCopy(objective)
    except Exception:  # models holding locks, process groups, open files, ...
        return None
    _COPIES[objective] = work
    return work


class SerialEvaluator(_Evaluator):
    """Sums at a chunk of points, one forward per point (the reference and CPU path)."""

    name = "serial"

    def __init__(self, objective: Objective, metrics: MetricSet, *, use_copy: bool = True):
        super().__init__(objective, metrics)
        self._work = _working_copy(objective) if use_copy else None

    @property
    def uses_copy(self) -> bool:
        """Whether the private-copy path is in use."""
        return self._work is not None

    def _run(self, thetas: Tensor) -> _Sums:
        # The per-point loop is kept lean (a small model's forward takes well under a
        # millisecond): no per-point checks or reshapes, one stack per batch and metric.
        obj, custom = self.objective, self.metrics.custom
        module = None if self._work is None else self._work.module
        buf = None if self._work is None else self._work.buf
        points = thetas.unbind(0)
        sums = _Sums(self.metrics, len(points), obj.device)
        for x, y, n in obj.batches():
            losses, hits, extra = [], [], [[] for _ in custom]
            for k, theta in enumerate(points):
                if module is None:
                    out = obj.forward(theta, x)
                else:
                    buf.copy_(theta)
                    args, kwargs = call_args(x)
                    out = module(*args, **kwargs)
                losses.append(obj.loss_fn(out, y))
                if k == 0:
                    sums.classify = sums.classify and is_classification(out, y)
                if sums.classify:
                    hits.append((out.argmax(dim=-1) == y).sum())
                for values, m in zip(extra, custom, strict=True):
                    values.append(m.fn(out, y))
            sums.totals[0] += _stack_weighted(losses, n, obj.reduction == "mean", "loss_fn")
            if sums.classify and hits:
                sums.totals[1] += torch.stack(hits).to(obj.device)
            for row, (values, m) in enumerate(zip(extra, custom, strict=True), start=2):
                if values:
                    sums.totals[row] += _stack_weighted(values, n, m.mean, f"metric {m.name!r}")
            sums.count += n
        return sums


# ---------------------------------------------------------------------------- choices
def preferred_method(objective: Objective) -> str:
    """What ``method="auto"`` runs: ``"vmap"`` on accelerators, where one batched call per
    chunk keeps the device busy; ``"serial"`` on the CPU, where batched matrix products and
    their larger working set measured slower than one forward per point."""
    return "serial" if objective.device.type == "cpu" else "vmap"


def per_point_bytes(objective: Objective, theta: Tensor) -> int:
    """Rough memory one vmapped point needs: the outputs of every leaf module on the first
    batch (an upper bound on what inference keeps alive) plus three parameter vectors."""
    total = 0

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        for t in output if isinstance(output, tuple | list) else (output,):
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()

    leaves = [m for m in objective.model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad(), eval_mode(objective.model, objective.eval_mode):
            for x, _, _ in objective.batches():
                out = objective.forward(theta, x)
                if total == 0 and isinstance(out, Tensor):
                    total = out.numel() * out.element_size()
                break
    finally:
        for h in handles:
            h.remove()
    return total + 3 * objective.num_params * theta.element_size()


def chunk_size_for(objective: Objective, theta: Tensor, num_points: int) -> int:
    """Points per vmapped call: as many as fit half the free accelerator memory (1 GiB on
    the CPU), at most 256 on an accelerator and 16 on the CPU (larger chunks' activations
    fall out of the CPU caches)."""
    per_point = max(per_point_bytes(objective, theta), 1)
    if objective.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(objective.device)
        budget, cap = free // 2, 256
    else:
        budget, cap = 1 << 30, 16
    return int(max(1, min(cap, num_points, budget // per_point)))


# ---------------------------------------------------------------------------- one call
class PointEvaluation:
    """One call of :meth:`Objective.evaluate_points`: checked arguments, then :meth:`run`.

    The constructor only checks the arguments (no data pass), so that the Objective can
    raise on bad arguments before its first-use determinism check.
    """

    def __init__(
        self,
        objective: Objective,
        points: Tensor,
        metrics: MetricsArg,
        *,
        method: Method,
        chunk_size: int | None,
        local: bool,
    ) -> None:
        n = objective.num_params
        if not isinstance(points, Tensor) or points.dim() != 2 or points.shape[1] != n:
            raise ValueError(
                f"points must be a (C, {n}) tensor, one flat parameter vector per row; got "
                f"{type(points).__name__} of shape {tuple(getattr(points, 'shape', ()))}"
            )
        if points.device != objective.device:
            raise ValueError(f"points are on {points.device}, the model on {objective.device}")
        if method not in ("auto", "vmap", "serial"):
            raise ValueError(f"method must be 'auto', 'vmap' or 'serial', not {method!r}")
        if chunk_size is not None:
            chunk_size = check_positive_int("chunk_size", chunk_size)
        self.objective = objective
        self.points = points.detach().to(objective.dtype)
        self.metrics = resolve_metrics(metrics)
        self.method = method
        self.chunk_size = chunk_size
        self.reduce = objective.distributed and not local

    @property
    def num_points(self) -> int:
        """C, the number of points."""
        return int(self.points.shape[0])

    def run(self) -> dict[str, Tensor]:
        """Evaluate every point; ``{name: float64 tensor (C,)}`` on the objective's device."""
        obj = self.objective
        if self.num_points == 0:
            empty = torch.zeros(0, device=obj.device, dtype=torch.float64)
            return {m: empty.clone() for m in self.metrics.names(classify=False)}
        method = preferred_method(obj) if self.method == "auto" else self.method
        chunk = self.chunk_size
        if chunk is None:
            chunk = (
                chunk_size_for(obj, self.points[0], self.num_points)
                if method == "vmap"
                else SERIAL_CHUNK
            )
            if self.reduce:  # every rank must make the same collective calls
                agreed = torch.tensor([chunk], device=obj.device)
                torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
                chunk = int(agreed.item())
        evaluator = self._evaluator(method)
        parts = []
        with torch.no_grad(), eval_mode(obj.model, obj.eval_mode):
            for start in range(0, self.num_points, chunk):
                thetas = self.points[start : start + chunk]
                try:
                    sums = evaluator(thetas)
                except Exception as err:
                    if not (self.method == "auto" and method == "vmap" and start == 0):
                        raise
                    warnings.warn(
                        f"vmap evaluation failed ({type(err).__name__}: {err}); "
                        "falling back to the serial loop",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    method, evaluator = "serial", self._evaluator("serial")
                    sums = evaluator(thetas)
                parts.append(_finish(obj, self.metrics, sums, reduce=self.reduce))
        return {m: torch.cat([p[m] for p in parts]) for m in parts[0]}

    def _evaluator(self, method: str) -> _Evaluator:
        if method == "vmap":
            return VmapEvaluator(self.objective, self.metrics)
        return SerialEvaluator(self.objective, self.metrics)


def _finish(objective: Objective, metrics: MetricSet, sums: _Sums, *, reduce: bool):
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
