"""Difference products (``hvp_method="finite_difference"``), the check of exact products
(``check_hvp``) and the fall-back of ``"auto"``, against dense float64 Hessians."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    bn_cnn,
    classification_data,
    dense_reference,
    image_data,
    tiny_mlp,
    uneven_batches,
)
from torch import nn
from torch.autograd.function import once_differentiable

from flatlens import HVPCheckError, Objective, hessian_eigenvalues
from flatlens.core import _difference
from flatlens.core._difference import MAX_LEVELS, MAX_QUANTIZATION, SETTLED
from flatlens.core._sharding import RANDOM_CHUNK, ShardLayout, random_vector, sharded
from flatlens.measures import _reference

SIZES = [7, 7, 5, 4]


def smooth_case(dtype=torch.float64):
    model = tiny_mlp(seed=1, dtype=dtype)
    x, y = classification_data(dtype=dtype)
    return model, x, y


def test_difference_products_match_the_dense_hessian():
    for dtype, rtol in ((torch.float64, 1e-7), (torch.float32, 2e-3)):
        model, x, y = smooth_case(dtype)
        ref = dense_reference(model, F.cross_entropy, (x, y))
        obj = Objective(
            model, F.cross_entropy, uneven_batches(x, y, SIZES), hvp_method="finite_difference"
        )
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            v = torch.randn(obj.num_params, generator=gen, dtype=torch.float64)
            hv = obj.hvp(v.to(dtype)).double()
            expected = ref.hessian @ v
            assert float((hv - expected).norm() / expected.norm()) <= rtol
        assert obj.hvp_method_used == "finite_difference"
        assert obj.products["relative_step"] > 0


def test_a_difference_product_costs_two_gradients_after_the_step_is_chosen():
    model, x, y = smooth_case()
    obj = Objective(model, F.cross_entropy, (x, y), hvp_method="finite_difference")
    v = torch.linspace(-1, 1, obj.num_params, dtype=torch.float64)
    obj.hvp(v)
    first = obj.counts["difference_gradients"]
    assert 4 <= first <= 2 * MAX_LEVELS and obj.counts["gradient"] == 0
    twice = obj.hvp(2 * v)
    assert obj.counts["difference_gradients"] == first + 2
    # Linear in the vector's scale: the step is taken along v / ||v||.
    assert torch.equal(twice, 2 * obj.hvp(v))
    assert obj.counts["hvp"] == 3
    # The Richardson estimate: once per point (two more gradients), then cached.
    unit = v / v.norm()
    product = obj.hvp(unit)
    before = obj.counts["difference_gradients"]
    err = obj.difference_error(unit, product)
    assert obj.counts["difference_gradients"] == before + 2
    assert obj.difference_error(unit, product) == err
    assert obj.counts["difference_gradients"] == before + 2
    exact = Objective(model, F.cross_entropy, (x, y)).hvp(unit)
    assert float((product - exact).norm()) <= 10 * err + 1e-12


def test_every_measure_runs_on_difference_products():
    from flatlens import block_spectra, first_order_flatness, hessian_density, hessian_trace

    model, x, y = smooth_case()
    data = uneven_batches(x, y, SIZES)
    fd = Objective(model, F.cross_entropy, data, hvp_method="finite_difference")
    exact = Objective(model, F.cross_entropy, data)
    top_fd, top = hessian_eigenvalues(fd, 2, tol=1e-8), hessian_eigenvalues(exact, 2, tol=1e-10)
    assert torch.allclose(top_fd.eigenvalues, top.eigenvalues, rtol=1e-7)
    assert top_fd.hvp_method == "finite_difference" and top.hvp_method == "double_backward"
    assert top_fd.bound_kind == "estimate" and top.bound_kind == "certified"
    assert bool(((top_fd.eigenvalues - top.eigenvalues).abs() <= top_fd.error_bounds).all())
    assert top_fd.to_dict()["hvp_method"] == "finite_difference"
    trace_fd, trace = hessian_trace(fd, seed=3), hessian_trace(exact, seed=3)
    assert abs(trace_fd.value - trace.value) <= 1e-6 * abs(trace.value)
    assert trace_fd.hvp_method == "finite_difference"
    dens_fd, dens = hessian_density(fd, seed=1), hessian_density(exact, seed=1)
    for a, b in zip(dens_fd.nodes, dens.nodes, strict=True):  # the extreme nodes converge
        assert abs(a.max() - b.max()) < 1e-6 and abs(a.min() - b.min()) < 1e-6
    assert dens_fd.hvp_method == "finite_difference"
    blocks = block_spectra(fd, "layers", tol=1e-6)
    assert blocks.hvp_method == "finite_difference"
    ref_blocks = block_spectra(exact, "layers", tol=1e-8)
    for a, b in zip(blocks.blocks, ref_blocks.blocks, strict=True):
        assert torch.allclose(a.eigenvalues, b.eigenvalues, rtol=1e-6)
    r1_fd = first_order_flatness(fd, 0.1, steps=5, seed=0)
    r1 = first_order_flatness(exact, 0.1, steps=5, seed=0)
    assert abs(r1_fd.value - r1.value) <= 1e-6 * r1.value
    assert r1_fd.hvp_method == "finite_difference"


# ------------------------------------------------------------ operators autograd misses
class _GeluFn(torch.autograd.Function):
    """GELU with a hand-written backward marked once-differentiable (as fused kernels are)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
        return g * (cdf + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi))


