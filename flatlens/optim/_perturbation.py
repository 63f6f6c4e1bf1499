"""The machinery SAM and GAM share: a base optimizer driven through a closure at nearby points.

Both optimizers wrap a *base* optimizer (SGD, AdamW, ...) and run several forward-backward
passes per step through a closure, at points near the current parameters theta, then hand one
combined direction to the base optimizer as the gradient. The parameters always come back to
theta bit for bit (they are copied back, not un-perturbed by subtraction), also when a pass
raises.

SAM (Foret et al., ICLR 2021), with g = grad L(theta)::

    e = rho * g / (||g|| + eps)                            (plain)
    e = rho * w^2 * g / (||w * g|| + eps)                  (adaptive, ASAM; w = theta, elementwise)
    theta <- base_step(theta, grad L(theta + e))

Under DistributedDataParallel (pass the DDP module as ``model=``) every pass runs inside
``model.no_sync()`` and the optimizer does the reductions itself, as all-reduce averages
over ranks of one flat buffer:

* ``perturbations="per_rank"`` (default, as the GAM authors' code): each rank perturbs with
  its own gradients and computes its own direction d_r; one all-reduce per step hands
  (1/W) sum_r d_r to the base optimizer.
* ``perturbations="synchronized"``: every pass's gradient (and every HVP) is averaged over
  the ranks before it is used, so with equal shards a step equals the one-process step on
  the union of the ranks' batches. One all-reduce per pass.

A step never leaves non-finite parameters behind silently: a perturbed point, the final
direction or the base optimizer's update that is not finite raises
:class:`~flatlens.core.NonFiniteLossError` with the parameters as they were before the step
(with a GradScaler, non-finite gradients skip the step instead, as the scaler does). The
optimizers copy (``copy.deepcopy``) and pickle, and a state dict records which optimizer
wrote it, so another optimizer's state is refused.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from flatlens.core._checks import check_nonnegative
from flatlens.core._errors import NonFiniteLossError
from flatlens.distributed import all_reduce_mean
from flatlens.optim._finite import (
    _all_finite,
    _NonFinitePoint,
    check_closure,
    check_graph,
    non_finite_message,
)
from flatlens.optim._lightning_closure import _check_lightning
from flatlens.optim._vectors import _dot, _param_groups

__all__ = ["Closure", "PerturbationOptimizer", "Perturbations"]


Closure = Callable[..., Any]
Perturbations = Literal["per_rank", "synchronized"]


class _Overflow(Exception):
    """A pass produced non-finite gradients while a GradScaler is in use."""

    def __init__(self, grads: list[Tensor | None]) -> None:
        super().__init__("non-finite gradients")
        self.grads = grads


@dataclass
class _Comm:
    """How a step under DistributedDataParallel reduces: over ``group``, each pass
    (``synchronized``) or the final direction only (per-rank perturbations)."""

    group: Any
    synchronized: bool


@dataclass
class _Pass:
    """One forward-backward pass: the closure's loss, unscaled detached gradients (None for a
    parameter the pass did not reach) and, for HVPs, the gradients that still hold a graph."""

    loss: Any
    grads: list[Tensor | None]
    graph: list[Tensor | None] | None = None


# ------------------------------------------------------------------------ shared base class
class PerturbationOptimizer(Optimizer):
    """Base class of optimizers that evaluate gradients at perturbed points before a base step.

    Subclasses implement :meth:`_direction`, which runs passes with ``run(...)``, moves the
    parameters with :meth:`_move` and returns the first pass's loss and the direction to hand
    to the base optimizer. This class owns everything else: the base optimizer, parameter
    restore, BatchNorm statistics, GradScaler handling and state dicts.

    ``param_groups``, ``state`` and ``defaults`` are the base optimizer's own (looked up on
    each access), so LR schedulers can be attached to either, and ``lr`` set on one is set on
    both.
    """

    _HYPERPARAMETERS: tuple[str, ...] = ()
    _KIND = "PerturbationOptimizer"  # recorded in state dicts; each optimizer sets its own

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: Optimizer | type[Optimizer],
        *,
        model: nn.Module | None,
        eps: float,
        grad_scaler: torch.amp.GradScaler | None,
        base_kwargs: dict[str, Any],
        perturbations: Perturbations = "per_rank",
    ) -> None:
        groups = _param_groups(params)
        name = type(self).__name__
        if isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            if issubclass(base_optimizer, PerturbationOptimizer):
                raise TypeError(f"{name} cannot wrap another {base_optimizer.__name__}")
            base = base_optimizer(groups, **base_kwargs)
        elif isinstance(base_optimizer, Optimizer):
            if isinstance(base_optimizer, PerturbationOptimizer):
                raise TypeError(f"{name} cannot wrap another {type(base_optimizer).__name__}")
            if base_kwargs:
                raise TypeError(
                    f"unexpected keyword arguments {sorted(base_kwargs)}: settings such as lr "
                    f"belong to the base optimizer; pass them to its constructor, or pass the "
                    f"optimizer class (e.g. torch.optim.SGD) and {name} builds it with them"
                )
            given = {id(p) for g in groups for p in g["params"]}
            owned = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
            if given != owned:
                raise ValueError(
                    f"params and base_optimizer's parameters differ ({len(given)} vs "
                    f"{len(owned)} tensors); build the base optimizer over the same parameters"
                )
            base = base_optimizer
        else:
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer instance or class, not "
                f"{type(base_optimizer).__name__}"
            )
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, not {type(model).__name__}")
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError("grad_scaler must be a torch.amp.GradScaler or None")
        if perturbations not in ("per_rank", "synchronized"):
            raise ValueError(
                f"perturbations must be 'per_rank' or 'synchronized', not {perturbations!r}"
            )
        self.eps = check_nonnegative("eps", eps)
        self.perturbations = perturbations
        self._comm: _Comm | None = None
        super().__init__([p for g in groups for p in g["params"]], {})
        self.base_optimizer = base
        self.model = model
        self.grad_scaler = grad_scaler
        self._graph_checked = False

    # ------------------------------------------------------------------ copy and pickle
    # torch.optim.Optimizer pickles only defaults, state and param_groups, which here are
    # the base optimizer's (looked up through it): the copy would lack the base optimizer
    # itself. The whole instance dict is its state.
    def __getstate__(self) -> dict[str, Any]:
        # A method replaced on the instance (a framework's hook around step) would, copied,
        # still call the original optimizer: the copy gets the class's method back.
        cls = type(self)
        state = {
            k: v
            for k, v in self.__dict__.items()
            if not (callable(v) and callable(getattr(cls, k, None)))
        }
        state["_comm"] = None  # a process group belongs to this process only
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_graph_checked", False)

    # ------------------------------------------------------------------ torch.optim API
    # param_groups, state and defaults are the base optimizer's, looked up on every access:
    # its load_state_dict() replaces its param_groups list, and a copy taken here would
    # keep pointing at the old one.
    def _delegate(name: str) -> property:
        def get(self: PerturbationOptimizer) -> Any:
            base = self.__dict__.get("base_optimizer")
            return getattr(base, name) if base is not None else self.__dict__["_own_" + name]

        def set_(self: PerturbationOptimizer, value: Any) -> None:
            base = self.__dict__.get("base_optimizer")
            if base is not None:
                setattr(base, name, value)
            else:
                self.__dict__["_own_" + name] = value

        return property(get, set_, doc=f"The base optimizer's ``{name}``.")

    param_groups = _delegate("param_groups")
    state = _delegate("state")
    defaults = _delegate("defaults")
    del _delegate

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (which shares its groups with this one)."""
        if "base_optimizer" not in self.__dict__:  # called from Optimizer.__init__
            super().add_param_group(param_group)
        else:
            self.base_optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (or drop) the gradients of every parameter."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def hyperparameters(self) -> dict[str, Any]:
        """This optimizer's own settings (the base optimizer keeps its own in its groups)."""
        return {name: getattr(self, name) for name in self._HYPERPARAMETERS}

    def _set_hyperparameters(self, values: dict[str, Any]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizer": "SAM" or "GAM", "base_optimizer": base.state_dict(),
        "hyperparameters": {...}}``.

        Holds only tensors and plain Python values, so it loads with
        ``torch.load(..., weights_only=True)``.
        """
        return {
            "optimizer": self._KIND,
            "base_optimizer": self.base_optimizer.state_dict(),
            "hyperparameters": self.hyperparameters(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict from :meth:`state_dict`, or a plain base-optimizer state dict.

        Raises:
            ValueError: The dict was saved from another optimizer (SAM's into GAM or the
                reverse): its ``"optimizer"`` entry names another, or (a dict from before
                that entry) its settings are not exactly this optimizer's.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, not {type(state_dict).__name__}")
        if "base_optimizer" in state_dict:
            hyper = state_dict.get("hyperparameters") or {}
            name = type(self).__name__
            kind = state_dict.get("optimizer")
            if kind is not None and kind != self._KIND:
                raise ValueError(
                    f"state_dict was saved from {kind}, not {self._KIND}: it is another "
                    f"optimizer's state, which {name} cannot continue"
                )
            unknown = set(hyper) - set(self._HYPERPARAMETERS)
            missing = set(self._HYPERPARAMETERS) - set(hyper) if kind is None and hyper else ()
            if unknown or missing:
                what = (
                    f"settings {sorted(unknown)} that {name} does not have"
                    if unknown
                    else f"none of {name}'s settings {sorted(missing)}"
                )
                raise ValueError(f"state_dict holds {what}: it was saved from another optimizer")
            self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
            if hyper:
                self._set_hyperparameters({**self.hyperparameters(), **hyper})
        elif "state" in state_dict and "param_groups" in state_dict:
            self.base_optimizer.load_state_dict(state_dict)
        else:
            raise ValueError(
                "state_dict is neither from this optimizer's state_dict() nor a base "
                "optimizer's (no 'base_optimizer' or 'state'/'param_groups' keys)"
            )

    def __repr__(self) -> str:
        settings = ", ".join(
            f"{k}={v!r}" for k, v in self.hyperparameters().items() if v is not None
        )
        return f"{type(self).__name__}({type(self.base_optimizer).__name__}, {settings})"

    # ------------------------------------------------------------------ the step
    @property
    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _check_closure(self, closure: Closure | None, *, create_graph: bool = False) -> Closure:
        """See :func:`~flatlens.optim._finite.check_closure`; Lightning's closure is checked
        (and, under the mixin, adapted) first."""
        name = type(self).__name__
        if closure is not None and callable(closure):
            closure = _check_lightning(name, closure, create_graph)
        return check_closure(name, closure, create_graph=create_graph)

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:  # type: ignore[override]
        """Run the passes, restore the parameters, and take one base-optimizer step.

        Args:
            closure: Zeroes the gradients, runs forward and backward, returns the loss. It is
                called several times per step (see the class docstring), each time at
                different parameter values. Gradients left by one call are taken over by the
                optimizer before the next, so they never accumulate across calls.

        Returns:
            The loss returned by the first call (at the unperturbed parameters), detached.
        """
        closure = self._check_closure(closure, create_graph=self._needs_graph())
        params = self._params
        theta = [p.detach().clone() for p in params]
        device = params[0].device
        buffers: list[tuple[Tensor, Tensor]] = []
        scale = self.grad_scaler.get_scale() if self._scaling() else None
        first: list[Any] = []
        ddp = self.model if isinstance(self.model, DistributedDataParallel) else None
        comm = (
            None if ddp is None else _Comm(ddp.process_group, self.perturbations == "synchronized")
        )
        self._comm = comm  # read by _reduced() during the passes

        def run(*, create_graph: bool = False) -> _Pass:
            with torch.enable_grad():
                loss = closure(create_graph=True) if create_graph else closure()
            if not first:
                first.append(loss.detach() if isinstance(loss, Tensor) else loss)
                if self.model is not None:
                    buffers.extend((b, b.detach().clone()) for b in self.model.buffers())
            raw = [p.grad for p in params]
            for p in params:  # take the gradients over: the next pass starts from None
                p.grad = None
            if create_graph and not self._graph_checked:
                self._check_graph(raw)
            graph = raw if create_graph else None
            grads = [None if g is None else g.detach() for g in raw]
            if scale is not None:
                grads = [None if g is None else g / scale for g in grads]
            return _Pass(loss, self._reduced(grads, device), graph)

        direction: list[Tensor | None] | None = None
        try:
            with warnings.catch_warnings(), ddp.no_sync() if ddp else contextlib.nullcontext():
                # Exact mode asks the closure for backward(create_graph=True); the reference
                # cycle PyTorch warns about is broken because run() sets every .grad to None.
                warnings.filterwarnings(
                    "ignore", message=r"Using backward\(\) with create_graph=True"
                )
                direction = self._direction(run, theta, device)
        except _Overflow as err:  # let the scaler see the non-finite values and skip the step
            direction = err.grads
        except _NonFinitePoint:
            raise NonFiniteLossError(
                self._non_finite("perturbation", first[0] if first else None)
            ) from None
        finally:
            self._comm = None
            for p, t in zip(params, theta, strict=True):
                p.copy_(t)
            for b, saved in buffers:  # the first pass's running statistics
                b.copy_(saved)
        if comm is not None and not comm.synchronized:
            # Per-rank perturbations: the one all-reduce of the step. A rank whose passes
            # overflowed sends non-finite values, so every rank's scaler skips the step.
            direction = all_reduce_mean(direction, like=params, group=comm.group)

        scaling = self.grad_scaler is not None and self.grad_scaler.is_enabled()
        if not scaling and not _all_finite(direction):
            raise NonFiniteLossError(self._non_finite("direction", first[0]))
        for p, d in zip(params, direction, strict=True):
            if d is not None:
                p.grad = d * scale if scale is not None else d
        if scaling:
            self.grad_scaler.step(self.base_optimizer)
        else:
            self._base_step(theta)
        return first[0]

    def _base_step(self, theta: Sequence[Tensor], method: str = "step") -> None:
        """The base optimizer's step; parameters it makes non-finite are restored to
        ``theta`` (their values before the step) and the step raises."""
        self.base_optimizer.step()
        params = self._params
        if not _all_finite(params):
            with torch.no_grad():
                for p, t in zip(params, theta, strict=True):
                    p.copy_(t)
            raise NonFiniteLossError(self._non_finite("update", None, method))

    def _non_finite(self, what: str, loss: Any, method: str = "step") -> str:
        """See :func:`~flatlens.optim._finite.non_finite_message`."""
        lrs = [g["lr"] for g in self.param_groups if "lr" in g]
        return non_finite_message(
            f"{type(self).__name__}.{method}", what, loss, self.hyperparameters(), lrs
        )

    def _check_graph(self, grads: Sequence[Tensor | None]) -> None:
        """See :func:`~flatlens.optim._finite.check_graph`; once it passed, not again."""
        check_graph(type(self).__name__, grads)
        self._graph_checked = True

    def _scaling(self) -> bool:
        return self.grad_scaler is not None and self.grad_scaler.is_enabled()

    def _reduced(self, vecs: list[Tensor | None], device: torch.device) -> list[Tensor | None]:
        """Average a pass's gradients (or an HVP) over the ranks when perturbations are
        synchronized; with a GradScaler, raise :class:`_Overflow` on non-finite values.

        Per-rank passes under DDP never raise: every rank must run the same passes (DDP's
        forward may communicate), so the non-finite values travel to the final all-reduce.
        """
        comm = self._comm
        if comm is not None and comm.synchronized:
            vecs = all_reduce_mean(vecs, like=self._params, group=comm.group)
        if self._scaling() and (comm is None or comm.synchronized):
            if not torch.isfinite(_dot(vecs, vecs, device)):
                raise _Overflow(vecs)
        return vecs

    def _needs_graph(self) -> bool:
        return False

    @torch.no_grad()
    def _move(self, theta: Sequence[Tensor], *steps: Sequence[Tensor | None]) -> list[Tensor]:
        """Set the parameters to theta + sum(steps) and return the new values (copies).

        Raises:
            _NonFinitePoint: the new point is not finite (the parameters are not moved).
                Not under DDP with per-rank perturbations, where every rank must run the
                same passes: there the final direction, reduced over the ranks, is checked.
        """
        out = []
        for i, t in enumerate(theta):
            value = t
            for s in steps:
                if s[i] is not None:
                    value = value + s[i].to(t.dtype)
            out.append(value if value is not t else t.clone())
        comm = self._comm
        if (comm is None or comm.synchronized) and not _all_finite(out):
            raise _NonFinitePoint
        for p, value in zip(self._params, out, strict=True):
            p.copy_(value)
        return out

    def _hvp(self, result: _Pass, vector: Sequence[Tensor | None]) -> list[Tensor | None]:
        """Hessian-vector product H v from a pass run with ``create_graph=True``."""
        params = self._params
        assert result.graph is not None
        outputs, grad_outputs = [], []
        for g, v in zip(result.graph, vector, strict=True):
            if g is not None and g.requires_grad and v is not None:
                outputs.append(g)
                grad_outputs.append(v.to(g.dtype))
        if not outputs:
            return self._reduced([None] * len(params), params[0].device)
        with torch.enable_grad():
            hv = torch.autograd.grad(outputs, params, grad_outputs, allow_unused=True)
        result.graph = None  # frees the graph
        out = [None if h is None else h.detach() for h in hv]
        if self._scaling():
            inv = 1.0 / self.grad_scaler.get_scale()
            out = [None if h is None else h * inv for h in out]
        return self._reduced(out, params[0].device)

    def _direction(
        self, run: Callable[..., _Pass], theta: list[Tensor], device: torch.device
    ) -> list[Tensor | None]:
        """Run the passes (``run()``, first at theta) and return the base step's gradient."""
        raise NotImplementedError
