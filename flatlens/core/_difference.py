"""Hessian-vector products from gradient differences, and the check of autograd's products.

**Difference products** (``hvp_method="finite_difference"``). For a direction v with
v_hat = v / ||v|| and a step length h,

    H v ~ D_h(v) = ||v|| (grad L(theta + h v_hat) - grad L(theta - h v_hat)) / (2 h),

two gradients per product, no second derivative: it works through any operator autograd
can differentiate once (fused attention, custom ``autograd.Function`` s, sharded models).
Its error is the truncation c h^2 (smooth losses; c grows with the third derivative along
v, so sharp directions want short steps) plus the rounding of the gradients and of
theta +- h v_hat, about eps ||theta|| / h in size. The step is chosen at the first product,
from the dtype and the scale of theta and v: starting at h_0 = eps^(1/3) ||theta|| (the
textbook balance of the two terms) and dividing by 3 until the differences of successive
products D_{h_j} - D_{h_{j+1}}, once the products have settled (agree to a tenth), grow
again (truncation falls 9-fold per level, rounding grows 3-fold), the step taken is the one
whose product agrees best with the next larger one. Later products, at this point and at
later ones, reuse it: two gradients each.

**The step along the sharpest direction.** The first vector is seldom a sharp one: on
GPT-2 small a step right for a random direction makes the products along the top
eigenvector 100 times too small. :meth:`DifferenceProducts.refine` re-checks the step along
a given vector (the eigensolvers pass their top Ritz vector) and walks it down when the
error estimate there exceeds what the result needs; the solver then runs again with the
shorter step (``flatlens.measures._reference``). A direction that is invisible at the
first step (its product near zero and its Ritz vector nowhere near it) cannot be found so:
the check sees only what the returned vectors feel.

**The error estimate** (Richardson, two steps): ||D_{rh}(u) - D_h(u)|| with r = sqrt(3)
estimates the error of D_h(u): twice the truncation (r^2 - 1 = 2) plus both roundings (a
ratio that is not a power of two keeps theta +- h u and theta +- r h u on different float
grids, so their roundings do not cancel). It costs two more gradients and is taken once
per point and step, when a result asks for it (:meth:`DifferenceProducts.error`): an
eigenvalue certificate adds it to its allowance and calls its bound an estimate.

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

from flatlens.core._sharding import any_rank, random_vector

__all__ = ["CheckVerdict", "DifferenceProducts", "HVPCheckError", "Refined", "cached_verdict"]

MAX_LEVELS = 12
"""Steps a walk tries (h_0, h_0/3, ..., h_0/3^11): at most 2 * MAX_LEVELS gradients."""
MAX_QUANTIZATION = 0.1
"""Shortest step: the move theta -> fl(theta + h u) may differ from h u by at most this
fraction of h (below, theta +- h u round back towards theta: at h under half an ulp of
every coordinate both points equal theta and the product is exactly zero, with an error
estimate of zero too)."""
SETTLED = 0.1
"""Successive products closer than this fraction of their size have left the
pre-asymptotic regime: only there does a growing gap mean growing rounding."""
WALK_FACTOR = 3.0
"""Each level of a walk divides the step by this (not a power of two: products at steps a
power of two apart round alike, since theta +- h u is quantised on the same grid, and
their distance would hide that rounding)."""
RICHARDSON_RATIO = math.sqrt(3.0)
"""The wider step of the error estimate, r h: D_rh - D_h is (r^2 - 1) = 2 times D_h's
truncation, plus the two steps' roundings, which r (irrational) keeps apart."""
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
class _Walk:
    """The best step of a walk down: the gap to the next larger step's product, the step,
    its product (for a unit vector) and the levels the walk took."""

    gap: float
    step: float
    product: Tensor
    levels: int


@dataclass
class Refined:
    """A step checked along a vector: the error estimate there, and whether the step was
    shortened (products taken with the old step are then stale)."""

    error: float
    changed: bool