class _Gelu(nn.Module):
    def forward(self, x):
        return _GeluFn.apply(x)


def once_case(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), _Gelu(), nn.Linear(16, 4)).to(dtype)
    plain = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 4)).double()
    plain.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 12, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (32,), generator=gen)
    ref = dense_reference(plain, F.cross_entropy, (x, y))
    return model, x.to(dtype), y, ref


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-6), (torch.float32, 1e-3)])
def test_auto_finds_a_once_differentiable_operator_and_measures_through_differences(dtype, atol):
    model, x, y, ref = once_case(dtype)
    lam = float(torch.linalg.eigvalsh(ref.hessian)[-1])
    unchecked = Objective(model, F.cross_entropy, (x, y), check_hvp=False)
    v = torch.randn(unchecked.num_params, generator=torch.Generator().manual_seed(2), dtype=dtype)
    wrong = unchecked.hvp(v).double()
    assert (
        float((wrong - ref.hessian @ v.double()).norm() / (ref.hessian @ v.double()).norm()) > 0.3
    )
    obj = Objective(model, F.cross_entropy, (x, y))
    res = hessian_eigenvalues(obj, 1, tol=1e-8 if dtype == torch.float64 else 1e-5)
    assert res.hvp_method == "finite_difference" and obj.uses_differences
    assert "once_differentiable" in res.hvp_note and not obj.hvp_check.passed
    assert abs(float(res.eigenvalues[0]) - lam) <= atol * abs(lam)
    assert res.bound_kind == "estimate"
    for method in ("double_backward", "forward_over_reverse"):
        explicit = Objective(model, F.cross_entropy, (x, y), hvp_method=method)
        with pytest.raises(HVPCheckError, match="hvp_method='finite_difference'"):
            explicit.hvp(v)


def test_the_check_runs_once_per_model():
    model, x, y, _ = once_case(torch.float64)
    first = Objective(model, F.cross_entropy, (x, y))
    v = torch.ones(first.num_params, dtype=torch.float64)
    first.hvp(v)
    assert first.counts["difference_gradients"] >= 6  # the check's pairs, then the products
    again = Objective(model, F.cross_entropy, uneven_batches(x, y, [16, 16]))
    again.hvp(v)
    step = again.counts["difference_gradients"]
    assert again.uses_differences and again.hvp_note == first.hvp_note
    assert step <= 2 * MAX_LEVELS  # the products' step only: no check pairs


def test_check_hvp_false_skips_the_check():
    model, x, y, _ = once_case(torch.float64)
    obj = Objective(model, F.cross_entropy, (x, y), check_hvp=False)
    obj.hvp(torch.ones(obj.num_params, dtype=torch.float64))
    assert obj.hvp_check is None and obj.counts["difference_gradients"] == 0
    assert obj.hvp_method_used == "double_backward"


