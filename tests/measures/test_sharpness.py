"""Zeroth-order sharpness R0 and average sharpness against closed forms and direct checks."""

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
    regression_data,
    regression_net,
    relu_rescaled,
    tiny_mlp,
)
from torch import nn

from flatlens import AscentConfig, NonFiniteLossError, Objective
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
        avg_a = average_sharpness(base, rho, norm=norm, adaptive=True, num_probes=8)
        avg_b = average_sharpness(scaled, rho, norm=norm, adaptive=True, num_probes=8)
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
    res = average_sharpness(obj, rho, num_probes=400, distribution=distribution, seed=3)
    # E[0.5 delta^T H delta] = rho^2 tr(H) / (2 n) on the sphere, rho^2 tr(H) / 2 for N(0, rho^2 I)
    expected = rho**2 * float(hess.trace()) / (2 * n if distribution == "sphere" else 2)
    assert abs(res.value - expected) < 4 * res.stderr
    assert res.stderr < 0.1 * expected
    assert res.num_losses == 401 and res.num_gradients == 0


def test_average_is_below_worst_case():
    for name, obj in nonlinear_cases():
        avg = average_sharpness(obj, 0.1, num_probes=16)
        worst = zeroth_order_sharpness(obj, 0.1)
        assert avg.value < worst.value, name


# ---------------------------------------------------------------------------------- safety
def _measures():
    return [
        lambda o: zeroth_order_sharpness(o, 0.1, steps=4),
        lambda o: zeroth_order_sharpness(o, 0.1, steps=4, norm="linf", adaptive=True),
        lambda o: zeroth_order_sharpness(o, 0.1, steps=3, per_batch=True),
        lambda o: average_sharpness(o, 0.1, num_probes=4),
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
    with pytest.raises(ValueError, match="num_probes must be an integer >= 2"):
        average_sharpness(obj, 0.1, num_probes=1)
    with pytest.raises(ValueError, match="distribution must be"):
        average_sharpness(obj, 0.1, distribution="uniform")
    with pytest.raises(ValueError, match="gaussian"):
        average_sharpness(obj, 0.1, norm="linf", distribution="gaussian")
    with pytest.raises(TypeError, match="seed must be"):
        zeroth_order_sharpness(obj, 0.1, seed="0")


# ---------------------------------------------------------------------------------- config
def _same(a, b):
    """Two results agree bit for bit (all but the wall-clock time and memory)."""
    da, db = a.to_dict(), b.to_dict()
    for key in ("seconds", "peak_memory_bytes", "peak_memory_kind"):
        da.pop(key), db.pop(key)
    assert da == db
    assert (a.delta is None and b.delta is None) or torch.equal(a.delta, b.delta)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"steps": 6, "restarts": 2, "init": ("gradient",), "momentum": 0.1, "step_size": 1.0},
        {"norm": "linf", "adaptive": True, "adaptive_eta": 0.01, "num_eigen": 2, "eigen_tol": 1e-4},
    ],
)
def test_config_equals_the_keyword_form_bit_for_bit(settings):
    _, obj = nonlinear_cases()[0]
    by_keywords = zeroth_order_sharpness(obj, 0.1, seed=3, **settings)
    by_config = zeroth_order_sharpness(obj, 0.1, config=AscentConfig(0.1, **settings), seed=3)
    _same(by_keywords, by_config)
    assert by_config.config == by_keywords.config


def test_result_keeps_the_config():
    _, obj = nonlinear_cases()[0]
    res = zeroth_order_sharpness(obj, 0.1, steps=3, norm="linf")
    # init=None resolves to R0's default starts, and the result says which ran.
    assert res.config == AscentConfig(0.1, steps=3, norm="linf", init=("gradient", "eigen"))
    again = zeroth_order_sharpness(obj, 0.1, config=res.config)
    assert again.value == res.value
    out = json.loads(json.dumps(res.to_dict()))
    assert out["config"] == {
        "rho": 0.1,
        "norm": "linf",
        "adaptive": False,
        "adaptive_eta": 0.0,
        "steps": 3,
        "restarts": 1,
        "init": ["gradient", "eigen"],
        "step_size": 2.0,
        "momentum": 0.25,
        "num_eigen": 1,
        "eigen_tol": 1e-4,
        "budget": None,
        "basis_device": None,
        "basis_dtype": None,
    }
    # The flat fields the reports read are still there and agree with the config.
    for key in ("rho", "norm", "adaptive", "adaptive_eta", "steps", "restarts", "init"):
        assert out[key] == out["config"][key], key
    assert AscentConfig(**out["config"]) == res.config  # the JSON rebuilds the config


