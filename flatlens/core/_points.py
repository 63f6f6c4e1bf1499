"""The risk and other metrics at many parameter points: the engine of ``Objective.evaluate_points``
and of the landscape's grids.

Points come as a ``(C, n)`` tensor or as :class:`AffinePoints`, the family
theta + sum_j c_kj d_j of a line's or plane's grid, which the serial path generates one point
at a time in place (no ``(C, n)`` matrix). The metrics are combined over batches as
:mod:`flatlens.core._metrics` describes, in float64 and in batch order, as
:meth:`Objective.loss` does (bit for bit on the serial path).

* :class:`VmapEvaluator`: per batch, one :func:`torch.func.vmap` over the chunk of
  :meth:`Objective.forward`.
* :class:`SerialEvaluator`: per batch, one plain forward per point through a private deep
  copy of the model whose selected parameters view one flat buffer: the next point is
  written into that buffer and the forward pays no ``functional_call`` overhead.
  :meth:`Objective.forward` is used instead when the model cannot be deep-copied, a subclass
  overrides ``forward``, or in train mode.
* :class:`PointSession`: the set-up of a run of chunks (metrics, method, evaluator, the
  working copy's refresh) done once, so a landscape pays it once per grid, not per chunk.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from typing import Any, Literal

import torch
from torch import Tensor, nn

from flatlens.core._affine import AffinePoints, WriteBuffers, as_rows
from flatlens.core._checks import check_positive_int
from flatlens.core._data import call_args, is_classification
from flatlens.core._metrics import (
    BUILTIN_METRICS,
    MetricsArg,
    MetricSet,
    Sums,
    finish,
    resolve_metrics,
    stack_weighted,
    weighted,
)
from flatlens.core._objective import Objective
from flatlens.core._params import eval_mode

__all__ = [
    "BUILTIN_METRICS",
    "AffinePoints",
    "MetricSet",
    "MetricsArg",
    "PointEvaluation",
    "PointSession",
    "SerialEvaluator",
    "VmapEvaluator",
    "chunk_size_for",
    "per_point_bytes",
    "preferred_method",
    "resolve_metrics",
]

Method = Literal["auto", "serial", "vmap"]
SERIAL_CHUNK = 16
"""Default points per data pass of the serial evaluator."""
IN_PLACE_MAX_BATCHES = 3
"""Up to this many in-memory batches the serial path writes each affine point into the
working copy per batch (one or two vector operations) instead of materializing the chunk
once (about four, plus one copy per batch)."""


# ---------------------------------------------------------------------------- evaluators
class _Evaluator:
    """Calling one with a chunk of C points returns their :class:`Sums`."""

    needs_eval_mode = True  # evaluates through the caller's model, not a private copy

    def __init__(self, objective: Objective, metrics: MetricSet) -> None:
        self.objective = objective
        self.metrics = metrics

    def __call__(self, points: Tensor | AffinePoints) -> Sums:
        obj = self.objective
        with torch.no_grad():
            if not self.needs_eval_mode:
                return self._run(points)
            with eval_mode(obj.model, obj.eval_mode):
                return self._run(points)

    def _run(self, points: Tensor | AffinePoints) -> Sums:
        raise NotImplementedError


class VmapEvaluator(_Evaluator):
    """Sums at a chunk of points with ``torch.func.vmap`` over :meth:`Objective.forward`."""

    name = "vmap"

    def _run(self, points: Tensor | AffinePoints) -> Sums:
        obj, custom = self.objective, self.metrics.custom
        thetas = as_rows(points)
        mean = obj.reduction == "mean"
        sums = Sums(self.metrics, len(thetas), obj.device)
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
                    weighted(obj.loss_fn(out, y), n, mean, "loss_fn"),
                    hits,
                    *(weighted(m.fn(out, y), n, m.mean, f"metric {m.name!r}") for m in custom),
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


def _in_memory_batches(objective: Objective) -> int | None:
    data = objective._data
    return len(data) if isinstance(data, list) else None


class SerialEvaluator(_Evaluator):
    """Sums at a chunk of points, one forward per point (the reference and CPU path).

    The working copy is refreshed from the model once, when the evaluator is made: one
    evaluator serves the chunks of one call (or of one landscape grid).
    """

    name = "serial"

    def __init__(self, objective: Objective, metrics: MetricSet, *, use_copy: bool = True):
        super().__init__(objective, metrics)
        self._work = _working_copy(objective) if use_copy else None
        self.needs_eval_mode = self._work is None
        batches = _in_memory_batches(objective)
        self._in_place = (
            self._work is not None and batches is not None and batches <= IN_PLACE_MAX_BATCHES
        )
        self._buffers: WriteBuffers | None = None

    @property
    def uses_copy(self) -> bool:
        """Whether the private-copy path is in use."""
        return self._work is not None

    def _setters(self, points: Tensor | AffinePoints):
        """``(count, set_point)``: ``set_point(k)`` makes point k current and returns the
        flat parameters to pass to :meth:`Objective.forward` (None on the copy path)."""
        work = self._work
        if isinstance(points, AffinePoints) and self._in_place:
            if self._buffers is None:
                self._buffers = WriteBuffers(work.buf)
            write, buf = points.writer(self._buffers), work.buf

            def set_affine(k: int) -> None:
                write(k, buf)

            return len(points), set_affine
        rows = as_rows(points).unbind(0)
        if work is None:
            return len(rows), rows.__getitem__
        buf = work.buf

        def set_row(k: int) -> None:
            buf.copy_(rows[k])

        return len(rows), set_row

    def _run(self, points: Tensor | AffinePoints) -> Sums:
        # The per-point loop is kept lean (a small model's forward takes well under a
        # millisecond): no per-point checks or reshapes, one stack per batch and metric.
        # The private copy runs under inference mode (no version counters or view tracking:
        # the same arithmetic with less bookkeeping per operation); the sums stay normal
        # tensors, added to outside it.
        obj, custom = self.objective, self.metrics.custom
        module = None if self._work is None else self._work.module
        mode = torch.no_grad if module is None else torch.inference_mode
        count, set_point = self._setters(points)
        loss_fn, forward, mean = obj.loss_fn, obj.forward, obj.reduction == "mean"
        sums = Sums(self.metrics, count, obj.device)
        for x, y, n in obj.batches():
            losses, hits, extra = [], [], [[] for _ in custom]
            with mode():
                args, kwargs = call_args(x)
                for k in range(count):
                    theta = set_point(k)
                    out = forward(theta, x) if module is None else module(*args, **kwargs)
                    losses.append(loss_fn(out, y))
                    if k == 0:
                        sums.classify = sums.classify and is_classification(out, y)
                    if sums.classify:
                        hits.append((out.argmax(dim=-1) == y).sum())
                    for values, m in zip(extra, custom, strict=True):
                        values.append(m.fn(out, y))
                terms = [stack_weighted(losses, n, mean, "loss_fn")]
                if sums.classify and hits:
                    terms.append(torch.stack(hits).to(obj.device))
                terms += [
                    stack_weighted(values, n, m.mean, f"metric {m.name!r}") if values else None
                    for values, m in zip(extra, custom, strict=True)
                ]
            totals = sums.totals
            totals[0].add_(terms[0])
            if sums.classify and hits:
                totals[1].add_(terms[1])
            for row, term in enumerate(terms[-len(custom) :] if custom else [], start=2):
                if term is not None:
                    totals[row].add_(term)
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


# ---------------------------------------------------------------------------- sessions
class PointSession:
    """Evaluates chunk after chunk of points with one set-up (what one call of
    :meth:`Objective.evaluate_points` does per chunk, and a landscape per grid).

    Args:
        objective: The risk.
        metrics: As ``evaluate_points``' ``metrics``, or a resolved :class:`MetricSet`.
        method: ``"serial"`` or ``"vmap"`` (already resolved from ``"auto"``).
        fall_back: Should vmap fail on the first chunk, warn and evaluate serially from
            then on (``method="auto"`` that resolved to vmap).
        local: Evaluate this rank's data alone (no collective).
        count: Add each point to ``objective.counts["loss"]`` and run the objective's
            determinism check before the first chunk (a caller that does both itself, as
            ``evaluate_points`` does, passes False).
        stacklevel: Of the fall-back warning, counted from :meth:`evaluate`'s caller.
    """

    def __init__(
        self,
        objective: Objective,
        metrics: MetricsArg | MetricSet,
        method: str,
        *,
        fall_back: bool = False,
        local: bool = False,
        count: bool = True,
        stacklevel: int = 1,
    ) -> None:
        if method not in ("vmap", "serial"):
            raise ValueError(f"method must be 'vmap' or 'serial', not {method!r}")
        self.objective = objective
        self.metrics = metrics if isinstance(metrics, MetricSet) else resolve_metrics(metrics)
        self.method = method
        self.fall_back = fall_back and method == "vmap"
        self.reduce = objective.distributed and not local
        self.count = count
        self.stacklevel = stacklevel
        self.vmap_error: str | None = None
        self._evaluator: _Evaluator | None = None

    def _make(self, method: str) -> _Evaluator:
        if method == "vmap":
            return VmapEvaluator(self.objective, self.metrics)
        return SerialEvaluator(self.objective, self.metrics)

    def evaluate(self, points: Tensor | AffinePoints) -> dict[str, Tensor]:
        """``{name: float64 tensor (C,)}`` at the points of one chunk (one data pass)."""
        obj = self.objective
        if self.count:
            obj._ensure_checked()
        if self._evaluator is None:
            self._evaluator = self._make(self.method)
        try:
            sums = self._evaluator(points)
        except Exception as err:
            if not self.fall_back:
                raise
            warnings.warn(
                f"vmap evaluation failed ({type(err).__name__}: {err}); "
                "falling back to the serial loop",
                RuntimeWarning,
                stacklevel=self.stacklevel + 1,
            )
            self.vmap_error = f"{type(err).__name__}: {err}"
            self.method, self._evaluator = "serial", self._make("serial")
            sums = self._evaluator(points)
        self.fall_back = False
        values = finish(obj, self.metrics, sums, reduce=self.reduce)
        if self.count:
            obj.counts["loss"] += len(points)
        return values


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
        self.local = local
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
        session = PointSession(
            obj,
            self.metrics,
            method,
            fall_back=self.method == "auto",
            local=self.local,
            count=False,
            stacklevel=3,  # the caller of Objective.evaluate_points
        )
        parts = [
            session.evaluate(self.points[start : start + chunk])
            for start in range(0, self.num_points, chunk)
        ]
        return {m: torch.cat([p[m] for p in parts]) for m in parts[0]}