class _NoDoubleBackward(torch.autograd.Function):
    """tanh whose backward runs a function with no backward of its own (as a fused kernel
    without a double backward): the first derivative works, the second raises."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return _Opaque.apply(g, y)


class _Opaque(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, y):
        return g * (1 - y * y)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("derivative for fused_tanh_backward is not implemented")


class _Tanh(nn.Module):
    def forward(self, x):
        return _NoDoubleBackward.apply(x)


def test_auto_falls_back_when_double_backward_raises():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), _Tanh(), nn.Linear(5, 3)).double()
    plain = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    plain.load_state_dict(model.state_dict())
    x, y = classification_data()
    ref = dense_reference(plain, F.cross_entropy, (x, y))
    obj = Objective(model, F.cross_entropy, (x, y))
    v = torch.linspace(-1, 1, obj.num_params, dtype=torch.float64)
    hv = obj.hvp(v)
    assert obj.hvp_method_used == "finite_difference"
    assert "double backward raised" in obj.hvp_note and "not implemented" in obj.hvp_note
    assert float((hv - ref.hessian @ v).norm() / (ref.hessian @ v).norm()) <= 1e-7
    explicit = Objective(model, F.cross_entropy, (x, y), hvp_method="double_backward")
    with pytest.raises(RuntimeError, match="pass hvp_method='finite_difference'"):
        explicit.hvp(v)


def test_the_check_keeps_exact_products_it_cannot_judge():
    """ReLU and max-pool kinks crossed by the step make the differences disagree among
    themselves; an embedding's padding_idx makes them asymmetric: exact products stay."""
    model = bn_cnn()
    x, y = image_data(n=32)
    obj = Objective(model, F.cross_entropy, (x, y))
    obj.hvp(torch.ones(obj.num_params, dtype=torch.float64))
    assert obj.hvp_check.passed and obj.hvp_method_used == "double_backward"

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(9, 4, padding_idx=0)
            self.head = nn.Linear(4, 3)

        def forward(self, ids):
            return self.head(torch.tanh(self.embed(ids)).mean(dim=1))

    torch.manual_seed(0)
    bag = Bag().double()
    ids = torch.randint(0, 9, (16, 5), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0
    labels = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(1))
    obj = Objective(bag, F.cross_entropy, (ids, labels))
    obj.hvp(torch.linspace(-1, 1, obj.num_params, dtype=torch.float64))
    assert obj.hvp_check.passed and obj.hvp_method_used == "double_backward"


def test_unknown_hvp_method_is_refused():
    model, x, y = smooth_case()
    with pytest.raises(ValueError, match="finite_difference"):
        Objective(model, F.cross_entropy, (x, y), hvp_method="central")


