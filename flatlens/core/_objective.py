"""The empirical risk over a fixed data set: the only way a measure touches a model.

For a data set split into batches B_1, ..., B_m with weights w_b (by default the batch
sizes n_b; a ``batch_weight`` such as the token count of a padded language-model batch)
and W = sum_b w_b,

* mean-reduced loss:  L(theta) = (1/W) * sum_b w_b * loss(B_b; theta)
* sum-reduced loss:   L(theta) = sum_b loss(B_b; theta)

so uneven and padded batches are weighted exactly. ``gradient`` returns grad L and ``hvp(v)`` the
Hessian-vector product (grad^2 L) v, both as flat vectors over the selected parameters.
Every evaluation goes through :func:`torch.func.functional_call` with parameters taken from a
flat vector, so the model itself is never written to and any point ``theta + delta`` can be
evaluated by passing ``at=``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from flatlens.core import _data
from flatlens.core._data import BatchWeight
from flatlens.core._derivatives import DerivativesMixin, HVPMethod
from flatlens.core._errors import DataChangedError, NonFiniteLossError
from flatlens.core._interop import InteropMixin
from flatlens.core._params import ParamSpace, ParamSpec, eval_mode, select_parameters
from flatlens.core._sharding import ShardLayout

__all__ = ["DataChangedError", "Objective"]


class Objective(InteropMixin, DerivativesMixin):
    """Empirical risk L(theta) of ``loss_fn(model(inputs), targets)`` over a fixed data set.

    Args:
        model: The network. It is never modified: parameters are read, not written.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, mean- or sum-reduced over the batch.
        data: A ``DataLoader``, any re-iterable of batches, or one batch. A batch is an
            ``(inputs, targets)`` pair, inputs being a tensor (``model(x)``), a tuple or list
            (``model(*x)``) or a mapping (``model(**x)``), or a mapping such as a Hugging
            Face batch whose ``targets_key`` entry holds the targets and whose other
            entries are the model's keyword inputs. Outputs reach ``loss_fn`` as the model
            returns them. The data must yield the same batches on every pass.
        params: Which parameters span the space (names, module prefixes, modules or
            tensors; see :func:`flatlens.core.select_parameters`). Default: all that
            require grad.
        device: Expected device of the model; defaults to the parameters' device. Batches on
            the CPU are moved there; batches on another accelerator are an error.
        reduction: ``"mean"`` or ``"sum"``; inferred from ``loss_fn.reduction`` when it has
            one, else ``"mean"``.
        eval_mode: Evaluate with every module in eval mode (BatchNorm running statistics,
            dropout off). The model's own flags are restored after each call.
        hvp_method: ``"double_backward"`` (reverse-over-reverse), ``"forward_over_reverse"``
            (``torch.func.jvp`` of ``torch.func.grad``), ``"finite_difference"`` (central
            differences of gradients, two gradients per product, for models autograd cannot
            differentiate twice; see :mod:`flatlens.core._difference`) or ``"auto"``:
            double backward, switching to differences when it raises or when the check
            below fails. ``hvp_method_used`` and ``hvp_note`` say what was used and why.
        cache_graph: Keep the first-order graph between HVPs at the same point, so each HVP
            costs one extra backward pass instead of a forward and two backward passes.
            Memory grows with the data (the saved activations of every batch are kept).
            ``None`` decides at the first second-order call: cache when the graph of the
            first batch, measured with ``saved_tensors_hooks`` and scaled to all the data,
            fits ``memory_budget``; never for a DataLoader (its batches stream).
        memory_budget: Bytes the cached graph may take (``None``: half the memory free on
            the device when the choice is made).
        batch_weight: ``batch_weight(inputs, targets) -> number`` w_b, how much a batch
            counts in the mean (default: its length). For a loss averaged over the
            non-ignored tokens of each batch, count those tokens
            (:func:`flatlens.core.token_count`): L, its gradient and HVPs are then exact
            over padded, uneven batches.
        targets_key: The targets entry of mapping batches (Hugging Face: ``"labels"``).
        check_determinism: Before the first evaluation, compute the loss twice and raise
            :class:`DataChangedError` when the passes disagree (random augmentation, dropout
            left on, a shuffled uneven loader is fine).
        check_hvp: Compare the first exact product with gradient differences along the
            same vector (one extra pair of gradients, once per model: later objectives over
            the same model reuse the verdict). Autograd silently leaves out the second
            derivative of an operation whose backward is ``@once_differentiable`` (custom
            ``autograd.Function`` s, fused kernels); when that is found, ``"auto"`` switches
            to difference products and says so, an explicit exact method raises
            :class:`~flatlens.core.HVPCheckError`. ``False`` skips the check.
        distributed: Sum the per-rank contributions with ``torch.distributed.all_reduce``
            so each rank sees the loss over all ranks' data. ``None`` detects an initialized
            process group.

    Raises:
        NonFiniteLossError: (from any evaluation) the loss is NaN or infinite.
    """

    layout: ShardLayout | None = None  # where the local entries sit, for a sharded model

    def __new__(cls, model: Any = None, *args: Any, **kwargs: Any) -> Objective:
        # A fully_shard-ed (FSDP2) model gets the sharded objective (core/_sharded.py).
        if cls is Objective:
            from flatlens.core._sharded import ShardedObjective, is_fully_sharded

            if is_fully_sharded(model):
                return super().__new__(ShardedObjective)
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        data: Any,
        *,
        params: ParamSpec | Iterable[ParamSpec] | None = None,
        device: torch.device | str | None = None,
        reduction: Literal["mean", "sum"] | None = None,
        eval_mode: bool = True,
        hvp_method: HVPMethod = "auto",
        cache_graph: bool | None = None,
        check_determinism: bool = True,
        distributed: bool | None = None,
        memory_budget: float | None = None,
        batch_weight: BatchWeight | None = None,
        targets_key: str = "labels",
        check_hvp: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(outputs, targets)")
        self.model = model
        self.loss_fn = loss_fn
        if batch_weight is not None and not callable(batch_weight):
            raise TypeError("batch_weight must be callable as batch_weight(inputs, targets)")
        self.batch_weight = batch_weight
        self.targets_key = targets_key
        _data.check_model(model)
        _data.check_data(data, targets_key)
        named = select_parameters(model, params)
        self.space = ParamSpace.from_named(named)
        self._params = [p for _, p in named]
        dev = {p.device for p in self._params}
        dtypes = {p.dtype for p in self._params}
        if len(dev) != 1 or len(dtypes) != 1:
            raise ValueError(
                f"selected parameters must share one device and dtype, found {dev} and {dtypes}"
            )
        self.device = next(iter(dev))
        self.dtype = next(iter(dtypes))
        if device is not None and torch.device(device) != self.device:
            raise ValueError(
                f"device={device!r} but the model's parameters are on {self.device}; "
                f"move the model first with model.to({str(device)!r})"
            )
        if reduction is None:
            reduction = getattr(loss_fn, "reduction", "mean")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
        self.reduction = reduction
        self.eval_mode = eval_mode
        self.counts = {"loss": 0, "gradient": 0, "hvp": 0, "difference_gradients": 0}
        self._setup_products(hvp_method, check_hvp)

        if distributed is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and not (
            torch.distributed.is_available() and torch.distributed.is_initialized()
        ):
            raise ValueError(
                "distributed=True but no torch.distributed process group is initialized; "
                "launch with torchrun and call torch.distributed.init_process_group first"
            )
        self.distributed = bool(distributed)

        if _data.is_single_batch(data, targets_key):
            self._data: Any = [self._prepared(data)]
        elif isinstance(data, list | tuple):
            if not data and not self.distributed:
                # Under torch.distributed an empty shard is allowed (every rank must reach
                # the collectives); empty data over all ranks is caught after the reduction.
                raise ValueError("data is empty: pass at least one (inputs, targets) batch")
            self._data = [self._prepared(b, i) for i, b in enumerate(data)]
        else:
            self._data = data
        if hvp_method == "finite_difference" and cache_graph is None:
            cache_graph = False  # difference products need no second-order graph
        self._setup_caching(cache_graph, memory_budget, in_memory=isinstance(self._data, list))
        self._settings = {
            "reduction": self.reduction,
            "eval_mode": eval_mode,
            "hvp_method": hvp_method,
            "cache_graph": cache_graph,
            "distributed": self.distributed,
            "memory_budget": memory_budget,
            "batch_weight": batch_weight,
            "targets_key": targets_key,
            "check_hvp": check_hvp,
        }

        self._frozen = {n: p for n, p in model.named_parameters() if n not in set(self.space.names)}
        self._checked = not check_determinism
        self.num_samples: float | None = None

    # ------------------------------------------------------------------ basic facts
    @property
    def num_params(self) -> int:
        """Dimension of the parameter space (scalars in the selected parameters)."""
        return self.space.dim

    @property
    def theta(self) -> Tensor:
        """The model's current selected parameters as one flat vector (a copy)."""
        with torch.no_grad():
            return self.space.flatten(self._params)

    def zeros(self) -> Tensor:
        """A zero flat vector on the objective's device and dtype."""
        return torch.zeros(self.num_params, device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ data
    def _prepared(self, batch: Any, index: int | None = None) -> tuple[Any, Any, float]:
        """``(inputs, targets, w_b)`` of one batch, on the model's device."""
        x, y = _data.split_batch(batch, index, self.targets_key)
        x, y = _data.move(x, self.device, self.dtype), _data.move(y, self.device, self.dtype)
        return x, y, _data.weight_of(self.batch_weight, x, y)

    def batches(self) -> Iterator[tuple[Any, Any, float]]:
        """Yield ``(inputs, targets, w_b)`` on the model's device, one data pass; batches of
        weight 0 are skipped."""
        in_memory = isinstance(self._data, list)
        for batch in self._data:
            x, y, w = batch if in_memory else self._prepared(batch)
            if w == 0:
                continue
            yield x, y, w

    # ------------------------------------------------------------------ model calls
    def forward(self, theta: Tensor, inputs: Any) -> Any:
        """Model outputs at the flat parameters ``theta`` (the model is not written to).

        ``inputs`` reach the model as ``model(x)``, ``model(*x)`` for a tuple or list, and
        ``model(**x)`` for a mapping.
        """
        values = self.space.as_dict(theta)
        if not self.eval_mode:
            # Train-mode BatchNorm writes its running statistics: give it copies.
            values.update({n: b.clone() for n, b in self.model.named_buffers()})
        values.update({n: p.detach() for n, p in self._frozen.items()})
        args, kwargs = _data.call_args(inputs)
        return functional_call(self.model, values, args, kwargs, tie_weights=True, strict=False)

    def _batch_loss(self, theta: Tensor, x: Any, y: Any, n: float) -> Tensor:
        """``w_b * loss(B_b; theta)`` for mean reduction, ``loss(B_b; theta)`` for sum."""
        return self._weighted(self.loss_fn(self.forward(theta, x), y), n)

    def _weighted(self, loss: Any, n: float) -> Tensor:
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar tensor; use a reduced loss")
        loss = loss.reshape(())
        return loss * n if self.reduction == "mean" else loss

    def _finish(self, total: Tensor, parts: list[Tensor], count: float, *vecs: Tensor):
        """Reduce across ranks, divide by W, check the loss is finite."""
        stacked = torch.stack(parts) if parts else total.new_zeros(0)
        if self.distributed:
            import torch.distributed as dist

            counter = torch.tensor([float(count)], device=self.device, dtype=torch.float64)
            dist.all_reduce(counter)
            count = counter.item()
            dist.all_reduce(total)
            for v in vecs:
                dist.all_reduce(v)
        if count == 0:
            # Checked after the reduction, so a rank with an empty shard does not leave the
            # other ranks waiting in all_reduce.
            raise ValueError("data is empty: it yielded no samples (or every batch weighs 0)")
        value = total.item()
        if not math.isfinite(value):
            self._raise_if_weights_not_finite()
            bad = torch.nonzero(~torch.isfinite(stacked)).flatten()
            where = f"batch {int(bad[0])}" if bad.numel() else "another rank's batch"
            raise NonFiniteLossError(
                f"the loss is {value} (first non-finite at {where} of the data); "
                "check the weights and inputs for NaN/inf, or lower the perturbation"
            )
        self.num_samples = count
        scale = 1.0 / count if self.reduction == "mean" else 1.0
        if scale != 1.0:
            for v in vecs:
                v.mul_(scale)
        return value * scale

    def _raise_if_weights_not_finite(self) -> None:
        """Name the first parameter holding NaN or inf (the usual cause of a NaN loss)."""
        for name, param in zip(self.space.names, self._params, strict=True):
            if not bool(torch.isfinite(param.detach()).all()):
                raise NonFiniteLossError(
                    f"the model's weights are not finite: parameter {name!r} holds NaN or "
                    "inf, so the loss is too; load a checkpoint from before training diverged"
                )

    def point(self, at: Tensor | None = None) -> Tensor:
        """The flat parameter vector to evaluate: ``at`` (checked) or the model's current one."""
        if at is None:
            return self.theta
        if not isinstance(at, Tensor) or at.shape != (self.num_params,):
            raise ValueError(f"`at` must be a flat tensor of length {self.num_params}")
        if at.device != self.device:
            raise ValueError(f"`at` is on {at.device}, the model on {self.device}")
        return at.detach().to(self.dtype)

    def _ensure_checked(self, theta: Tensor | None = None, *, graph: bool = False) -> float | None:
        """Before the first evaluation, compute L twice and raise if the two passes differ.

        Args:
            theta: Where to evaluate (default: the model's parameters): the point of the
                call that triggered the check.
            graph: The call builds the cached first-order graph at ``theta`` anyway (an HVP,
                a gradient): its forward pass is then the first of the two, so the check
                costs one forward pass instead of two.

        Returns:
            L at ``theta`` from a plain pass (what :meth:`loss` would compute) when the
            check ran two of them, else ``None``.
        """
        if self._checked:
            return None
        point = self.theta if theta is None else theta
        if graph and self.cache_graph:
            first = self._cached_graph(point)[1]
            second = self._loss(point)
            self.counts["loss"] -= 1
            plain = None
        else:
            first, second = self._loss(point), self._loss(point)
            self.counts["loss"] -= 2
            plain = second
        rtol = 1e-5 if self.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-10
        if not math.isclose(first, second, rel_tol=rtol, abs_tol=1e-30):
            self._graph = None
            raise DataChangedError(
                f"two passes over the same data gave different losses ({first!r} vs "
                f"{second!r}): the data or the model is random (augmentation, shuffling of "
                "non-deterministic transforms, dropout left on with eval_mode=False). Use "
                "fixed batches, or pass check_determinism=False if this is intended"
            )
        self._checked = True
        return plain

    # ------------------------------------------------------------------ L, grad L, H v
    @torch.no_grad()
    def _loss(self, theta: Tensor) -> float:
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        parts, count = [], 0
        with eval_mode(self.model, self.eval_mode):
            for x, y, n in self.batches():
                part = self._batch_loss(theta, x, y, n)
                parts.append(part)
                total += part
                count += n
        self.counts["loss"] += 1
        return self._finish(total, parts, count)

    def loss(self, at: Tensor | None = None) -> float:
        """L(theta), or L(at) for a flat parameter vector ``at``."""
        theta = self.point(at)
        checked = self._ensure_checked(theta)
        if checked is None:
            return self._loss(theta)
        self.counts["loss"] += 1  # the check's second pass was this evaluation
        return checked

    @torch.no_grad()
    def evaluate(self, at: Tensor | None = None) -> dict[str, float]:
        """Loss and, for classification (2-D outputs, integer targets), accuracy in one pass.

        Returns:
            ``{"loss": L}`` plus ``"accuracy"`` (fraction of argmax predictions equal to the
            targets over all samples) when the task is classification.
        """
        theta = self.point(at)
        self._ensure_checked(theta)
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.float64)
        examples = torch.zeros((), device=self.device, dtype=torch.float64)
        parts, count, classify = [], 0, True
        with eval_mode(self.model, self.eval_mode):
            for x, y, n in self.batches():
                out = self.forward(theta, x)
                part = self._weighted(self.loss_fn(out, y), n)
                parts.append(part)
                total += part
                count += n
                classify = classify and _data.is_classification(out, y)
                if classify:
                    correct += (out.argmax(dim=-1) == y).sum()
                    examples += y.shape[0]
        self.counts["loss"] += 1
        if classify and self.distributed:
            import torch.distributed as dist

            dist.all_reduce(correct)
            dist.all_reduce(examples)
        result = {"loss": self._finish(total, parts, count)}
        if classify:
            result["accuracy"] = float(correct) / float(examples)
        return result

    def evaluate_points(
        self,
        points: Tensor,
        metrics: Any = ("loss",),
        *,
        method: Literal["auto", "serial", "vmap"] = "auto",
        chunk_size: int | None = None,
        local: bool = False,
    ) -> dict[str, Tensor]:
        """L(theta_k) and other metrics at many points theta_k, one data pass per chunk.

        Each point's loss is what :meth:`loss` computes there (the same weighting by batch
        size, float64 accumulation and division by N; bit for bit with ``"serial"``), but a
        point where the loss is NaN or infinite keeps that value instead of raising: far
        from a minimum, a landscape may legitimately overflow. Each point counts as one
        evaluation in ``counts["loss"]``. The model is never written to.

        Args:
            points: ``(C, num_params)`` flat parameter vectors on the objective's device.
            metrics: Besides the loss, which is always returned: ``"accuracy"`` (fraction
                of argmax predictions equal to integer targets; an error unless the task is
                classification) and callables ``m(outputs, targets) -> scalar tensor``,
                stored under their ``__name__`` or given as ``{name: m}``. Per batch, m_b is
                combined like a mean-reduced loss, (1/N) sum_b n_b m_b, or as sum_b m_b when
                ``m.reduction == "sum"``. ``None``: the loss, plus accuracy when every batch
                is classification (as :meth:`evaluate`).
            method: ``"serial"`` (one forward per point, through a private copy of the model
                kept between calls), ``"vmap"`` (``torch.func.vmap`` over each chunk) or
                ``"auto"``: vmap on accelerators, serial on the CPU; a vmap failure on the
                first chunk then warns and falls back to serial.
            chunk_size: Points per data pass; default 16 for serial, from a memory estimate
                for vmap.
            local: With a distributed objective, evaluate this rank's data alone, with no
                collective (to split the points, not the data, across ranks). The
                determinism check before an objective's first evaluation stays collective.

        Returns:
            ``{name: float64 tensor of shape (C,)}`` on the objective's device: ``"loss"``,
            then the metrics in the order given.

        Raises:
            ValueError: bad points, method, chunk size or metrics; accuracy for a task that
                is not classification; data without samples.
        """
        from flatlens.core._points import PointEvaluation

        job = PointEvaluation(
            self, points, metrics, method=method, chunk_size=chunk_size, local=local
        )
        self._ensure_checked()
        values = job.run()
        self.counts["loss"] += job.num_points
        return values

    def replace(
        self, *, params: ParamSpec | Iterable[ParamSpec] | None = None, data: Any = None, **settings
    ) -> Objective:
        """The same risk with other parameters, data or settings, everything else kept.

        ``params`` selects a subset of the space (the others are held at their values:
        the child's Hessian is the diagonal block H_bb); ``data`` replaces the data (default:
        the same batches, shared, not copied); ``settings`` override constructor keywords
        (``cache_graph``, ``distributed``, ...). The child runs no determinism check of its
        own: this objective's covers the same data; pass ``check_determinism=True`` for new
        data that needs one.
        """
        kwargs = {**self._settings, "check_determinism": False, **settings}
        if data is None:
            in_memory = isinstance(self._data, list)
            data = [(x, y) for x, y, _ in self._data] if in_memory else self._data
            kwargs["targets_key"] = self.targets_key
        names = list(self.space.names) if params is None else params
        child = type(self)(self.model, self.loss_fn, data, params=names, **kwargs)
        if "hvp_method" not in settings:
            child._inherit_products(self)
        return child

    def __repr__(self) -> str:
        return (
            f"Objective(num_params={self.num_params}, device={self.device}, "
            f"dtype={self.dtype}, reduction={self.reduction!r}, eval_mode={self.eval_mode})"
        )


# help() and IDEs show __init__'s parameters, not those of the dispatching __new__.
Objective.__signature__ = inspect.signature(
    Objective.__init__
).replace(  # type: ignore[attr-defined]
    parameters=list(inspect.signature(Objective.__init__).parameters.values())[1:]
)
