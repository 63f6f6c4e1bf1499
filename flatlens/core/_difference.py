"""Hessian-vector products from gradient differences, and the check of autograd's products.

**Difference products** (``hvp_method="finite_difference"``). For a direction v with
v_hat = v / ||v|| and a step length h,

    H v ~ D_h(v) = ||v|| (grad L(theta + h v_hat) - grad L(theta - h v_hat)) / (2 h),

two gradients per product, no second derivative: it works through any operator autograd
can differentiate once (fused attention, custom ``autograd.Function`` s, sharded models).
Its error is the truncation c h^2 (smooth losses) plus the gradients' rounding, about
eps ||theta|| / h in size. The step is chosen once per objective, at its first product,
from the dtype and the scale of theta and v: starting at h_0 = eps^(1/3) ||theta|| (the
textbook balance of the two terms) and dividing by 4 while the differences of successive
products D_{h_j} - D_{h_{j+1}} keep shrinking (truncation falls 16-fold per level, rounding
grows 4-fold), the step taken is the one whose product agrees best with the next larger
one. Later products reuse it: two gradients each.

**The error estimate** (Richardson, two steps): ||D_{2h}(u) - D_h(u)|| estimates the error
of D_h(u) (three times the truncation, or the rounding when that dominates). It costs two
more gradients and is taken once per point, when a result asks for it
(:meth:`DifferenceProducts.error`): an eigenvalue certificate adds it to its allowance and
calls its bound an estimate.

**The check of exact products** (``check_hvp=True``). autograd silently leaves out the
second derivative of an operation whose backward is not itself differentiable (a custom
``autograd.Function`` whose backward is marked ``@once_differentiable``, some fused
kernels): the products are then wrong with no error. The first exact product is compared
with a difference product along the same vector at the step sqrt(eps) ||theta|| (one extra
pair of gradients). A disagreement beyond ``CHECK_FLOOR * sqrt(eps)`` relative is tested
against the difference's own error (a second pair at twice the step) and its symmetry (a
third pair, along another vector): autograd is found wrong only when the differences agree
with each other far better than with it and are symmetric, as differences of a true
gradient are. A loss that is not smooth at that scale (ReLU and max-pool kinks crossed by
the step) makes the two differences disagree; a "gradient" that is not the derivative of
the loss (an embedding's ``padding_idx``) makes them asymmetric: in both cases the check
cannot judge, keeps the exact products and says so in its note.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flatlens.core._sharding import random_vector

__all__ = ["CheckVerdict", "DifferenceProducts", "HVPCheckError", "cached_verdict"]

MAX_LEVELS = 8
"""Steps tried when the step is chosen (h_0, h_0/4, ...): at most 2 * MAX_LEVELS gradients."""
CHECK_FLOOR = 30.0
"""Agreement within CHECK_FLOOR * sqrt(eps) relative passes the check with one pair."""
CHECK_RATIO = 8.0
"""Autograd is found wrong when it disagrees with the difference by more than this many
times the difference's own error (the distance between the two step sizes' products)."""


class HVPCheckError(RuntimeError):
    """An exact (autograd) Hessian-vector product disagreed with gradient differences."""


@dataclass
class CheckVerdict:
    """The outcome of comparing an exact product with gradient differences.

    Attributes:
        passed: The exact product is taken as right.
        disagreement: ||exact - difference|| / ||exact||.
        difference_error: ||D_h - D_2h|| / ||exact||, the difference's own error (None when
            one pair sufficed).
        note: One line saying what was found.
    """

    passed: bool
    disagreement: float
    difference_error: float | None
    note: str


_VERDICTS: weakref.WeakKeyDictionary[Any, dict[tuple, CheckVerdict]] = weakref.WeakKeyDictionary()


def cached_verdict(model: Any, key: tuple) -> CheckVerdict | None:
    """The verdict of an earlier check of this model's products (same parameters, dtype and
    method), so a trainer's repeated measures pay the check once per run."""
    return _VERDICTS.get(model, {}).get(key)


def store_verdict(model: Any, key: tuple, verdict: CheckVerdict) -> None:
    _VERDICTS.setdefault(model, {})[key] = verdict