# ------------------------------------------------------------ sharded random vectors
def test_a_sharded_draw_is_the_one_process_draw_restricted_to_the_pieces():
    n = 2 * RANDOM_CHUNK + 21  # several chunks and a tail shorter than 16
    segments = ((5, 100), (RANDOM_CHUNK - 3, 40), (2 * RANDOM_CHUNK + 10, 11))
    layout = ShardLayout(segments, n)
    for kind in ("gaussian", "rademacher"):
        full = random_vector(n, torch.Generator().manual_seed(4), kind)
        with sharded(layout):
            local = random_vector(layout.local_size, torch.Generator().manual_seed(4), kind)
        assert torch.equal(local, torch.cat([full[s : s + m] for s, m in segments]))
    small = random_vector(100, torch.Generator().manual_seed(1))
    assert torch.equal(
        small, torch.randn(100, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    )


class _GentleButOneSharp(torch.nn.Module):
    """0.5 sum a_i (w_i - 0.9)^2 (a_i in [0.5, 1.5]) plus A s^2 (1 - cos((w_0 - c) / s)):
    curvature A + a_0 along w_0, which changes over a length s. A step right for a random
    direction (whose w_0 part is 1/64 of it) crosses many periods along w_0: GPT-2 small in
    miniature (random directions smooth at steps near 0.3, the sharpest one not beyond 1e-3)."""

    def __init__(self, n: int = 4096, sharpness: float = 1000.0, length: float = 1e-2):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(1 + 0.1 * torch.randn(n, generator=gen))
        self.register_buffer("a", 0.5 + torch.rand(n, generator=gen))
        self.register_buffer("c", self.w.detach()[:1].clone())
        self.sharpness, self.length = sharpness, length

    def forward(self, x):
        gentle = 0.5 * (self.a * (self.w - 0.9) ** 2).sum()
        s = self.length
        sharp = self.sharpness * s * s * (1 - torch.cos((self.w[:1] - self.c) / s)).sum()
        return gentle + sharp


@pytest.mark.parametrize("settled", [SETTLED, math.inf])
def test_difference_step_walks_past_the_products_growth(monkeypatch, settled):
    """Along a vector mostly on the sharp coordinate the product grows as the step shrinks
    (the step first crosses many periods of the sharp term), as along GPT-2 small's
    gradient: the walk must not take that growth for rounding. With the rule that stopped
    at the first growing gap (``SETTLED`` = inf) the product is 98% off."""
    monkeypatch.setattr(_difference, "SETTLED", settled)
    model = _GentleButOneSharp(length=1e-3)
    data = (torch.zeros(1), torch.zeros(1))
    u = 0.02 * torch.randn(model.w.numel(), generator=torch.Generator().manual_seed(3))
    u[0] = 1.0
    exact = Objective(model, lambda o, y: o, data, check_hvp=False).hvp(u)
    obj = Objective(model, lambda o, y: o, data, hvp_method="finite_difference")
    error = float((obj.hvp(u) - exact).norm() / exact.norm())
    if settled == SETTLED:
        assert error < 1e-3
    else:
        assert error > 0.5


@pytest.mark.filterwarnings("ignore:the operator's rounding")
def test_difference_step_is_checked_along_the_top_ritz_vector(monkeypatch):
    """The step chosen along the first vector is far too long along the sharp direction:
    Lanczos first finds a wrong top eigenvalue, the check along its Ritz vector shortens
    the step, and the rerun finds A + a_0 within its (estimated) bound and 1e-4."""
    model = _GentleButOneSharp()
    data = (torch.zeros(1), torch.zeros(1))

    def loss(out, y):
        return out

    exact = 1000.0 + float(model.a[0])
    obj = Objective(model, loss, data, hvp_method="finite_difference")
    res = hessian_eigenvalues(obj, 1, tol=1e-4)
    assert obj._differences.recalibrations >= 1
    assert abs(res.value - exact) <= float(res.error_bounds[0])
    assert abs(res.value - exact) <= 1e-4 * exact
    # With the first vector's step alone it is 2.5% off (within its wide bound): what the
    # check repairs.
    monkeypatch.setattr(_reference, "MAX_STEP_REFINEMENTS", 0)
    once = Objective(model, loss, data, hvp_method="finite_difference")
    first = hessian_eigenvalues(once, 1, tol=1e-4)
    assert once._differences.recalibrations == 0
    assert abs(first.value - exact) > 1e-2 * exact


class _Wavy(torch.nn.Module):
    """cos(f w_i) averaged over 64 coordinates at w_i = 50, where float32's ulp is 3.8e-6."""

    def __init__(self, frequency: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((64,), 50.0))
        self.frequency = frequency

    def forward(self, x):
        return torch.cos(self.frequency * self.w).mean() + 1e-3 * (self.w**2).mean()


def _wavy_top(frequency: float):
    model = _Wavy(frequency)
    data = (torch.zeros(1), torch.zeros(1))
    obj = Objective(model, lambda out, y: out, data, hvp_method="finite_difference")
    res = hessian_eigenvalues(obj, 1, tol=1e-3)
    exact = hessian_eigenvalues(Objective(model.double(), lambda out, y: out, data), 1).value
    return obj, res, exact


@pytest.mark.filterwarnings("ignore:the operator's rounding")
def test_difference_step_stays_above_the_float_resolution():
    """Period 0.02: the walk goes down to steps near 1e-4, but not below what float32 can
    resolve at w = 50 (there theta +- h u round back to theta, and the product and its error
    estimate are both exactly zero: 0 +- 0 against 632 before this guard)."""
    obj, res, exact = _wavy_top(300.0)
    h = obj._differences.step_length
    unit = torch.full((64,), 1 / 8.0)
    assert obj._differences.quantization(obj.theta, unit, h) <= MAX_QUANTIZATION
    assert res.value > 0 and abs(res.value - exact) <= float(res.error_bounds[0])
    assert abs(res.value - exact) <= 5e-3 * exact


@pytest.mark.filterwarnings("ignore:the operator's rounding")
def test_difference_products_far_from_quadratic_are_reported_not_silent():
    """Period 2e-4, under the shortest step float32 resolves at w = 50: the eigenvalue is
    wrong, and the result says so."""
    with pytest.warns(RuntimeWarning, match="difference products are unreliable here"):
        _, res, exact = _wavy_top(3e4)
    assert "unreliable" in res.bound_note and res.bound_kind == "estimate"
    assert abs(res.value - exact) > 0.5 * abs(exact)  # the case is one where it is wrong


@pytest.mark.filterwarnings("ignore:the operator's rounding")
def test_step_reruns_share_the_product_budget(monkeypatch):
    """Lanczos reruns with a shorter step spend what the first run left of max_hvps."""
    model, x, y = smooth_case()
    obj = Objective(model, F.cross_entropy, (x, y), hvp_method="finite_difference")
    stale = _difference.Refined(0.0, True)
    monkeypatch.setattr(type(obj), "refine_difference_step", lambda *a, **k: stale)
    res = hessian_eigenvalues(obj, 1, tol=1e-14, max_hvps=12)
    assert res.num_hvps <= 12


class _Quartic(torch.nn.Module):
    """L(theta) = sum_i w_i theta_i^4: the difference error differs from direction to
    direction (w_0 = 1e4, the others 1)."""

    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.full((4,), 0.5, dtype=torch.float64))
        self.register_buffer("w", torch.tensor([1e4, 1.0, 1.0, 1.0], dtype=torch.float64))

    def forward(self, x):
        return (self.w * self.theta**4).sum() + 0 * x.sum()


