"""The Objective of a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each rank holds rows [r c, (r + 1) c) of every parameter's first dimension (c = ceil(d_0 /
world), FSDP2's ``Shard(0)``). The flat vectors of this objective are this rank's rows,
concatenated: about n / world entries, never the whole vector. Its
:class:`~flatlens.core._sharding.ShardLayout` says where they sit in the global flat
vector, so the measures sum inner products over the ranks and draw the same random
vectors as one process.

* L(theta): the model is called as it is (FSDP gathers each layer's parameters for its
  forward and frees them after); every rank evaluates its own batches and the weighted
  sums are all-reduced, as for a data-parallel Objective.
* grad L(theta): one backward per batch; FSDP reduce-scatters, so each rank receives its
  rows of the gradient summed over the ranks (times 1/world, undone here).
* H v: double backward does not run through FSDP2 (its hooks free what the second
  backward needs), so products are central differences of gradients
  (:mod:`flatlens.core._difference`): rows of H v, from rows of v.

Evaluating at another point writes this rank's rows into the parameters for the pass and
writes the original bits back afterwards (and FSDP's gathered copies are freed, so no
stale value is reused); gradients the model held before are put back too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flatlens.core import _data
from flatlens.core._data import BatchWeight
from flatlens.core._objective import Objective
from flatlens.core._params import ParamSpace, ParamSpec, eval_mode
from flatlens.core._sharding import ShardLayout
from flatlens.core._sums import dot64

__all__ = ["ShardedObjective", "is_fully_sharded"]


def is_fully_sharded(model: Any) -> bool:
    """Whether some parameter of ``model`` is a DTensor (a ``fully_shard`` ed model)."""
    if not isinstance(model, nn.Module) or not dist.is_available():
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _layout(named: list[tuple[str, Any]], world: int, rank: int) -> ShardLayout:
    """Where this rank's rows of each parameter sit in the global flat vector."""
    from torch.distributed.tensor import Shard

    segments = []
    offset = 0
    for name, p in named:
        if tuple(p.placements) != (Shard(0),) or p.device_mesh.ndim != 1:
            raise ValueError(
                f"parameter {name!r} is sharded as {tuple(p.placements)} on a "
                f"{p.device_mesh.ndim}-D mesh; flatlens measures FSDP2's default "
                "(Shard(0) on one mesh dimension): call fully_shard without a 2-D mesh"
            )
        shape = tuple(p.shape)
        rows = shape[0] if shape else 1
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        chunk = -(-rows // world)
        first = min(rank * chunk, rows)
        local = p.detach().to_local()
        if shape and local.shape[0] != max(0, min(chunk, rows - first)):
            raise ValueError(f"parameter {name!r}: unexpected local shard {tuple(local.shape)}")
        if local.numel():
            segments.append((offset + first * row, local.numel()))
        offset += math.prod(shape) if shape else 1
    return ShardLayout(tuple(segments), offset, None)


class ShardedObjective(Objective):
    """An :class:`~flatlens.Objective` over a ``fully_shard`` ed model (built by
    ``Objective(model, ...)`` when the model's parameters are DTensors).

    The arguments are those of :class:`~flatlens.Objective`, with these differences:
    every parameter that requires grad spans the space (``params`` must be ``None``), the
    products come from gradient differences (``hvp_method`` ``"auto"`` or
    ``"finite_difference"``), the graph is never cached, and every rank must pass at least
    one batch (its own shard of the data, or the same data on every rank). ``num_params``
    is this rank's number of entries; ``layout.global_size`` is n.
    """

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
        hvp_method: str = "auto",
        cache_graph: bool | None = None,
        check_determinism: bool = True,
        distributed: bool | None = None,
        memory_budget: float | None = None,
        batch_weight: BatchWeight | None = None,
        targets_key: str = "labels",
        check_hvp: bool = True,
    ) -> None:
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(outputs, targets)")
        if params is not None:
            raise ValueError(
                "a fully_shard-ed model is measured over all its trainable parameters: "
                "leave params=None (freeze the others with requires_grad_(False))"
            )
        if hvp_method not in ("auto", "finite_difference"):
            raise ValueError(
                f"hvp_method={hvp_method!r} needs double backward, which does not run "
                "through fully_shard (FSDP2); pass hvp_method='finite_difference' or 'auto'"
            )
        if cache_graph:
            raise ValueError("cache_graph=True: a sharded model's products keep no graph")
        if distributed is False:
            raise ValueError("a fully_shard-ed model is distributed: leave distributed=None")
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("a fully_shard-ed model needs its torch.distributed process group")
        self.model, self.loss_fn = model, loss_fn
        if batch_weight is not None and not callable(batch_weight):
            raise TypeError("batch_weight must be callable as batch_weight(inputs, targets)")
        self.batch_weight, self.targets_key = batch_weight, targets_key
        _data.check_data(data, targets_key)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("no parameter of the model requires grad")
        from torch.distributed.tensor import DTensor

        plain = [n for n, p in named if not isinstance(p, DTensor)]
        if plain:
            raise ValueError(
                f"parameters {plain[:3]} are not sharded: call fully_shard on the model "
                "(the root) as well as on its layers"
            )
        self._params = [p for _, p in named]
        self._locals = [p.detach().to_local() for p in self._params]
        pieces = [(n, t) for (n, _), t in zip(named, self._locals, strict=True)]
        self.space = ParamSpace.from_named(pieces)
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.layout = _layout(named, self.world, self.rank)
        self.device = self._locals[0].device
        self.dtype = self._locals[0].dtype
        if device is not None and torch.device(device) != self.device:
            raise ValueError(f"device={device!r} but the model's shards are on {self.device}")
        reduction = reduction or getattr(loss_fn, "reduction", "mean")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
        self.reduction, self.eval_mode, self.distributed = reduction, eval_mode, True
        if _data.is_single_batch(data, targets_key):
            self._data: Any = [self._prepared(data)]
        elif isinstance(data, list | tuple):
            self._data = [self._prepared(b, i) for i, b in enumerate(data)]
        else:
            self._data = data
        self.counts = {"loss": 0, "gradient": 0, "hvp": 0, "difference_gradients": 0}
        self._setup_products("finite_difference", False)
        self.hvp_method = hvp_method
        if hvp_method == "auto":
            self.hvp_note = "a fully_shard-ed model: products from gradient differences"
        self.cache_graph, self._graph, self.memory_budget = False, None, memory_budget
        self._settings = {"reduction": reduction, "eval_mode": eval_mode}
        self._frozen = {}
        self._checked = not check_determinism
        self.num_samples = None

    # ------------------------------------------------------------------ vectors
    @property
    def theta(self) -> Tensor:
        """This rank's rows of the parameters, as one flat vector (a copy)."""
        with torch.no_grad():
            return torch.cat([t.reshape(-1) for t in self._locals])

    def _norm(self, x: Tensor) -> float:
        part = torch.tensor([dot64(x, x, reduce=False)], dtype=torch.float64, device=x.device)
        dist.all_reduce(part)
        return math.sqrt(max(float(part), 0.0))

    def _dot(self, a: Tensor, b: Tensor) -> float:
        part = torch.tensor([dot64(a, b, reduce=False)], dtype=torch.float64, device=a.device)
        dist.all_reduce(part)
        return float(part)

    # ------------------------------------------------------------------ passes
    @contextmanager
    def _at(self, theta: Tensor) -> Iterator[None]:
        """Run the block with this rank's rows of the parameters set to ``theta``; the
        original bits come back afterwards, FSDP's gathered copies are freed."""
        saved = [t.clone() for t in self._locals]
        grads = [p.grad for p in self._params]
        modules = _fsdp_modules(self.model)
        try:
            with torch.no_grad():
                for t, part in zip(self._locals, self.space.unflatten(theta), strict=True):
                    t.copy_(part)
            for m in modules:
                m.reshard()
            for p in self._params:
                p.grad = None
            yield
        finally:
            for m in modules:
                m.reshard()
            with torch.no_grad():
                for t, s in zip(self._locals, saved, strict=True):
                    t.copy_(s)
            for p, g in zip(self._params, grads, strict=True):
                p.grad = g

    def _rounds(self) -> list[tuple[Any, Any, float]]:
        """This rank's batches, padded (repeating the first with weight 0) to the largest
        count of any rank: FSDP's collectives need the same passes on every rank."""
        mine = list(self.batches())
        count = torch.tensor([len(mine)], device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        if not mine:
            raise ValueError(
                "this rank has no batch: with a fully_shard-ed model every rank needs at least "
                "one (its shard of the data, or the same data on every rank)"
            )
        x0, y0, _ = mine[0]
        return mine + [(x0, y0, 0.0)] * (int(count.item()) - len(mine))

    def _call(self, x: Any) -> Any:
        args, kwargs = _data.call_args(x)
        return self.model(*args, **kwargs)

    def _loss(self, theta: Tensor) -> float:
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        parts, count = [], 0.0
        with self._at(theta), torch.no_grad(), eval_mode(self.model, self.eval_mode):
            for x, y, n in self._rounds():
                part = self._weighted(self.loss_fn(self._call(x), y), n).to(torch.float64)
                if n == 0:
                    part = part * 0.0
                parts.append(part)
                total += part
                count += n
        self.counts["loss"] += 1
        return self._finish(total, parts, count)

    def _streamed_gradient(self, theta: Tensor) -> tuple[float, Tensor]:
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        parts, count = [], 0.0
        with self._at(theta), eval_mode(self.model, self.eval_mode):
            for x, y, n in self._rounds():
                part = self._weighted(self.loss_fn(self._call(x), y), n)
                if n == 0:
                    part = part * 0.0
                part.backward()
                parts.append(part.detach().to(torch.float64))
                total += parts[-1]
                count += n
            grad = torch.cat(
                [
                    (p.grad.to_local() if p.grad is not None else torch.zeros_like(t)).reshape(-1)
                    for p, t in zip(self._params, self._locals, strict=True)
                ]
            ).to(self.dtype)
        value = self._finish(total, parts, count)
        # FSDP averaged the ranks' gradients; the Objective sums them, then divides by W.
        scale = self.world / (self.num_samples if self.reduction == "mean" else 1.0)
        return value, grad.mul_(scale)

    # ------------------------------------------------------------------ not available
    def forward(self, theta: Tensor, inputs: Any) -> Any:
        raise NotImplementedError(
            "a fully_shard-ed model is evaluated through the model itself, not at arbitrary "
            "points by functional_call; use loss(at=...) and gradient(at=...)"
        )

    def evaluate_points(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            "evaluate_points does not run on a fully_shard-ed model; evaluate landscapes on "
            "an unsharded copy, or call loss(at=...) point by point"
        )

    def as_linear_operator(self, at: Tensor | None = None):
        raise NotImplementedError("a sharded Hessian has no single-process SciPy operator")

    def replace(self, **kwargs: Any) -> Objective:
        raise NotImplementedError(
            "replace() (blocks, per-batch measures) does not run on a fully_shard-ed model"
        )

    def _copy_in_dtype(self, dtype: torch.dtype) -> Objective:
        raise NotImplementedError("a sharded model is not copied to float64")

    def __repr__(self) -> str:
        return (
            f"ShardedObjective(local {self.num_params} of {self.layout.global_size} "
            f"parameters, rank {self.rank}/{self.world}, dtype={self.dtype})"
        )
