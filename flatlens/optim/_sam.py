"""Sharpness-aware minimization (SAM) and the machinery that SAM and GAM share.

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
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from flatlens.core._checks import check_nonnegative
from flatlens.distributed import all_reduce_mean

__all__ = ["SAM", "PerturbationOptimizer"]

Closure = Callable[..., Any]
Perturbations = Literal["per_rank", "synchronized"]

_CLOSURE_EXAMPLE = """
    def closure():
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        return loss

    loss = optimizer.step(closure)"""


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


# ------------------------------------------------------------------------ vector helpers
def _acc_dtype(tensors: Sequence[Tensor | None]) -> torch.dtype:
    """float64 when any tensor is float64, else float32 (bf16/fp16 norms accumulate in fp32)."""
    return (
        torch.float64
        if any(t is not None and t.dtype == torch.float64 for t in tensors)
        else torch.float32
    )


def _dot(a: Sequence[Tensor | None], b: Sequence[Tensor | None], device: torch.device) -> Tensor:
    """sum_i <a_i, b_i> over parameters (None counts as zero), a 0-dim tensor on ``device``."""
    dtype = _acc_dtype([*a, *b])
    total = torch.zeros((), dtype=dtype, device=device)
    for x, y in zip(a, b, strict=True):
        if x is not None and y is not None:
            total += torch.sum(x.to(dtype) * y.to(dtype)).to(device)
    return total


def _norm(
    vecs: Sequence[Tensor | None],
    device: torch.device,
    weights: Sequence[Tensor] | None = None,
) -> Tensor:
    """||v|| = sqrt(sum_i ||v_i||^2), or ||w * v|| with elementwise |w_i| when ``weights``."""
    if weights is not None:
        vecs = [None if v is None else v * w.abs() for v, w in zip(vecs, weights, strict=True)]
    return torch.sqrt(_dot(vecs, vecs, device))


def _combine(coefs: Sequence[float | Tensor], vecs: Sequence[Sequence[Tensor | None]]):
    """sum_k c_k v_k, parameter by parameter (None where every v_k is None)."""
    out: list[Tensor | None] = []
    for parts in zip(*vecs, strict=True):
        acc: Tensor | None = None
        for c, v in zip(coefs, parts, strict=True):
            if v is None:
                continue
            term = v * (c.to(v.device, v.dtype) if isinstance(c, Tensor) else c)
            acc = term if acc is None else acc + term
        out.append(acc)
    return out


def _ascent(
    direction: Sequence[Tensor | None],
    radius: float,
    eps: float,
    device: torch.device,
    weights: Sequence[Tensor] | None = None,
) -> list[Tensor | None]:
    """The step of length ``radius`` along ``direction``: r d / (||d|| + eps), or, with
    ``weights`` w (adaptive), r w^2 d / (||w d|| + eps)."""
    scale = radius / (_norm(direction, device, weights) + eps)
    out: list[Tensor | None] = []
    for i, d in enumerate(direction):
        if d is None:
            out.append(None)
            continue
        step = d * scale.to(d.device, d.dtype)
        if weights is not None:
            step = step * weights[i].pow(2)
        out.append(step)
    return out


def _param_groups(params: Any) -> list[dict[str, Any]]:
    """Normalize ``params`` (tensors or param-group dicts) to a list of group dicts."""
    if isinstance(params, Tensor):
        raise TypeError(
            "params must be an iterable of tensors or of param-group dicts (e.g. "
            "model.parameters()), not a single tensor; wrap it in a list"
        )
    try:
        items = list(params)
    except TypeError as err:
        raise TypeError(
            f"params must be an iterable of tensors or param-group dicts, not "
            f"{type(params).__name__}"
        ) from err
    if not items:
        raise ValueError("params is empty: pass the parameters to optimize")
    if isinstance(items[0], dict):
        groups = []
        for group in items:
            if not isinstance(group, dict) or "params" not in group:
                raise TypeError("every param group must be a dict with a 'params' entry")
            group = dict(group)
            ps = group["params"]
            group["params"] = [ps] if isinstance(ps, Tensor) else list(ps)
            groups.append(group)
        return groups
    return [{"params": items}]


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
        """``{"base_optimizer": base.state_dict(), "hyperparameters": {...}}``.

        Holds only tensors and plain Python values, so it loads with
        ``torch.load(..., weights_only=True)``.
        """
        return {
            "base_optimizer": self.base_optimizer.state_dict(),
            "hyperparameters": self.hyperparameters(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict from :meth:`state_dict`, or a plain base-optimizer state dict."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, not {type(state_dict).__name__}")
        if "base_optimizer" in state_dict:
            hyper = state_dict.get("hyperparameters") or {}
            unknown = set(hyper) - set(self._HYPERPARAMETERS)
            if unknown:
                raise ValueError(
                    f"state_dict holds settings {sorted(unknown)} that {type(self).__name__} "
                    "does not have: it was saved from another optimizer"
                )
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
        name = type(self).__name__
        if closure is None:
            raise ValueError(
                f"{name}.step needs a closure that zeroes the gradients, runs the forward and "
                f"backward pass and returns the loss; it is called several times per step:"
                f"\n{_CLOSURE_EXAMPLE}"
            )
        if not callable(closure):
            raise TypeError(f"{name}.step: closure must be callable, not {type(closure)}")
        if create_graph:
            try:
                params = inspect.signature(closure).parameters.values()
            except (TypeError, ValueError):  # builtins without a signature
                params = []
            if not any(
                p.name == "create_graph" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params
            ):
                raise TypeError(
                    f"{name} in exact mode needs Hessian-vector products: the closure must "
                    "accept create_graph and pass it to backward, e.g.\n\n"
                    "    def closure(create_graph=False):\n"
                    "        optimizer.zero_grad()\n"
                    "        loss = loss_fn(model(inputs), targets)\n"
                    "        loss.backward(create_graph=create_graph)\n"
                    "        return loss"
                )
        return closure

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

        for p, d in zip(params, direction, strict=True):
            if d is not None:
                p.grad = d * scale if scale is not None else d
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            self.grad_scaler.step(self.base_optimizer)
        else:
            self.base_optimizer.step()
        return first[0]

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
        """Set the parameters to theta + sum(steps) and return the new values (copies)."""
        out = []
        for i, (p, t) in enumerate(zip(self._params, theta, strict=True)):
            value = t
            for s in steps:
                if s[i] is not None:
                    value = value + s[i].to(t.dtype)
            p.copy_(value)
            out.append(value if value is not t else t.clone())
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


# ------------------------------------------------------------------------ SAM
class SAM(PerturbationOptimizer):
    """Sharpness-aware minimization around any base optimizer, in the closure style.

    One step with g = grad L(theta) from ``closure()``::

        e = rho * g / (||g|| + eps)                        (adaptive: rho w^2 g / (||w g|| + eps))
        g_sam = grad L(theta + e)                          (second closure call)
        theta <- base_optimizer.step() with theta.grad = g_sam

    Two forward-backward passes per step. ``eps`` only guards against g = 0.

    Args:
        params: The parameters (or param-group dicts) to optimize.
        base_optimizer: An optimizer instance over the same parameters, or an optimizer class
            that is built as ``base_optimizer(params, **base_kwargs)``.
        rho: Radius of the ascent step, >= 0 (rho = 0 gives the base optimizer).
        adaptive: ASAM (Kwon et al., 2021): scale the ascent by w^2 elementwise and measure
            its length in the norm ||w g||, with w = the parameters.
        model: The network. When given, BatchNorm running statistics (all buffers) are
            updated by the first pass only; without it every pass updates them. Pass the
            ``DistributedDataParallel`` module to train across processes (see below).
        eps: Guard in the denominator.
        grad_scaler: A ``torch.amp.GradScaler`` for float16 training: each pass's gradients
            are unscaled, and a step in which any pass overflows is skipped (the scaler's
            ``update()`` then lowers the scale). See ``docs/optimizers.md``.
        perturbations: Under DDP (``model`` a ``DistributedDataParallel``): ``"per_rank"``
            (each rank ascends with its own gradient; the final gradients are averaged, one
            all-reduce per step) or ``"synchronized"`` (each pass's gradient is averaged
            first, one all-reduce per pass: the one-process step on the union batch).
            Ignored without DDP. See ``docs/distributed.md``.
        **base_kwargs: Settings of the base optimizer when it is passed as a class.

    Example::

        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        optimizer = SAM(model.parameters(), base, rho=0.05, model=model)

        def closure():
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        loss = optimizer.step(closure)
    """

    _HYPERPARAMETERS = ("rho", "adaptive", "eps")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: Optimizer | type[Optimizer],
        *,
        rho: float = 0.05,
        adaptive: bool = False,
        model: nn.Module | None = None,
        eps: float = 1e-12,
        grad_scaler: torch.amp.GradScaler | None = None,
        perturbations: Perturbations = "per_rank",
        **base_kwargs: Any,
    ) -> None:
        rho = check_nonnegative("rho", rho)
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be True or False, not {adaptive!r}")
        super().__init__(
            params,
            base_optimizer,
            model=model,
            eps=eps,
            grad_scaler=grad_scaler,
            base_kwargs=base_kwargs,
            perturbations=perturbations,
        )
        self.rho = rho
        self.adaptive = adaptive

    def _set_hyperparameters(self, values: dict[str, Any]) -> None:
        self.rho = check_nonnegative("rho", values["rho"])
        self.adaptive = bool(values["adaptive"])
        self.eps = check_nonnegative("eps", values["eps"])

    def _direction(self, run, theta, device):
        start = run()
        weights = theta if self.adaptive else None
        self._move(theta, _ascent(start.grads, self.rho, self.eps, device, weights))
        return run().grads
