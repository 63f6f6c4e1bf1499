"""Zeroth-order sharpness R0 and average sharpness against closed forms and direct checks."""

from __future__ import annotations

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
    regression_data,
    regression_net,
    relu_rescaled,
    tiny_mlp,
)
from torch import nn

from flatlens import Objective
from flatlens.data import batches
from flatlens.measures._sharpness import average_sharpness, zeroth_order_sharpness


# ---------------------------------------------------------------------------------- quadratic
def test_trained_nets_are_near_a_minimum():
    for act in ("Tanh", "ReLU"):
        data = regression_data(act)
        start = Objective(regression_net(act, trained=False), nn.MSELoss(), data)
        near = Objective(regression_net(act), nn.MSELoss(), data)
        assert float(near.gradient().norm()) < 0.02 * float(start.gradient().norm())


@pytest.mark.parametrize("rho", RHOS)
def test_least_squares_minimum_gives_half_rho2_lambda(rho):
    model, data, hess = least_squares()
    lam = float(torch.linalg.eigvalsh(hess)[-1])
    obj = Objective(model, nn.MSELoss(), data)
    res = zeroth_order_sharpness(obj, rho)
    assert res.value == pytest.approx(rho**2 * lam / 2, rel=1e-3)
    assert res.max_loss - res.loss == pytest.approx(res.value, rel=1e-12)
    # The ascent alone (no eigenvector start) gets there too.
    alone = zeroth_order_sharpness(obj, rho, init=(), restarts=1, steps=40)
    assert alone.value == pytest.approx(rho**2 * lam / 2, rel=1e-3)
    assert alone.best_start == "random0"


# ---------------------------------------------------------------------------------- networks
@pytest.mark.parametrize("rho", [0.01, 0.1, 0.5])
def test_r0_beats_the_one_step_sam_point_and_linf_beats_l2(rho):
    for name, obj in nonlinear_cases():
        theta = obj.theta
        loss0, g = obj.loss_and_gradient(theta)
        sam = obj.loss(theta + rho * g / g.norm()) - loss0
        r0 = zeroth_order_sharpness(obj, rho)
        assert r0.value >= sam - 1e-12, name
        assert r0.value >= 0
        r0_inf = zeroth_order_sharpness(obj, rho, norm="linf")
        assert r0_inf.value >= r0.value, name
        sam_inf = obj.loss(theta + rho * torch.sign(g)) - loss0
        assert r0_inf.value >= sam_inf - 1e-12, name


def test_result_is_consistent_and_counts_are_exact():
    _, obj = nonlinear_cases()[0]
    steps, theta = 7, obj.theta
    before = dict(obj.counts)
    res = zeroth_order_sharpness(obj, 0.2, steps=steps, restarts=2, init=("gradient",))
    runs = 3  # gradient start + 2 random starts
    assert res.num_gradients == obj.counts["gradient"] - before["gradient"] == 1 + runs * steps
    assert res.num_losses == obj.counts["loss"] - before["loss"] == runs
    assert res.num_hvps == 0
    assert obj.loss(theta + res.delta) == pytest.approx(res.max_loss, rel=1e-12)
    assert res.delta_norm <= 0.2 * (1 + 1e-12)
    assert res.delta_l2 == pytest.approx(float(res.delta.norm()))
    assert set(res.start_values) == {"gradient", "random0", "random1"}
    assert res.value == pytest.approx(max(res.start_values.values()) - res.loss)
    out = json.loads(json.dumps(res.to_dict()))
    assert out["kind"] == "SharpnessResult" and "delta" not in out
    assert out["rho"] == 0.2 and out["init"] == ["gradient"] and out["seed"] == 0
    again = zeroth_order_sharpness(obj, 0.2, steps=steps, restarts=2, init=("gradient",))
    assert again.value == res.value  # the same seed gives the same result


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_adaptive_sharpness_is_invariant_to_relu_rescaling(norm):
    data = regression_data("ReLU")
    model = regression_net("ReLU")
    base = Objective(model, nn.MSELoss(), data)
    scaled = Objective(relu_rescaled(model, 3.0), nn.MSELoss(), data)
    assert scaled.loss() == pytest.approx(base.loss(), rel=1e-12)
    for rho in (0.05, 0.3):
        a = zeroth_order_sharpness(base, rho, norm=norm, adaptive=True)
        b = zeroth_order_sharpness(scaled, rho, norm=norm, adaptive=True)
        assert a.value > 0
        assert b.value == pytest.approx(a.value, rel=1e-8)
        avg_a = average_sharpness(base, rho, norm=norm, adaptive=True, samples=8)
        avg_b = average_sharpness(scaled, rho, norm=norm, adaptive=True, samples=8)
        assert avg_b.value == pytest.approx(avg_a.value, rel=1e-8)
    # The plain measure is not invariant, so the check above can fail.
    plain_a = zeroth_order_sharpness(base, 0.05, norm=norm)
    plain_b = zeroth_order_sharpness(scaled, 0.05, norm=norm)
    assert abs(plain_b.value / plain_a.value - 1) > 0.1