def test_config_and_keywords_do_not_mix():
    _, obj = nonlinear_cases()[0]
    cfg = AscentConfig(0.1, steps=2)
    with pytest.raises(TypeError, match="both config and"):
        zeroth_order_sharpness(obj, 0.1, config=cfg, steps=3)
    with pytest.raises(TypeError, match="needs rho"):
        zeroth_order_sharpness(obj)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        zeroth_order_sharpness(obj, 0.1, step=3)
    with pytest.raises(TypeError, match="config must be an AscentConfig"):
        zeroth_order_sharpness(obj, 0.1, config={"rho": 0.1})


# ---------------------------------------------------------------------------------- at=
def test_at_measures_around_another_point():
    model, data, hess = least_squares()
    lam = float(torch.linalg.eigvalsh(hess)[-1])
    obj = Objective(model, nn.MSELoss(), data)
    minimum = obj.theta
    with torch.no_grad():  # move the model away from the minimum
        model.weight.add_(0.5)
    snap = ModelSnapshot.take(model)
    away = zeroth_order_sharpness(obj, 0.1)
    there = zeroth_order_sharpness(obj, 0.1, at=minimum)
    snap.assert_unchanged(model)
    # At the minimum of the quadratic, R0 = rho^2 lambda_max / 2 (dense float64 reference).
    assert there.value == pytest.approx(0.01 * lam / 2, rel=1e-3)
    assert away.value > 2 * there.value  # the gradient term: a different point was measured
    assert obj.loss(minimum + there.delta) == pytest.approx(there.max_loss, rel=1e-12)
    # The same as measuring a copy of the model that sits at the minimum, bit for bit.
    other = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(minimum, other.parameters())
    direct = zeroth_order_sharpness(Objective(other, nn.MSELoss(), data), 0.1)
    _same(direct, there)
    avg = average_sharpness(obj, 0.1, num_probes=8, at=minimum)
    avg_direct = average_sharpness(Objective(other, nn.MSELoss(), data), 0.1, num_probes=8)
    assert avg.value == avg_direct.value
    snap.assert_unchanged(model)


def test_at_with_per_batch_and_bad_points():
    x, y = classification_data(23, 4, 3, seed=2)
    obj = Objective(tiny_mlp(4, 5, 3, seed=2), nn.CrossEntropyLoss(), batches(x, y, 8))
    theta = obj.theta
    kw = {"steps": 3, "restarts": 0, "init": ("gradient",), "per_batch": True}
    assert zeroth_order_sharpness(obj, 0.1, at=theta, **kw).value == (
        zeroth_order_sharpness(obj, 0.1, **kw).value
    )
    moved = zeroth_order_sharpness(obj, 0.1, at=theta + 0.3, **kw)
    assert moved.value != zeroth_order_sharpness(obj, 0.1, **kw).value
    for bad in (theta[:-1], theta.reshape(1, -1), theta.tolist()):
        with pytest.raises(ValueError, match="`at` must be a flat tensor"):
            zeroth_order_sharpness(obj, 0.1, at=bad)
        with pytest.raises(ValueError, match="`at` must be a flat tensor"):
            average_sharpness(obj, 0.1, at=bad)


# ---------------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_weights_raise_non_finite_loss_error(bad):
    x, y = classification_data(23, 4, 3, seed=2)
    model = tiny_mlp(4, 5, 3, seed=2)
    with torch.no_grad():
        next(model.parameters())[0, 0] = bad
    snap = ModelSnapshot.take(model)
    obj = Objective(model, nn.CrossEntropyLoss(), batches(x, y, 8))
    for measure in (
        lambda: zeroth_order_sharpness(obj, 0.1, steps=2),
        lambda: zeroth_order_sharpness(obj, 0.1, steps=2, per_batch=True),
        lambda: zeroth_order_sharpness(obj, 0.1, config=AscentConfig(0.1, adaptive=True)),
        lambda: average_sharpness(obj, 0.1, num_probes=2),
    ):
        with pytest.raises(NonFiniteLossError):
            measure()
        snap.assert_unchanged(model)
    # A finite model measured at a non-finite point fails the same way.
    clean = Objective(tiny_mlp(4, 5, 3, seed=2), nn.CrossEntropyLoss(), (x, y))
    point = clean.theta
    point[0] = bad
    with pytest.raises(NonFiniteLossError):
        zeroth_order_sharpness(clean, 0.1, steps=2, at=point)


def test_average_sharpness_takes_the_geometry_from_a_config():
    _, obj = nonlinear_cases()[0]
    by_keywords = average_sharpness(obj, 0.1, norm="linf", adaptive=True, num_probes=4, seed=2)
    config = AscentConfig(0.5, norm="linf", adaptive=True)  # its radius is replaced by rho
    by_config = average_sharpness(obj, 0.1, config=config, num_probes=4, seed=2)
    assert by_config.value == by_keywords.value
    assert (by_config.rho, by_config.norm, by_config.adaptive) == (0.1, "linf", True)
    with pytest.raises(TypeError, match="both config and"):
        average_sharpness(obj, 0.1, config=config, norm="l2")