@dataclass
class DifferenceProducts:
    """The difference products of one objective: the step, chosen once, and the error
    estimates, one per point.

    Args:
        gradient: ``theta -> grad L(theta)`` (a flat vector; counted by the objective).
        norm: ``x -> ||x||`` in float64 (summed over ranks for sharded vectors).
        dot: ``(a, b) -> a.b`` in float64 (summed over ranks for sharded vectors).
        dtype: The parameters' dtype (sets eps).
        step_length: The step h, chosen at the first product (``None`` until then) and kept
            for later points (a trainer's measures, an ascent's iterates).
        scale: ||theta|| where h was chosen (``relative_step`` is h / scale).
    """

    gradient: Callable[[Tensor], Tensor]
    norm: Callable[[Tensor], float]
    dot: Callable[[Tensor, Tensor], float]
    dtype: torch.dtype
    step_length: float | None = None
    scale: float = 1.0
    calibration_error: float | None = None
    levels_tried: int = 0
    recalibrations: int = 0
    _error_at: tuple[Tensor, Tensor, float, float] | None = None
    _buffer: Tensor | None = None

    @property
    def eps(self) -> float:
        return torch.finfo(self.dtype).eps

    @property
    def relative_step(self) -> float | None:
        """h / ||theta|| at the point where h was chosen."""
        return None if self.step_length is None else self.step_length / self.scale

    def _scale(self, theta: Tensor) -> float:
        s = self.norm(theta)
        return s if s > 0 and math.isfinite(s) else 1.0

    def _point_buffer(self, like: Tensor) -> Tensor:
        """The vector theta +- h v is written into, kept between products: a fresh one per
        product costs, on the CPU, page faults worth a sixth of a gradient (GPT-2 small)."""
        buf, wanted = self._buffer, (like.shape, like.dtype, like.device)
        if buf is None or (buf.shape, buf.dtype, buf.device) != wanted:
            buf = self._buffer = torch.empty_like(like)
        return buf

    def difference(self, theta: Tensor, v: Tensor, h: float, size: float = 1.0) -> Tensor:
        """size (g(theta + h v / size) - g(theta - h v / size)) / (2 h), with size = ||v||
        (1 for a unit vector): one kept buffer for both points, no unit vector formed."""
        shift = h / size
        point = self._point_buffer(theta)
        plus = self.gradient(torch.add(theta, v, alpha=shift, out=point))
        minus = self.gradient(torch.add(theta, v, alpha=-shift, out=point))
        return plus.sub_(minus).mul_(size / (2 * h))

    def quantization(self, theta: Tensor, unit: Tensor, h: float) -> float:
        """||(fl(theta + h u) - theta) - h u|| / h: how far the move the model sees is from
        the one asked for, relative to h (u a unit vector; one addition, no gradient)."""
        moved = torch.add(theta, unit, alpha=h).sub_(theta)
        return self.norm(moved.sub_(unit, alpha=h)) / h

    def step(self) -> float:
        """The step length h (after it was chosen)."""
        assert self.step_length is not None
        return self.step_length

    def product(self, v: Tensor, theta: Tensor) -> Tensor:
        """D_h(v) ~ H v (the step chosen along v at the first call)."""
        nv = self.norm(v)
        if nv == 0 or not math.isfinite(nv):
            return torch.zeros_like(v) if nv == 0 else v * math.nan
        if self.step_length is None:
            return self._choose_step(theta, v / nv).mul_(nv)
        return self.difference(theta, v, self.step(), nv)

    def relative_error(self, theta: Tensor, direction: Callable[[], Tensor]) -> float | None:
        """The relative error of the products, ||D_h(u) - H u|| / ||H u|| as the step's
        walk measured it (choosing the step along ``direction()`` first if it is not chosen
        yet: the vector is only formed then); None for a step given from outside."""
        if self.step_length is None:
            self.product(direction(), theta)
        error = self.calibration_error
        return error if error is not None and math.isfinite(error) else None

    def _walk_down(self, theta: Tensor, unit: Tensor, h: float, first: Tensor) -> _Walk:
        """From D_h(unit) = ``first``, try h/3, h/9, ... until the gaps between successive
        products, once settled (within ``SETTLED`` of their size), grow again: truncation
        falls 9-fold per level, rounding grows 3-fold. Before they settle, the step is
        still too long for the direction (GPT-2 small along its gradient: the product grows
        100-fold from h_0 to h_0/81) and the gaps may grow too. The step kept is the finer
        one of the closest pair (h itself, with an infinite gap, when no shorter step
        resolves)."""
        prev, best, last, levels = first, _Walk(math.inf, h, first, 0), math.inf, 0
        for _ in range(1, MAX_LEVELS):
            h /= WALK_FACTOR
            if self.quantization(theta, unit, h) > MAX_QUANTIZATION:
                break
            cur = self.difference(theta, unit, h)
            levels += 1
            gap = self.norm(cur - prev)
            if gap < best.gap:
                best = _Walk(gap, h, cur, levels)
            if gap > 2 * last and gap <= SETTLED * self.norm(cur):
                break  # settled, and the rounding now grows faster than the truncation falls
            last, prev = gap, cur
        best.levels = levels
        return best

    def _choose_step(self, theta: Tensor, unit: Tensor) -> Tensor:
        """Walk down from h_0 = eps^(1/3) ||theta||. Returns the chosen step's product (for
        the unit vector)."""
        scale = self._scale(theta)
        h = self.eps ** (1 / 3) * scale
        walk = self._walk_down(theta, unit, h, self.difference(theta, unit, h))
        self.levels_tried = walk.levels + 1
        self._adopt(walk, scale)
        return walk.product

    def _adopt(self, walk: _Walk, scale: float) -> None:
        """Take the walk's step for every later product, with its measured relative error."""
        self.step_length, self.scale = walk.step, scale
        size = self.norm(walk.product)
        self.calibration_error = walk.gap / size if size > 0 else None

    def error(self, unit: Tensor, product: Tensor, theta: Tensor) -> float:
        """||D_rh(u) - D_h(u)|| (r = sqrt 3) for a unit vector u whose product D_h(u) is
        ``product``: the Richardson estimate of its error (twice its truncation, plus the
        roundings of both), taken once per point, vector and step (cached: the step's
        re-check and the bound ask for it along the same top Ritz vector)."""
        h = self.step()
        cached = self._error_at
        if cached is not None and cached[2] == h:
            same = torch.equal(cached[0], theta) and torch.equal(cached[1], unit)
            if not any_rank(not same):  # every rank holds a part of theta and u
                return cached[3]
        wide = self.difference(theta, unit, RICHARDSON_RATIO * h)
        value = self.norm(wide - product)
        self._error_at = (theta.clone(), unit.clone(), h, value)
        return value

    def refine(self, unit: Tensor, product: Tensor, theta: Tensor, target: float) -> Refined:
        """Check the step along u (e.g. the top Ritz vector, where the loss is sharpest)
        and shorten it when a shorter one is clearly better there.

        The Richardson estimate e = ||D_rh(u) - D_h(u)|| (two gradients, as
        :meth:`error`) is kept when e <= ``target``. Otherwise the step walks down from h
        (two gradients per level); when the closest pair of finer products is within e / 2,
        the step becomes that finer one (for every later product) and the caller should
        redo the products it took with the old one.

        Returns:
            :class:`Refined`: the error estimate at the step kept, and whether it changed.
        """
        error = self.error(unit, product, theta)
        if error <= target:
            return Refined(error, False)
        walk = self._walk_down(theta, unit, self.step(), product)
        self.levels_tried += walk.levels
        worse = math.inf if math.isnan(error) else error / 2  # a NaN estimate as inf
        if walk.step == self.step() or not walk.gap <= worse:
            return Refined(error, False)
        self._adopt(walk, self._scale(theta))
        self.recalibrations += 1
        self._error_at = None
        return Refined(walk.gap, True)

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