def test_the_difference_error_is_cached_per_vector():
    model = _Quartic()
    data = (torch.zeros(1, dtype=torch.float64), torch.zeros(1))
    obj = Objective(model, lambda out, y: out, data, hvp_method="finite_difference")
    e0, e1 = torch.eye(4, dtype=torch.float64)[:2]
    gentle = obj.difference_error(e1, obj.hvp(e1))
    sharp = obj.difference_error(e0, obj.hvp(e0))
    assert sharp > 1e3 * gentle  # not the gentle direction's cached estimate
    fresh = Objective(model, lambda out, y: out, data, hvp_method="finite_difference")
    fresh._differences.step_length = obj._differences.step_length
    fresh._differences.scale = obj._differences.scale
    assert sharp == fresh.difference_error(e0, fresh.hvp(e0))


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_non_finite_error_estimate(monkeypatch, bad):
    """A NaN or infinite Richardson estimate (a NaN gradient at the wider step): a shorter
    step that resolves is taken; with none (the walk keeps h), nothing changes."""
    model, x, y = smooth_case()
    obj = Objective(model, F.cross_entropy, (x, y), hvp_method="finite_difference")
    v = torch.linspace(-1, 1, obj.num_params, dtype=torch.float64)
    unit = v / v.norm()
    product = obj.hvp(unit)
    diffs = obj._differences
    step = diffs.step()
    monkeypatch.setattr(_difference.DifferenceProducts, "error", lambda *a: bad)
    refined = obj.refine_difference_step(unit, product, 1e-12)
    assert refined.changed and diffs.step() < step and math.isfinite(refined.error)
    step = diffs.step()
    stuck = _difference._Walk(math.inf, step, product, 0)
    monkeypatch.setattr(_difference.DifferenceProducts, "_walk_down", lambda *a: stuck)
    refined = obj.refine_difference_step(unit, product, 1e-12)
    assert not refined.changed and diffs.step() == step and diffs.recalibrations == 1


def test_the_eigen_start_chooses_the_step_along_the_gradient_once():
    from flatlens.measures._starts import curvature_directions

    model, x, y = smooth_case()
    obj = Objective(model, F.cross_entropy, (x, y), hvp_method="finite_difference")
    theta = obj.point()
    curvature_directions(obj, theta, 1, generator=torch.Generator().manual_seed(0))
    assert obj.counts["gradient"] == 1 and obj.products["relative_step"] is not None
    curvature_directions(obj, theta, 1, generator=torch.Generator().manual_seed(0))
    assert obj.counts["gradient"] == 1  # the step is kept: no second gradient
