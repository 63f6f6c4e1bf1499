"""Derivatives of the Objective: gradients, Hessian-vector products, the cached graph.

``hvp(v)`` is (grad^2 L) v by double backward (reverse-over-reverse) or by
forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``). Passes that differentiate
twice run under :func:`second_order`, which selects the math backend of
``scaled_dot_product_attention``: the fused flash and memory-efficient kernels (CPU and
CUDA) have no double backward and no forward-mode derivative; the math backend computes
the same function with both. First- and zeroth-order passes keep the fused kernels.

With ``cache_graph`` the first-order graph of every batch is kept between HVPs at the same
point, so an HVP costs one backward pass. ``cache_graph=None`` decides at the first
second-order call, from the bytes autograd saves for the first batch (scaled to all the
data) against ``memory_budget``.

``hvp_method="finite_difference"`` takes products from gradient differences instead
(:mod:`flatlens.core._difference`). ``"auto"`` uses double backward, and switches to
differences when double backward raises or when the check of the first product
(``check_hvp``) finds that autograd misses a second derivative; ``hvp_method_used`` and
``hvp_note`` say what happened.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from flatlens.core._difference import (
    CheckVerdict,
    DifferenceProducts,
    HVPCheckError,
    Refined,
    cached_verdict,
    store_verdict,
)
from flatlens.core._memory import available_bytes, saved_bytes
from flatlens.core._params import eval_mode
from flatlens.core._sums import dot64, norm64

__all__ = ["HVP_METHODS", "DerivativesMixin", "HVPMethod", "second_order"]

HVPMethod = Literal["auto", "double_backward", "forward_over_reverse", "finite_difference"]
HVP_METHODS: tuple[str, ...] = (
    "auto",
    "double_backward",
    "forward_over_reverse",
    "finite_difference",
)


@contextlib.contextmanager
def second_order() -> Iterator[None]:
    """Run a pass that will be differentiated twice: ``scaled_dot_product_attention`` uses
    its math backend (same function, differentiable twice and in forward mode)."""
    with sdpa_kernel([SDPBackend.MATH]):
        yield


class _OverBudget(Exception):
    """The cached graph would not fit the memory budget."""


class DerivativesMixin:
    """Gradient and HVP methods of :class:`~flatlens.Objective` (which owns the data, the
    forward pass, ``_batch_loss``, ``_finish`` and the determinism check)."""

    _graph: tuple[Tensor, list[tuple[Tensor, Tensor | None]], float] | None = None
    cache_graph: bool | None
    memory_budget: float | None
    estimated_graph_bytes: int | None = None
    hvp_method_used: str | None = None
    hvp_note: str = ""
    hvp_check: CheckVerdict | None = None

    # ------------------------------------------------------------------ which products
    def _setup_products(self, hvp_method: str, check_hvp: bool) -> None:
        if hvp_method not in HVP_METHODS:
            raise ValueError(
                f"hvp_method must be one of {', '.join(repr(m) for m in HVP_METHODS)}, "
                f"not {hvp_method!r}"
            )
        self.hvp_method = hvp_method
        self.check_hvp = bool(check_hvp)
        self._differences = DifferenceProducts(
            self._difference_gradient, self._norm, self._dot, self.dtype
        )
        self._switched = hvp_method == "finite_difference"
        self._check_pending = self.check_hvp and not self._switched
        self.hvp_method_used = None
        self.hvp_note = ""
        self.hvp_check = None

    def _norm(self, x: Tensor) -> float:
        """||x|| with the sum in float64 (over all ranks for a sharded objective)."""
        return norm64(x, reduce=False)

    def _dot(self, a: Tensor, b: Tensor) -> float:
        """a.b with the sum in float64 (over all ranks for a sharded objective)."""
        return dot64(a, b, reduce=False)

    def _difference_gradient(self, theta: Tensor) -> Tensor:
        """grad L at ``theta`` for a difference product (counted apart from ``gradient``)."""
        self.counts["difference_gradients"] = self.counts.get("difference_gradients", 0) + 1
        return self._streamed_gradient(theta)[1]

    def _switch_to_differences(self, note: str) -> None:
        self._switched = True
        self._graph = None
        self.cache_graph = False  # difference products need no second-order graph
        self.hvp_note = note

    def _inherit_products(self, parent: DerivativesMixin) -> None:
        """Share the parent's choice of products (a child from ``replace``)."""
        if parent._switched and not self._switched:
            self._switched = True
            self.hvp_note = parent.hvp_note
        self._check_pending = self._check_pending and parent._check_pending
        self.hvp_check = parent.hvp_check
        mine, theirs = self._differences, parent._differences
        mine.step_length, mine.scale = theirs.step_length, theirs.scale
        mine.calibration_error = theirs.calibration_error

    @property
    def products(self) -> dict[str, Any]:
        """How products are made: ``{"hvp_method", "requested", "note", "relative_step"}``
        (the difference step over ||theta||, None for exact products)."""
        step = self._differences.relative_step
        return {
            "hvp_method": self.hvp_method_used,
            "requested": self.hvp_method,
            "note": self.hvp_note,
            "relative_step": step if self._switched else None,
        }

    @property
    def uses_differences(self) -> bool:
        """Whether products come from gradient differences (asked for, or switched to)."""
        return self._switched

    def difference_error(self, unit: Tensor, product: Tensor, at: Tensor | None = None) -> float:
        """The Richardson estimate ||D_rh(u) - D_h(u)|| (r = sqrt 3) of a difference
        product's error for a unit vector u with product D_h(u) (two more gradients, once
        per point, vector and step)."""
        theta = self.point(at)
        return self._differences.error(unit.to(self.dtype), product.to(self.dtype), theta)

    def difference_rounding(
        self, v: Tensor | None = None, at: Tensor | None = None
    ) -> float | None:
        """The relative error of difference products: what an eigensolver can resolve with
        them. None for exact ones. When the step is not chosen yet it is chosen along v, or
        along grad L (one gradient, taken only then) when v is None: the direction of an
        ascent's own products, far sharper than a random one."""
        if not self.uses_differences:
            return None
        theta = self.point(at)

        def direction() -> Tensor:
            return self.gradient(at=theta) if v is None else v.to(self.dtype)

        return self._differences.relative_error(theta, direction)

    def refine_difference_step(
        self, unit: Tensor, product: Tensor, target: float, at: Tensor | None = None
    ) -> Refined:
        """Check the difference step along a unit vector u with product D_h(u) (the top
        Ritz vector, where the loss is sharpest) and shorten it when the Richardson error
        estimate exceeds ``target`` and a shorter step is clearly better there (see
        :meth:`DifferenceProducts.refine`). ``changed`` says the products taken before are
        stale."""
        theta = self.point(at)
        return self._differences.refine(unit.to(self.dtype), product.to(self.dtype), theta, target)

    def _setup_caching(
        self, cache_graph: bool | None, memory_budget: float | None, *, in_memory: bool
    ) -> None:
        if memory_budget is not None and not memory_budget > 0:
            raise ValueError(f"memory_budget must be a number of bytes > 0, got {memory_budget!r}")
        self.memory_budget = memory_budget
        self._graph = None
        if not in_memory:
            self.cache_graph = False  # a DataLoader's batches stream
        elif cache_graph is None:
            self.cache_graph = None  # decided by _decide_caching
        else:
            self.cache_graph = bool(cache_graph)
        if self.distributed:
            # Every rank must make the same collective calls: one reduction settles whether
            # any rank cannot cache (then none does) and whether any is undecided (then all
            # decide together at the first second-order call).
            may, undecided = self.cache_graph is not False, self.cache_graph is None
            flags = torch.tensor([int(may), -int(undecided)], device=self.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
            if not flags[0].item():
                self.cache_graph = False
            elif flags[1].item():
                self.cache_graph = None

    def _agree_on_caching(self) -> None:
        """A cached and an uncached HVP make different collective calls, so every rank
        must make the same choice: cache only where all ranks can."""
        if self.distributed:
            flag = torch.tensor([int(bool(self.cache_graph))], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            self.cache_graph = bool(flag.item())

    def _decide_caching(self, theta: Tensor) -> None:
        """Settle ``cache_graph=None`` by building the cached graph at ``theta``: after the
        first batch, the bytes autograd saved for it, scaled by the total batch weight, are
        the estimate; over the memory budget, the graph is dropped and HVPs stream."""
        if self.cache_graph is not None:
            return
        budget = self.memory_budget
        if budget is None:
            budget = available_bytes(self.device) / 2
        total = sum(w for _, _, w in self.batches())
        if self.distributed:
            # Every rank must make the same collective calls: measure the first batch on
            # its own, agree, then build.
            self.cache_graph = self._first_batch_estimate(theta, total) <= budget
            self._agree_on_caching()
            return
        self.cache_graph = True
        try:
            self._cached_graph(theta, budget=(budget, total))
        except _OverBudget:
            self._graph = None
            self.cache_graph = False

    def _first_batch_estimate(self, theta: Tensor, total: float) -> int:
        first = next(iter(self.batches()), None)
        if first is None:
            return 0
        x, y, n = first

        def build() -> None:
            leaf = theta.detach().requires_grad_(True)
            with eval_mode(self.model, self.eval_mode), second_order():
                part = self._batch_loss(leaf, x, y, n)
                if part.requires_grad:
                    torch.autograd.grad(part, leaf, create_graph=True, allow_unused=True)

        self.estimated_graph_bytes = int(saved_bytes(build)[1] * total / n)
        return self.estimated_graph_bytes

    def loss_and_gradient(self, at: Tensor | None = None) -> tuple[float, Tensor]:
        """L and its gradient (a flat vector) in one pass over the data."""
        theta = self.point(at)
        self._decide_caching(theta)
        self._ensure_checked(theta, graph=True)
        if self.cache_graph:
            # Build (or reuse) the first-order graph, so an HVP at this point that follows
            # costs only the second backward pass.
            graphs, value = self._cached_graph(theta)
            grad = self.zeros()
            for _, g in graphs:
                if g is not None:
                    grad += g.detach()
            if self.distributed:
                import torch.distributed as dist

                dist.all_reduce(grad)
            if self.reduction == "mean":
                grad.mul_(1.0 / (self.num_samples or 1))
            self.counts["gradient"] += 1
            return value, grad
        self.counts["gradient"] += 1
        return self._streamed_gradient(theta)

    def _streamed_gradient(self, theta: Tensor) -> tuple[float, Tensor]:
        """L and grad L at ``theta`` in one pass over the data, batch by batch (no graph
        kept), reduced over ranks and divided by W; not counted."""
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        grad: Tensor | None = None
        parts, count = [], 0
        leaf = theta.detach().requires_grad_(True)
        with eval_mode(self.model, self.eval_mode):
            for x, y, n in self.batches():
                part = self._batch_loss(leaf, x, y, n)
                if part.requires_grad:
                    (g,) = torch.autograd.grad(part, leaf, allow_unused=True)
                    if g is not None:
                        grad = g if grad is None else grad.add_(g)
                parts.append(part.detach())
                total += part.detach()
                count += n
        grad = self.zeros() if grad is None else grad
        value = self._finish(total, parts, count, grad)
        return value, grad

    def gradient(self, at: Tensor | None = None) -> Tensor:
        """grad L(theta) as a flat vector (zero for parameters the loss does not reach)."""
        return self.loss_and_gradient(at)[1]

    def _resolved_hvp_method(self) -> str:
        if self._switched:
            return "finite_difference"
        if self.hvp_method != "auto":
            return self.hvp_method
        # Double backward measured faster than forward-over-reverse on the CPU
        # (benchmarks/bench_spectrum.py, docs/benchmarks.md).
        return "double_backward"

    def _cached_graph(
        self, theta: Tensor, *, budget: tuple[float, float] | None = None
    ) -> tuple[list[tuple[Tensor, Tensor | None]], float]:
        """Per-batch ``(leaf, grad)`` with ``create_graph=True`` at ``theta``, and L(theta).

        With ``budget = (bytes, total weight)``, raise :class:`_OverBudget` after the first
        batch when its saved bytes scaled to the total weight exceed ``bytes``.
        """
        if self._graph is not None and torch.equal(self._graph[0], theta):
            return self._graph[1], self._graph[2]
        self._graph = None
        graphs, parts, count = [], [], 0
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        with eval_mode(self.model, self.eval_mode), second_order():
            for x, y, n in self.batches():
                leaf = theta.detach().requires_grad_(True)

                def build(leaf=leaf, x=x, y=y, n=n) -> tuple[Tensor, Tensor | None]:
                    part = self._batch_loss(leaf, x, y, n)
                    if not part.requires_grad:
                        return part, None
                    (g,) = torch.autograd.grad(part, leaf, create_graph=True, allow_unused=True)
                    return part, g

                if budget is not None and not graphs:
                    (part, g), saved = saved_bytes(build)
                    self.estimated_graph_bytes = int(saved * budget[1] / n)
                    if self.estimated_graph_bytes > budget[0]:
                        raise _OverBudget
                else:
                    part, g = build()
                graphs.append((leaf, g))
                parts.append(part.detach())
                total += part.detach()
                count += n
        value = self._finish(total, parts, count)
        self._graph = (theta.clone(), graphs, value)
        return graphs, value

    def hvp(self, v: Tensor, at: Tensor | None = None) -> Tensor:
        """Hessian-vector product (grad^2 L(theta)) v as a flat vector.

        Args:
            v: Flat vector of length ``num_params`` on the objective's device.
            at: Optional flat parameter vector; the Hessian is taken there instead of at the
                model's current parameters.

        Raises:
            HVPCheckError: an exact ``hvp_method`` whose first product disagrees with
                gradient differences (autograd misses a second derivative).
        """
        theta = self.point(at)
        if v.shape != (self.num_params,):
            raise ValueError(f"v must have shape ({self.num_params},), got {tuple(v.shape)}")
        if v.device != self.device:
            raise ValueError(f"v is on {v.device}, the model on {self.device}")
        v = v.detach().to(self.dtype)
        method = self._resolved_hvp_method()
        if method != "finite_difference":
            self._decide_caching(theta)
        self._ensure_checked(theta, graph=method != "finite_difference")
        if method == "finite_difference":
            out = self._differences.product(v, theta)
        else:
            try:
                out = self._exact_hvp(v, theta, method)
            except (RuntimeError, NotImplementedError) as err:
                if isinstance(err, torch.OutOfMemoryError | HVPCheckError):
                    raise
                self._graph = None
                if self.hvp_method != "auto":
                    raise type(err)(
                        f"{err}\n(flatlens: hvp_method={self.hvp_method!r} needs a second "
                        "derivative autograd cannot take here; pass "
                        "hvp_method='finite_difference', or 'auto' to fall back by itself)"
                    ) from err
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                self._switch_to_differences(
                    f"double backward raised ({first[:160]}): products from gradient differences"
                )
                out = self._differences.product(v, theta)
            else:
                if self._check_pending:
                    out = self._checked_product(theta, v, out, method)
        self.hvp_method_used = self._resolved_hvp_method()
        self.counts["hvp"] += 1
        return out

    def _checked_product(self, theta: Tensor, v: Tensor, out: Tensor, method: str) -> Tensor:
        """Run the check of exact products once (cached per model): keep ``out``, switch
        to differences (``"auto"``) or raise (an explicit exact method)."""
        self._check_pending = False
        key = (tuple(self.space.names), self.dtype, method, self.eval_mode)
        verdict = cached_verdict(self.model, key)
        if verdict is None:
            verdict = self._differences.check(theta, v, out)
            store_verdict(self.model, key, verdict)
        self.hvp_check = verdict
        if verdict.passed:
            return out
        if self.hvp_method == "auto":
            self._switch_to_differences(verdict.note + ": products from gradient differences")
            return self._differences.product(v, theta)
        raise HVPCheckError(
            f"hvp_method={self.hvp_method!r}: {verdict.note}. Pass "
            "hvp_method='finite_difference' (or 'auto', which switches by itself), or "
            "check_hvp=False if the model's second derivatives are known to be complete"
        )

    def _exact_hvp(self, v: Tensor, theta: Tensor, method: str) -> Tensor:
        """(grad^2 L) v by autograd: from the cached graph, or batch by batch."""
        count = 0
        if self.cache_graph:
            out = None  # the first batch's product is the sum so far: no zeroed buffer
            for leaf, g in self._cached_graph(theta)[0]:
                if g is not None and g.requires_grad:
                    (hv,) = torch.autograd.grad(
                        g, leaf, grad_outputs=v, retain_graph=True, allow_unused=True
                    )
                    if hv is None:
                        continue
                    if out is None:
                        aliased = hv.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
                        out = hv.clone() if aliased else hv  # autograd may pass v through
                    else:
                        out.add_(hv)
            if out is None:
                out = self.zeros()
            count = self.num_samples or 0
            if self.distributed:
                import torch.distributed as dist

                dist.all_reduce(out)
            if self.reduction == "mean":
                out.mul_(1.0 / count)
            return out

        out = self.zeros()
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        parts = []
        with eval_mode(self.model, self.eval_mode), second_order():
            for x, y, n in self.batches():
                if method == "forward_over_reverse":
                    part, hv = self._hvp_fwd_rev(theta, v, x, y, n)
                else:
                    part, hv = self._hvp_double_backward(theta, v, x, y, n)
                out += hv
                parts.append(part)
                total += part
                count += n
        self._finish(total, parts, count, out)
        return out

    def _hvp_double_backward(self, theta, v, x, y, n) -> tuple[Tensor, Tensor]:
        leaf = theta.detach().requires_grad_(True)
        part = self._batch_loss(leaf, x, y, n)
        if not part.requires_grad:
            return part.detach(), torch.zeros_like(v)
        (g,) = torch.autograd.grad(part, leaf, create_graph=True, allow_unused=True)
        if g is None or not g.requires_grad:
            return part.detach(), torch.zeros_like(v)
        (hv,) = torch.autograd.grad(g, leaf, grad_outputs=v, allow_unused=True)
        return part.detach(), torch.zeros_like(v) if hv is None else hv

    def _hvp_fwd_rev(self, theta, v, x, y, n) -> tuple[Tensor, Tensor]:
        def batch_loss(t: Tensor) -> tuple[Tensor, Tensor]:
            value = self._batch_loss(t, x, y, n)
            return value, value.detach()

        grad_fn = torch.func.grad(batch_loss, has_aux=True)
        (_, hv, part) = torch.func.jvp(grad_fn, (theta,), (v,), has_aux=True)
        return part, hv
