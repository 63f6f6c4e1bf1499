"""First-order flatness R1 against closed forms, dense float64 Hessians and direct checks."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import (
    RHOS,
    InterruptingLoss,
    ModelSnapshot,
    bn_cnn,
    classification_data,
    image_data,
    least_squares,
    nonlinear_cases,
    objective_reference,
    regression_data,
    regression_net,
    relu_rescaled,
)
from helpers import tiny_mlp as make_mlp
from torch import nn

from flatlens import AscentConfig, NonFiniteLossError, Objective
from flatlens.data import batches
from flatlens.measures._ball import Ball
from flatlens.measures._flatness import first_order_flatness, gradient_norm_function
from flatlens.measures._sharpness import zeroth_order_sharpness
from flatlens.measures._spectrum import hessian_eigenvalues


# ---------------------------------------------------------------------------------- quadratic
@pytest.mark.parametrize("rho", RHOS)
def test_least_squares_minimum_gives_rho2_lambda(rho):
    model, data, hess = least_squares()
    lam = float(torch.linalg.eigvalsh(hess)[-1])
    obj = Objective(model, nn.MSELoss(), data)
    res = first_order_flatness(obj, rho)
    assert res.value == pytest.approx(rho**2 * lam, rel=1e-3)
    assert res.max_grad_norm == pytest.approx(rho * lam, rel=1e-3)
    assert res.grad_norm_at_center < 1e-10
    alone = first_order_flatness(obj, rho, init=(), restarts=1, steps=20)
    assert alone.value == pytest.approx(rho**2 * lam, rel=1e-3)


# ---------------------------------------------------------------------------------- gradient
@pytest.mark.parametrize(("norm", "adaptive"), [("l2", False), ("l2", True), ("linf", False)])
def test_ascended_function_and_gradient_match_dense_reference(norm, adaptive):
    x, y = classification_data(23, 4, 3, seed=3)
    obj = Objective(make_mlp(4, 5, 3, seed=3), nn.CrossEntropyLoss(), (x, y))
    theta = obj.theta
    ball = Ball.around(theta, 0.3, norm, adaptive)
    delta = ball.random_sphere(obj.num_params, torch.Generator().manual_seed(0))
    value, grad = gradient_norm_function(obj, ball, theta)(delta, True)
    ref = objective_reference(obj, at=theta + delta)
    g, h = ref.gradient, ref.hessian
    s = ball.scale if adaptive else torch.ones_like(g)
    if norm == "l2":
        expected_value = float((s * g).norm())
        expected_grad = h @ (s * s * g) / (s * g).norm()
    else:
        expected_value = float((s * g).abs().sum())
        expected_grad = h @ (s * torch.sign(g))
    assert value == pytest.approx(expected_value, rel=1e-10)
    assert torch.allclose(grad, expected_grad, rtol=1e-9, atol=1e-12)
    assert gradient_norm_function(obj, ball, theta)(delta, False)[1] is None


# ---------------------------------------------------------------------------------- networks
@pytest.mark.parametrize("rho", [0.01, 0.1, 0.5])
def test_r1_dominates_r0_and_the_eigenvector_points(rho):
    for name, obj in nonlinear_cases():
        theta = obj.theta
        eig = hessian_eigenvalues(obj, 1, tol=1e-6)
        v = eig.eigenvectors[0]
        r1 = first_order_flatness(obj, rho)
        r0 = zeroth_order_sharpness(obj, rho)
        assert r0.value <= r1.value, name
        for sign in (1, -1):
            at_v = rho * float(obj.gradient(theta + sign * rho * v).norm())
            assert r1.value >= at_v * (1 - 1e-12), name
        assert r1.value >= rho * float(obj.gradient(theta).norm()), name
        assert r1.value == pytest.approx(rho * r1.max_grad_norm, rel=1e-14)
        best = obj.gradient(theta + r1.delta).norm()
        assert float(best) == pytest.approx(r1.max_grad_norm, rel=1e-10)
        assert r1.delta_norm <= rho * (1 + 1e-12)
        r1_inf = first_order_flatness(obj, rho, norm="linf")
        assert r1_inf.value >= r1.value, name


def test_r1_over_rho2_approaches_lambda_max_near_a_minimum():
    obj = Objective(regression_net("Tanh"), nn.MSELoss(), regression_data("Tanh"))
    lam = float(torch.linalg.eigvalsh(objective_reference(obj).hessian)[-1])
    g0 = float(obj.gradient().norm())
    for rho in (0.003, 0.01, 0.03):
        r1 = first_order_flatness(obj, rho)
        # Near theta*, ||grad L(theta + delta)|| = ||g0 + H delta|| + O(rho^2), so
        # rho lambda - g0 <= max ||grad L|| <= rho lambda + g0 up to O(rho^2).
        assert rho * lam - g0 - 50 * rho**2 <= r1.max_grad_norm <= rho * lam + g0 + 50 * rho**2


def test_counts_are_exact_and_the_result_is_json():
    _, obj = nonlinear_cases()[0]
    steps = 6
    before = dict(obj.counts)
    res = first_order_flatness(obj, 0.1, steps=steps, restarts=1, init=("gradient",))
    # center gradient + (steps + 1) gradients and steps HVPs for each of the 2 runs
    assert res.num_gradients == obj.counts["gradient"] - before["gradient"] == 1 + 2 * (steps + 1)
    assert res.num_hvps == obj.counts["hvp"] - before["hvp"] == 2 * steps
    assert res.num_losses == 0
    with_eigen = first_order_flatness(obj, 0.1, steps=steps, restarts=0, init=("eigen",))
    assert with_eigen.num_hvps > 2 * steps  # the Lanczos run is counted too
    out = json.loads(json.dumps(res.to_dict()))
    assert out["kind"] == "FlatnessResult" and "delta" not in out
    assert out["num_hvps"] == 2 * steps and out["value"] == pytest.approx(res.value)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_adaptive_flatness_is_invariant_to_relu_rescaling(norm):
    data = regression_data("ReLU")
    model = regression_net("ReLU")
    base = Objective(model, nn.MSELoss(), data)
    scaled = Objective(relu_rescaled(model, 3.0), nn.MSELoss(), data)
    for rho in (0.05, 0.3):
        a = first_order_flatness(base, rho, norm=norm, adaptive=True)
        b = first_order_flatness(scaled, rho, norm=norm, adaptive=True)
        assert a.value > 0
        assert b.value == pytest.approx(a.value, rel=1e-8)
        assert b.grad_norm_at_center == pytest.approx(a.grad_norm_at_center, rel=1e-8)
    plain_a = first_order_flatness(base, 0.05, norm=norm)
    plain_b = first_order_flatness(scaled, 0.05, norm=norm)
    assert abs(plain_b.value / plain_a.value - 1) > 0.1


def test_per_batch_is_the_weighted_mean_of_batch_maxima():
    x, y = classification_data(23, 4, 3, seed=2)
    parts = batches(x, y, 8)
    model = make_mlp(4, 5, 3, seed=2)
    obj = Objective(model, nn.CrossEntropyLoss(), parts)
    kw = {"steps": 4, "restarts": 0, "init": ("gradient",)}
    res = first_order_flatness(obj, 0.1, per_batch=True, **kw)
    single = [
        first_order_flatness(Objective(model, nn.CrossEntropyLoss(), p), 0.1, **kw) for p in parts
    ]
    sizes = [len(p[1]) for p in parts]
    assert res.batch_values == pytest.approx([s.value for s in single], rel=1e-12)
    expected = sum(n * s.value for n, s in zip(sizes, single, strict=True)) / sum(sizes)
    assert res.value == pytest.approx(expected, rel=1e-12)
    assert res.num_hvps == sum(s.num_hvps for s in single)
    sum_obj = Objective(model, nn.CrossEntropyLoss(reduction="sum"), parts)
    summed = first_order_flatness(sum_obj, 0.1, per_batch=True, **kw)
    assert summed.value == pytest.approx(sum(summed.batch_values), rel=1e-12)


# ---------------------------------------------------------------------------------- safety
@pytest.mark.parametrize("k", [1, 4, 11])
def test_model_is_unchanged_also_when_interrupted(k):
    x, y = image_data(13, seed=0)
    measures = [
        lambda o: first_order_flatness(o, 0.1, steps=3),
        lambda o: first_order_flatness(o, 0.1, steps=3, adaptive=True, norm="linf"),
        lambda o: first_order_flatness(o, 0.1, steps=2, per_batch=True),
    ]
    for measure in measures:
        model = bn_cnn()
        model.train()
        snap = ModelSnapshot.take(model)
        loss_fn = InterruptingLoss(k)
        obj = Objective(model, loss_fn, batches(x, y, 5), check_determinism=False)
        with pytest.raises(KeyboardInterrupt):
            measure(obj)
        snap.assert_unchanged(model)
        loss_fn.k = -1
        measure(obj)
        snap.assert_unchanged(model)


@pytest.mark.parametrize("rho", [0.0, -1.0, math.nan])
def test_bad_settings_are_clear_errors(rho):
    _, obj = nonlinear_cases()[0]
    with pytest.raises(ValueError, match="rho must be a finite number > 0"):
        first_order_flatness(obj, rho)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        first_order_flatness(obj, 0.1, steps=0)
    with pytest.raises(ValueError, match="norm must be 'l2' or 'linf'"):
        first_order_flatness(obj, 0.1, norm="l1")
    with pytest.raises(ValueError, match="starts\\[0\\] must be a flat tensor"):
        first_order_flatness(obj, 0.1, starts=[torch.zeros(3)])
    with pytest.raises(ValueError, match="num_eigen must be an integer >= 1"):
        first_order_flatness(obj, 0.1, num_eigen=0)


# ---------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"steps": 5, "restarts": 2, "init": ("gradient",), "momentum": 0.0, "step_size": 0.5},
        {"norm": "linf", "adaptive": True, "adaptive_eta": 0.01, "num_eigen": 2},
    ],
)
def test_config_equals_the_keyword_form_bit_for_bit(settings):
    _, obj = nonlinear_cases()[1]
    by_keywords = first_order_flatness(obj, 0.05, seed=4, **settings)
    by_config = first_order_flatness(obj, 0.05, config=AscentConfig(0.05, **settings), seed=4)
    da, db = by_keywords.to_dict(), by_config.to_dict()
    for key in ("seconds", "peak_memory_bytes", "peak_memory_kind"):
        da.pop(key), db.pop(key)
    assert da == db
    assert torch.equal(by_keywords.delta, by_config.delta)


def test_result_keeps_the_config_with_r1s_default_starts():
    _, obj = nonlinear_cases()[0]
    res = first_order_flatness(obj, 0.1, steps=2)
    assert res.config == AscentConfig(0.1, steps=2, init=("eigen", "gradient"))
    assert res.init == ["eigen", "gradient"]
    out = json.loads(json.dumps(res.to_dict()))
    assert out["config"]["init"] == ["eigen", "gradient"] and out["config"]["rho"] == 0.1
    assert out["rho"] == 0.1 and out["steps"] == 2  # the flat fields stay
    # One config serves both measures; each fills in its own default starts.
    shared = AscentConfig(0.1, steps=2)
    assert first_order_flatness(obj, 0.1, config=shared).config.init == ("eigen", "gradient")
    assert zeroth_order_sharpness(obj, 0.1, config=shared).config.init == ("gradient", "eigen")
    assert first_order_flatness(obj, 0.2, config=shared).config.rho == 0.2  # rho wins
    with pytest.raises(TypeError, match="both config and"):
        first_order_flatness(obj, 0.1, config=shared, steps=3)
    # Calls written before rho became required still work, with a warning.
    with pytest.warns(FutureWarning, match=r"first_order_flatness\(objective, 0.1, config"):
        old = first_order_flatness(obj, config=shared)
    assert old.value == first_order_flatness(obj, 0.1, config=shared).value


# ---------------------------------------------------------------------------------- at=
def test_at_measures_around_another_point():
    model, data, hess = least_squares()
    lam = float(torch.linalg.eigvalsh(hess)[-1])
    obj = Objective(model, nn.MSELoss(), data)
    minimum = obj.theta
    with torch.no_grad():
        model.bias.add_(1.0)
    snap = ModelSnapshot.take(model)
    assert float(obj.gradient().norm()) > 0.1
    there = first_order_flatness(obj, 0.1, at=minimum)
    snap.assert_unchanged(model)
    # At the minimum of the quadratic, R1 = rho^2 lambda_max (dense float64 reference).
    assert there.value == pytest.approx(0.01 * lam, rel=1e-3)
    assert there.grad_norm_at_center < 1e-10
    assert float(obj.gradient(minimum + there.delta).norm()) == pytest.approx(
        there.max_grad_norm, rel=1e-10
    )
    other = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(minimum, other.parameters())
    direct = first_order_flatness(Objective(other, nn.MSELoss(), data), 0.1)
    assert direct.value == there.value and torch.equal(direct.delta, there.delta)
    with pytest.raises(ValueError, match="`at` must be a flat tensor"):
        first_order_flatness(obj, 0.1, at=minimum[1:])


def test_at_matches_a_dense_reference_away_from_a_minimum():
    x, y = classification_data(23, 4, 3, seed=3)
    obj = Objective(make_mlp(4, 5, 3, seed=3), nn.CrossEntropyLoss(), (x, y))
    point = obj.theta + 0.2 * torch.randn(
        obj.num_params, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    res = first_order_flatness(obj, 0.05, at=point, steps=4)
    ref = objective_reference(obj, at=point)
    assert res.grad_norm_at_center == pytest.approx(float(ref.gradient.norm()), rel=1e-10)
    at_max = objective_reference(obj, at=point + res.delta)
    assert res.max_grad_norm == pytest.approx(float(at_max.gradient.norm()), rel=1e-10)
    assert res.value >= 0.05 * float(ref.gradient.norm())


# ---------------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_weights_raise_non_finite_loss_error(bad):
    x, y = classification_data(23, 4, 3, seed=2)
    model = make_mlp(4, 5, 3, seed=2)
    with torch.no_grad():
        next(model.parameters())[0, 0] = bad
    snap = ModelSnapshot.take(model)
    obj = Objective(model, nn.CrossEntropyLoss(), batches(x, y, 8))
    for measure in (
        lambda: first_order_flatness(obj, 0.1, steps=2),
        lambda: first_order_flatness(obj, 0.1, steps=2, per_batch=True),
        lambda: first_order_flatness(obj, 0.1, steps=2, adaptive=True, norm="linf"),
    ):
        with pytest.raises(NonFiniteLossError):
            measure()
        snap.assert_unchanged(model)


def test_a_loss_that_overflows_inside_the_ball_is_reported():
    # L(w) = exp(w^2) is finite at w = 26 (about 1e293) but overflows at w = 27 (rho = 1).
    class Exp(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([26.0], dtype=torch.float64))

        def forward(self, x):
            return x * torch.exp(self.w**2)

    data = (torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64))
    obj = Objective(Exp(), lambda out, y: (out - y).sum(), data)
    assert math.isfinite(obj.loss())
    with pytest.raises(NonFiniteLossError):
        first_order_flatness(obj, 1.0, steps=3, init=("gradient",), restarts=0)


@pytest.mark.parametrize("budget", [6, 12, 30])
def test_a_budget_caps_the_cost_in_hvp_equivalents(budget):
    model = make_mlp()
    obj = Objective(model, torch.nn.functional.cross_entropy, classification_data())
    res = first_order_flatness(obj, 0.05, steps=20, budget=budget)
    spent = res.num_hvps + res.num_gradients / 2 + res.num_losses / 4
    assert spent <= budget, (spent, res.num_hvps, res.num_gradients, res.num_losses)
    assert 1 <= res.config.steps <= 20 and res.steps == res.config.steps
    assert res.config.budget == budget
    # The centre competes with every start: R1 >= rho * ||grad L(theta)|| on any budget.
    assert res.value >= 0.05 * res.grad_norm_at_center * (1 - 1e-12)
    with pytest.raises(ValueError, match="budget must be a finite number > 0"):
        first_order_flatness(obj, 0.05, budget=0)