def test_per_batch_is_the_weighted_mean_of_batch_maxima():
    x, y = classification_data(23, 4, 3, seed=2)
    parts = batches(x, y, 8)  # sizes 8, 8, 7
    model = tiny_mlp(4, 5, 3, seed=2)
    obj = Objective(model, nn.CrossEntropyLoss(), parts)
    kw = {"steps": 5, "restarts": 0, "init": ("gradient",)}
    res = zeroth_order_sharpness(obj, 0.1, per_batch=True, **kw)
    single = [
        zeroth_order_sharpness(Objective(model, nn.CrossEntropyLoss(), p), 0.1, **kw) for p in parts
    ]
    sizes = [len(p[1]) for p in parts]
    assert res.batch_values == pytest.approx([s.value for s in single], rel=1e-12)
    expected = sum(n * s.value for n, s in zip(sizes, single, strict=True)) / sum(sizes)
    assert res.value == pytest.approx(expected, rel=1e-12)
    assert res.num_gradients == sum(s.num_gradients for s in single)
    assert res.delta is None and res.per_batch
    whole = zeroth_order_sharpness(obj, 0.1, **kw)
    assert whole.value != pytest.approx(res.value, rel=1e-3)


# ---------------------------------------------------------------------------------- average
@pytest.mark.parametrize("distribution", ["sphere", "gaussian"])
def test_average_sharpness_matches_the_quadratic_closed_form(distribution):
    model, data, hess = least_squares()
    obj = Objective(model, nn.MSELoss(), data)
    n, rho = hess.shape[0], 0.1
    res = average_sharpness(obj, rho, samples=400, distribution=distribution, seed=3)
    # E[0.5 delta^T H delta] = rho^2 tr(H) / (2 n) on the sphere, rho^2 tr(H) / 2 for N(0, rho^2 I)
    expected = rho**2 * float(hess.trace()) / (2 * n if distribution == "sphere" else 2)
    assert abs(res.value - expected) < 4 * res.stderr
    assert res.stderr < 0.1 * expected
    assert res.num_losses == 401 and res.num_gradients == 0


def test_average_is_below_worst_case():
    for name, obj in nonlinear_cases():
        avg = average_sharpness(obj, 0.1, samples=16)
        worst = zeroth_order_sharpness(obj, 0.1)
        assert avg.value < worst.value, name


# ---------------------------------------------------------------------------------- safety
def _measures():
    return [
        lambda o: zeroth_order_sharpness(o, 0.1, steps=4),
        lambda o: zeroth_order_sharpness(o, 0.1, steps=4, norm="linf", adaptive=True),
        lambda o: zeroth_order_sharpness(o, 0.1, steps=3, per_batch=True),
        lambda o: average_sharpness(o, 0.1, samples=4),
    ]


@pytest.mark.parametrize("k", [1, 3, 9])
def test_model_is_unchanged_also_when_interrupted(k):
    x, y = image_data(13, seed=0)
    for measure in _measures():
        model = bn_cnn()
        model.train()  # BatchNorm in train mode: the objective evaluates in eval mode
        model[0].weight.grad = torch.ones_like(model[0].weight)
        snap = ModelSnapshot.take(model)
        loss_fn = InterruptingLoss(k)
        obj = Objective(model, loss_fn, batches(x, y, 5), check_determinism=False)
        with pytest.raises(KeyboardInterrupt):
            measure(obj)
        snap.assert_unchanged(model)
        loss_fn.k = -1
        measure(obj)
        snap.assert_unchanged(model)


@pytest.mark.parametrize("rho", [0, -0.1, math.nan, math.inf])
def test_bad_radius_is_a_clear_error(rho):
    _, obj = nonlinear_cases()[0]
    with pytest.raises(ValueError, match="rho must be a finite number > 0"):
        zeroth_order_sharpness(obj, rho)
    with pytest.raises(ValueError, match="rho must be a finite number > 0"):
        average_sharpness(obj, rho)


def test_bad_settings_are_clear_errors():
    _, obj = nonlinear_cases()[0]
    cases = [
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"steps": 2.5}, "steps must be an integer >= 1"),
        ({"norm": "l1"}, "norm must be 'l2' or 'linf'"),
        ({"restarts": -1}, "restarts must be an integer >= 0"),
        ({"init": ("hessian",)}, "unknown init"),
        ({"init": (), "restarts": 0}, "no start points"),
        ({"adaptive_eta": -1.0}, "adaptive_eta must be"),
        ({"per_batch": True, "starts": [obj.zeros()]}, "per_batch=True"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            zeroth_order_sharpness(obj, 0.1, **kwargs)
    with pytest.raises(ValueError, match="samples must be an integer >= 2"):
        average_sharpness(obj, 0.1, samples=1)
    with pytest.raises(ValueError, match="distribution must be"):
        average_sharpness(obj, 0.1, distribution="uniform")
    with pytest.raises(ValueError, match="gaussian"):
        average_sharpness(obj, 0.1, norm="linf", distribution="gaussian")
    with pytest.raises(TypeError, match="seed must be"):
        zeroth_order_sharpness(obj, 0.1, seed="0")