@dataclass
class DifferenceProducts:
    """The difference products of one objective: the step, chosen once, and the error
    estimates, one per point.

    Args:
        gradient: ``theta -> grad L(theta)`` (a flat vector; counted by the objective).
        norm: ``x -> ||x||`` in float64 (summed over ranks for sharded vectors).
        dot: ``(a, b) -> a.b`` in float64 (summed over ranks for sharded vectors).
        dtype: The parameters' dtype (sets eps).
        relative_step: h / ||theta|| to use (``None``: chosen at the first product).
    """

    gradient: Callable[[Tensor], Tensor]
    norm: Callable[[Tensor], float]
    dot: Callable[[Tensor, Tensor], float]
    dtype: torch.dtype
    relative_step: float | None = None
    calibration_error: float | None = None
    levels_tried: int = 0
    _error_at: tuple[Tensor, float] | None = None

    @property
    def eps(self) -> float:
        return torch.finfo(self.dtype).eps

    def _scale(self, theta: Tensor) -> float:
        s = self.norm(theta)
        return s if s > 0 and math.isfinite(s) else 1.0

    def difference(self, theta: Tensor, unit: Tensor, h: float) -> Tensor:
        """(grad L(theta + h unit) - grad L(theta - h unit)) / (2 h) for a unit vector."""
        plus = self.gradient(theta + h * unit)
        minus = self.gradient(theta - h * unit)
        plus.sub_(minus)
        return plus.mul_(1.0 / (2 * h))

    def step(self, theta: Tensor) -> float:
        """The step length h at ``theta`` (after the step was chosen)."""
        assert self.relative_step is not None
        return self.relative_step * self._scale(theta)

    def product(self, v: Tensor, theta: Tensor) -> Tensor:
        """D_h(v) ~ H v (the step chosen along v at the first call)."""
        nv = self.norm(v)
        if nv == 0 or not math.isfinite(nv):
            return torch.zeros_like(v) if nv == 0 else v * math.nan
        unit = v / nv
        if self.relative_step is None:
            return self._choose_step(theta, unit).mul_(nv)
        return self.difference(theta, unit, self.step(theta)).mul_(nv)

    def _choose_step(self, theta: Tensor, unit: Tensor) -> Tensor:
        """Walk h_0 = eps^(1/3) ||theta||, h_0 / 4, ...; keep the step whose product agrees
        best with the next larger one. Returns that product (for the unit vector)."""
        scale = self._scale(theta)
        h = self.eps ** (1 / 3) * scale
        prev = self.difference(theta, unit, h)
        best: tuple[float, float, Tensor] | None = None  # (spread, h, product)
        last = math.inf
        self.levels_tried = 1
        for _ in range(1, MAX_LEVELS):
            h /= 4
            cur = self.difference(theta, unit, h)
            self.levels_tried += 1
            gap = self.norm(cur - prev)
            if best is None or gap < best[0]:
                best = (gap, h, cur)
            if gap > 2 * last:  # the rounding now grows faster than the truncation falls
                break
            last, prev = gap, cur
        assert best is not None
        gap, h, product = best
        self.relative_step = h / scale
        size = self.norm(product)
        self.calibration_error = gap / size if size > 0 else math.inf
        return product.clone()

    def error(self, unit: Tensor, product: Tensor, theta: Tensor) -> float:
        """||D_2h(u) - D_h(u)|| for a unit vector u whose product D_h(u) is ``product``:
        the Richardson estimate of its error, taken once per point (cached by theta)."""
        cached = self._error_at
        if cached is not None and torch.equal(cached[0], theta):
            return cached[1]
        h = self.step(theta)
        wide = self.difference(theta, unit, 2 * h)
        value = self.norm(wide - product)
        self._error_at = (theta.clone(), value)
        return value

    def check(self, theta: Tensor, v: Tensor, exact: Tensor) -> CheckVerdict:
        """Compare the exact product ``exact`` = H v with gradient differences along v."""
        nv = self.norm(v)
        size = self.norm(exact) / nv if nv > 0 else 0.0
        if nv == 0 or size == 0 or not math.isfinite(size):
            return CheckVerdict(True, 0.0, None, "not checked: a zero or non-finite product")
        unit = v / nv
        h = math.sqrt(self.eps) * self._scale(theta)
        near = self.difference(theta, unit, h)
        scaled_exact = exact / nv
        disagreement = self.norm(scaled_exact - near) / size
        floor = CHECK_FLOOR * math.sqrt(self.eps)
        if disagreement <= floor:
            note = f"exact products agree with gradient differences to {disagreement:.1e}"
            return CheckVerdict(True, disagreement, None, note)
        far = self.difference(theta, unit, 2 * h)
        own = self.norm(near - far) / size
        if disagreement <= CHECK_RATIO * own + floor:
            note = (
                f"exact products differ from gradient differences by {disagreement:.1e}, but "
                f"the differences disagree among themselves ({own:.1e}: the loss is not smooth "
                "at their step, e.g. ReLU or max-pool kinks), so the exact products are kept"
            )
            return CheckVerdict(True, disagreement, own, note)
        # Differences of a true gradient field are symmetric: u.D(w) = w.D(u). A model whose
        # "gradient" is not the derivative of its loss (an embedding's padding_idx, a
        # straight-through estimator) gives asymmetric differences; autograd then takes the
        # derivative of that gradient, and the differences cannot judge it.
        other = random_vector(unit.numel(), torch.Generator().manual_seed(0))
        other = other.to(unit.device, unit.dtype)
        other /= self.norm(other)
        cross = self.difference(theta, other, h)
        asymmetry = abs(self.dot(unit, cross) - self.dot(other, near)) / size
        if asymmetry > CHECK_RATIO * own + floor:
            note = (
                f"exact products differ from gradient differences by {disagreement:.1e}, but "
                f"the differences are not symmetric ({asymmetry:.1e}): the model's gradient is "
                "not the derivative of its loss (e.g. an embedding's padding_idx, a "
                "straight-through estimator), so the exact products are kept"
            )
            return CheckVerdict(True, disagreement, own, note)
        note = (
            f"exact products differ from gradient differences by {disagreement:.1%} while "
            f"two step sizes of the (symmetric) differences agree to {own:.1e}: autograd does "
            "not see the second derivative of some operation (a custom autograd.Function "
            "whose backward is @once_differentiable, a fused kernel)"
        )
        return CheckVerdict(False, disagreement, own, note)
