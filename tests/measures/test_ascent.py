"""The projected-ascent engine: balls, projections, steepest directions, Auto-PGD, settings."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import given
from hypothesis import strategies as st

import flatlens
from flatlens.core import NonFiniteLossError
from flatlens.measures import AscentConfig
from flatlens.measures._apgd import apgd_checkpoints, multi_start_ascent, projected_ascent
from flatlens.measures._ascent import combine_batches
from flatlens.measures._ball import Ball
from flatlens.measures._config import resolve_config

GEOMETRIES = [("l2", False), ("l2", True), ("linf", False), ("linf", True)]


def _vec(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, generator=gen, dtype=torch.float64)


def _ball(norm: str, adaptive: bool, rho: float = 0.7, n: int = 9, seed: int = 0) -> Ball:
    scale = None
    if adaptive:
        scale = _vec(n, seed + 100).abs() + 0.05
        scale[3] = 0.0  # a zero weight: that coordinate is fixed at 0
    return Ball(rho, norm, scale)


def _scipy_projection(z: np.ndarray, s: np.ndarray, rho: float) -> np.ndarray:
    """Reference: minimize ||x - z||^2 subject to ||x / s||^2 <= rho^2 with SLSQP."""
    cons = {"type": "ineq", "fun": lambda x: rho**2 - np.sum((x / s) ** 2)}
    x0 = z * min(1.0, rho / np.linalg.norm(z / s)) * 0.99
    res = scipy.optimize.minimize(
        lambda x: np.sum((x - z) ** 2),
        x0,
        jac=lambda x: 2 * (x - z),
        constraints=[cons],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 500},
    )
    return res.x


# ---------------------------------------------------------------------------------- projection
def test_l2_projection_is_the_radial_rescaling():
    ball = Ball(0.5, "l2")
    z = _vec(7, 0, 3.0)
    x = ball.project(z)
    assert torch.allclose(x, z * 0.5 / z.norm(), rtol=0, atol=1e-15)
    inside = _vec(7, 1, 0.01)
    assert torch.equal(ball.project(inside), inside)


def test_linf_projection_clips_to_the_box():
    z = _vec(9, 0, 3.0)
    assert torch.equal(Ball(0.4, "linf").project(z), z.clamp(-0.4, 0.4))
    ball = _ball("linf", True, rho=0.4)
    x = ball.project(z)
    assert torch.equal(x, torch.maximum(torch.minimum(z, 0.4 * ball.scale), -0.4 * ball.scale))
    assert x[3] == 0


@pytest.mark.parametrize("seed", range(4))
def test_ellipsoid_projection_matches_slsqp_and_kkt(seed):
    n, rho = 6, 0.3
    s = _vec(n, seed + 10).abs() + 0.1
    s[0] *= 20  # strongly anisotropic
    z = _vec(n, seed, 2.0)
    ball = Ball(rho, "l2", s)
    x = ball.project(z)
    assert ball.norm_of(x) == pytest.approx(rho, rel=1e-12)
    # KKT of min ||x - z||^2 s.t. ||x/s|| <= rho: z - x = mu x / s^2 with one mu >= 0.
    mu = (z - x) / (x / s**2)
    assert float(mu.min()) > 0
    assert float((mu.max() - mu.min()) / mu.mean()) < 1e-9
    ref = _scipy_projection(z.numpy(), s.numpy(), rho)
    assert np.allclose(x.numpy(), ref, rtol=1e-5, atol=1e-6)
    # Not a rescaling: the rescaled point is feasible but strictly farther from z.
    rescaled = z * (rho / ball.norm_of(z))
    assert float((z - x).norm()) < float((z - rescaled).norm()) - 1e-6


@given(
    st.lists(st.floats(-5, 5), min_size=2, max_size=8),
    st.lists(st.floats(0.0, 3.0), min_size=8, max_size=8),
    st.floats(0.01, 2.0),
)
def test_ellipsoid_projection_is_feasible_and_idempotent(z, s, rho):
    n = len(z)
    zt = torch.tensor(z, dtype=torch.float64)
    st_ = torch.tensor(s[:n], dtype=torch.float64)
    ball = Ball(rho, "l2", st_)
    x = ball.project(zt)
    assert ball.norm_of(x) <= rho * (1 + 1e-12)
    assert bool((x[st_ == 0] == 0).all())
    assert torch.allclose(ball.project(x), x, rtol=1e-10, atol=1e-14)


def test_ellipsoid_projection_keeps_float32():
    s = _vec(5, 3).abs().float() + 0.1
    x = Ball(0.2, "l2", s).project(_vec(5, 4, 3.0).float())
    assert x.dtype == torch.float32
    assert Ball(0.2, "l2", s).norm_of(x) <= 0.2 * (1 + 1e-6)


def test_fixed_coordinates_stay_zero_everywhere():
    ball = _ball("l2", True)
    g = _vec(9, 5)
    assert ball.steepest(g)[3] == 0
    assert ball.to_sphere(g)[3] == 0
    assert ball.random_sphere(9, torch.Generator().manual_seed(0))[3] == 0
    bad = torch.zeros(9, dtype=torch.float64)
    bad[3] = 1e-3
    assert ball.norm_of(bad) == math.inf


@pytest.mark.parametrize(("norm", "adaptive"), GEOMETRIES)
def test_scaled_projection_makes_the_constrained_maximizer_a_fixed_point(norm, adaptive):
    # For f = <c, delta> the maximizer is rho d(c); one ascent step moves to (rho + eta) d(c).
    ball = _ball(norm, adaptive)
    d = ball.steepest(_vec(9, 12))
    x_star, stepped = ball.rho * d, (ball.rho + 0.5) * d
    assert torch.allclose(ball.project_scaled(stepped), x_star, rtol=1e-12, atol=1e-15)
    if norm == "l2" and adaptive:
        # The Euclidean projection onto the ellipsoid pulls it elsewhere: combined with the
        # scaled step it would not converge to the maximizer.
        assert float((ball.project(stepped) - x_star).norm()) > 1e-3
    else:
        assert torch.equal(ball.project_scaled(stepped), ball.project(stepped))
    z = _vec(9, 13, 5.0)
    assert ball.norm_of(ball.project_scaled(z)) == pytest.approx(ball.rho, rel=1e-12)


# ---------------------------------------------------------------------------------- directions
@pytest.mark.parametrize(("norm", "adaptive"), GEOMETRIES)
def test_steepest_direction_attains_the_dual_norm(norm, adaptive):
    ball = _ball(norm, adaptive)
    g = _vec(9, 7)
    d = ball.steepest(g)
    assert ball.norm_of(d) == pytest.approx(1.0, rel=1e-12)
    assert float(g @ d) == pytest.approx(ball.dual_norm(g), rel=1e-12)
    # No unit vector of the norm does better (Hoelder's inequality is tight at d).
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        u = ball.to_sphere(torch.randn(9, generator=gen, dtype=torch.float64)) / ball.rho
        assert float(g @ u) <= ball.dual_norm(g) * (1 + 1e-12)


@pytest.mark.parametrize(("norm", "adaptive"), GEOMETRIES)
def test_sphere_points_have_norm_rho(norm, adaptive):
    ball = _ball(norm, adaptive)
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        assert ball.norm_of(ball.random_sphere(9, gen)) == pytest.approx(ball.rho, rel=1e-12)
    assert torch.equal(ball.steepest(torch.zeros(9, dtype=torch.float64)), torch.zeros(9))


# ---------------------------------------------------------------------------------- Auto-PGD
def test_checkpoints_follow_croce_and_hein():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(20) == [5, 9, 12, 14, 16, 18, 19]
    assert apgd_checkpoints(1) == []


@pytest.mark.parametrize(("norm", "adaptive"), GEOMETRIES)
def test_linear_objective_reaches_rho_times_dual_norm(norm, adaptive):
    ball = _ball(norm, adaptive)
    c = _vec(9, 11)

    def fn(delta, need_grad):
        return float(c @ delta), c if need_grad else None

    run = projected_ascent(fn, ball, torch.zeros(9, dtype=torch.float64), 10)
    assert run.value == pytest.approx(ball.rho * ball.dual_norm(c), rel=1e-9)
    assert ball.norm_of(run.delta) <= ball.rho * (1 + 1e-12)


def test_quadratic_on_the_sphere_finds_the_top_eigenvalue():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))
    lam = torch.tensor([3.0, 1.5, 1.0, 0.8, 0.5, 0.3, 0.2, 0.1], dtype=torch.float64)
    a = (q * lam) @ q.T
    ball = Ball(0.3, "l2")

    def fn(delta, need_grad):
        return 0.5 * float(delta @ a @ delta), a @ delta if need_grad else None

    start = ball.random_sphere(8, gen)
    run = projected_ascent(fn, ball, start, 60)
    assert run.value == pytest.approx(0.5 * 0.09 * 3.0, rel=1e-8)


def test_best_iterate_is_kept_and_counts_are_exact():
    seen = []
    c = _vec(5, 3)

    def fn(delta, need_grad):
        # A wavy objective: steps overshoot, so later iterates can be worse.
        value = float(torch.sin(5 * delta).sum() + c @ delta)
        seen.append((value, need_grad))
        grad = 5 * torch.cos(5 * delta) + c
        return value, grad if need_grad else None

    ball = Ball(1.0, "l2")
    run = projected_ascent(fn, ball, ball.to_sphere(c), 15)
    assert len(seen) == 16 and [g for _, g in seen] == [True] * 15 + [False]
    assert run.values == [v for v, _ in seen]
    assert run.value == max(run.values)
    assert fn(run.delta, False)[0] == run.value


def test_step_halving_restarts_at_the_best_point():
    # f = -||delta - c||: normalized steps of fixed length circle around c; halving the
    # step (Auto-PGD) lets the iterates close in on the maximizer.
    c = torch.tensor([0.1, -0.05, 0.02], dtype=torch.float64)

    def fn(delta, need_grad):
        r = delta - c
        n = float(r.norm())
        return -n, (-r / n if n > 0 else torch.zeros_like(r)) if need_grad else None

    ball = Ball(1.0, "l2")
    start = ball.to_sphere(torch.tensor([-1.0, 1.0, 0.3], dtype=torch.float64))
    run = projected_ascent(fn, ball, start, 100, momentum=0.0)
    assert run.step_halvings >= 4
    assert run.value > -2.0 * 2.0**-run.step_halvings
    fixed = projected_ascent(fn, ball, start, 4, momentum=0.0)  # no checkpoint reached yet
    assert run.value > fixed.value


def test_multi_start_keeps_the_overall_best_and_the_center():
    ball = Ball(1.0, "l2")
    c = torch.tensor([1.0, 0.0], dtype=torch.float64)

    def fn(delta, need_grad):  # two local maxima: +c (value 1) and -c (value 0.5)
        x = float(delta @ c)
        value = x if x >= 0 else -0.5 * x
        grad = c if x >= 0 else -0.5 * c
        return value, grad if need_grad else None

    starts = [("left", -c), ("right", c)]
    best = multi_start_ascent(fn, ball, starts, 5)
    assert best.best_start == "right" and best.value == pytest.approx(1.0)
    assert set(best.start_values) == {"left", "right"}
    assert best.start_values["left"] == pytest.approx(0.5)
    center = multi_start_ascent(fn, ball, starts, 5, center_value=2.0)
    assert center.best_start == "center" and center.value == 2.0
    assert torch.equal(center.delta, torch.zeros(2, dtype=torch.float64))


def test_combine_batches_weights_like_the_risk():
    assert combine_batches([1.0, 4.0], [3, 1], "mean") == pytest.approx(7 / 4)
    assert combine_batches([1.0, 4.0], [3, 1], "sum") == 5.0


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("rho", [0, -1.0, math.nan, math.inf])
def test_bad_radius_is_rejected(rho):
    with pytest.raises(ValueError, match="rho must be a finite number > 0"):
        Ball(rho)


def test_bad_settings_are_rejected():
    with pytest.raises(TypeError, match="rho must be a real number"):
        Ball("0.1")
    with pytest.raises(ValueError, match="norm must be 'l2' or 'linf'"):
        Ball(0.1, "l1")
    with pytest.raises(ValueError, match="scale must be finite and >= 0"):
        Ball(0.1, "l2", torch.tensor([1.0, -1.0]))
    fn = lambda d, g: (0.0, torch.zeros_like(d))  # noqa: E731
    start = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        projected_ascent(fn, Ball(0.1), start, 0)
    with pytest.raises(ValueError, match="momentum must be in"):
        projected_ascent(fn, Ball(0.1), start, 3, momentum=1.0)
    with pytest.raises(ValueError, match="step_size must be"):
        projected_ascent(fn, Ball(0.1), start, 3, step_size=0.0)
    with pytest.raises(ValueError, match="unknown init"):
        AscentConfig(0.1, init=("hessian",))
    with pytest.raises(ValueError, match="restarts must be an integer >= 0"):
        AscentConfig(0.1, restarts=-1)
    with pytest.raises(ValueError, match="no start points"):
        multi_start_ascent(fn, Ball(0.1), [], 3)


# ---------------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_value_stops_the_ascent(bad):
    # NaN never wins a comparison: without the check the ascent would carry on silently.
    calls = []

    def fn(delta, need_grad):
        calls.append(delta)
        value = bad if len(calls) == 3 else float(delta.sum())
        return value, torch.ones_like(delta) if need_grad else None

    start = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(NonFiniteLossError, match="step 2"):
        projected_ascent(fn, Ball(0.5), start, 5)
    assert issubclass(NonFiniteLossError, FloatingPointError)
    finite = lambda d, g: (0.0, torch.zeros_like(d) if g else None)  # noqa: E731
    with pytest.raises(NonFiniteLossError, match="center"):
        multi_start_ascent(finite, Ball(0.5), [("a", start)], 2, center_value=bad)


# ---------------------------------------------------------------------------------- config
def test_config_is_public_checked_and_normalized():
    assert flatlens.AscentConfig is AscentConfig
    cfg = AscentConfig(1, init=["eigen"], steps=np.int64(7), momentum=0, adaptive_eta=1)
    assert cfg.rho == 1.0 and type(cfg.rho) is float
    assert cfg.init == ("eigen",) and cfg.steps == 7 and type(cfg.steps) is int
    assert type(cfg.momentum) is float and type(cfg.adaptive_eta) is float
    assert AscentConfig(0.1, init="gradient").init == ("gradient",)
    assert AscentConfig(0.1).init is None  # the measure's default
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        AscentConfig(0.1, "linf")  # type: ignore[misc]  # settings are keyword-only
    # replace() makes a variant and checks it again.
    assert dataclasses.replace(cfg, steps=9).steps == 9
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        dataclasses.replace(cfg, steps=0)
    # The ball of the settings.
    theta = _vec(4, 0)
    ball = AscentConfig(0.3, norm="linf", adaptive=True, adaptive_eta=0.5).ball(theta)
    assert ball.rho == 0.3 and ball.norm == "linf"
    assert torch.equal(ball.scale, theta.abs() + 0.5)


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        ({"rho": 0.0}, ValueError, "rho must be a finite number > 0"),
        ({"rho": math.inf}, ValueError, "rho must be a finite number > 0"),
        ({"rho": "0.1"}, TypeError, "rho must be a real number"),
        ({"rho": True}, TypeError, "rho must be a real number"),
        ({"norm": "l1"}, ValueError, "norm must be 'l2' or 'linf'"),
        ({"adaptive": 1}, TypeError, "adaptive must be True or False"),
        ({"adaptive_eta": -1.0}, ValueError, "adaptive_eta must be a finite number >= 0"),
        ({"adaptive_eta": math.inf}, ValueError, "adaptive_eta must be a finite number >= 0"),
        ({"steps": 0}, ValueError, "steps must be an integer >= 1"),
        ({"steps": 2.5}, ValueError, "steps must be an integer >= 1"),
        ({"steps": True}, ValueError, "steps must be an integer >= 1"),
        ({"restarts": -1}, ValueError, "restarts must be an integer >= 0"),
        ({"init": ("hessian",)}, ValueError, "unknown init"),
        ({"init": 3}, TypeError, "init must be a sequence"),
        ({"step_size": 0.0}, ValueError, "step_size must be a finite number > 0"),
        ({"step_size": math.nan}, ValueError, "step_size must be a finite number > 0"),
        ({"momentum": 1.0}, ValueError, "momentum must be in \\[0, 1\\)"),
        ({"momentum": -0.1}, ValueError, "momentum must be in \\[0, 1\\)"),
        ({"momentum": "0.1"}, TypeError, "momentum must be"),
        ({"num_eigen": 0}, ValueError, "num_eigen must be an integer >= 1"),
        ({"eigen_tol": 0.0}, ValueError, "eigen_tol must be a finite number > 0"),
    ],
)
def test_invalid_config_values_are_clear_errors(settings, error, message):
    kwargs = {"rho": 0.1, **settings}
    rho = kwargs.pop("rho")
    with pytest.raises(error, match=message):
        AscentConfig(rho, **kwargs)


def test_config_is_built_from_rho_and_settings_or_given_whole():
    default = ("gradient", "eigen")
    kw = resolve_config(0.2, None, {"steps": 5}, default_init=default, measure="R0")
    assert kw == AscentConfig(0.2, steps=5, init=default)
    given = AscentConfig(0.2, steps=5)
    assert resolve_config(0.2, given, {}, default_init=default, measure="R0") == kw
    # The radius passed first replaces the config's: one config serves every radius.
    other = resolve_config(0.5, given, {}, default_init=default, measure="R0")
    assert other == AscentConfig(0.5, steps=5, init=default)
    own = AscentConfig(0.2, init=("eigen",))
    assert resolve_config(0.2, own, {}, default_init=default, measure="R0") == own
    with pytest.raises(TypeError, match="rho must be a real number"):
        resolve_config(None, None, {}, default_init=default, measure="R0")
    with pytest.raises(TypeError, match="both config and \\['steps'\\]"):
        resolve_config(0.2, given, {"steps": 3}, default_init=default, measure="R0")
    with pytest.raises(TypeError, match="unexpected keyword argument\\(s\\) \\['stepz'\\]"):
        resolve_config(0.2, None, {"stepz": 3}, default_init=default, measure="R0")
    with pytest.raises(TypeError, match="config must be an AscentConfig"):
        resolve_config(0.2, {"rho": 0.2}, {}, default_init=default, measure="R0")
