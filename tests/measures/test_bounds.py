"""The bound check R0 <= R1, R1 / rho^2 -> lambda_max, its report and its plot."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import (
    ModelSnapshot,
    bn_cnn,
    image_data,
    least_squares,
    nonlinear_cases,
    objective_reference,
)
from torch import nn

from flatlens import NonFiniteLossError, Objective
from flatlens.data import batches
from flatlens.measures import _bounds
from flatlens.measures._bounds import check_bound, plot_bound_rows
from flatlens.measures._flatness import first_order_flatness
from flatlens.measures._sharpness import zeroth_order_sharpness
from flatlens.measures._spectrum import hessian_eigenvalues

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_least_squares_rows_match_the_closed_form():
    model, data, hess = least_squares()
    lam = float(torch.linalg.eigvalsh(hess)[-1])
    obj = Objective(model, nn.MSELoss(), data)
    report = check_bound(obj, [0.1, 1e-3, 1.0, 1e-2])
    assert [r.rho for r in report.rows] == [1e-3, 1e-2, 0.1, 1.0]
    assert report.lambda_max == pytest.approx(lam, rel=1e-4)  # eigen_tol
    assert abs(report.lambda_max - lam) <= report.lambda_error_bound * (1 + 1e-9)
    for row in report.rows:
        assert row.r1 == pytest.approx(row.rho**2 * lam, rel=1e-3)
        assert row.r0 == pytest.approx(row.rho**2 * lam / 2, rel=1e-3)
        assert row.r1_ratio == pytest.approx(1.0, rel=1e-3)
        assert row.rho2_lambda == pytest.approx(row.rho**2 * report.lambda_max, rel=1e-14)
        assert row.r0_over_rho2 == pytest.approx(row.r0 / row.rho**2, rel=1e-14)
        assert row.holds
    assert report.all_hold


def test_bound_holds_on_small_networks_and_the_report_is_complete(tmp_path):
    for name, obj in nonlinear_cases():
        lam = float(torch.linalg.eigvalsh(objective_reference(obj).hessian)[-1])
        before = dict(obj.counts)
        report = check_bound(obj, [0.01, 0.05, 0.2, 1.0], steps=10)
        assert report.all_hold, name
        assert all(r.r0 <= r.r1 for r in report.rows), name
        assert report.lambda_max == pytest.approx(lam, rel=1e-3), name
        assert report.num_gradients == obj.counts["gradient"] - before["gradient"]
        assert report.num_hvps == obj.counts["hvp"] - before["hvp"]
        out = json.loads(json.dumps(report.to_dict()))
        assert out["kind"] == "BoundReport" and len(out["rows"]) == 4
        assert {"rho", "r0", "r1", "lambda_max", "rho2_lambda", "r1_ratio", "holds"} <= set(
            out["rows"][0]
        )
        text = report.table()
        assert "R1/(rho^2 lam)" in text and len(text.splitlines()) == 2 + 4
        path = report.plot(tmp_path / f"{name}.png")
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000
        # The JSON rows draw the same figure (the report pipeline plots from JSON).
        again = plot_bound_rows(out["rows"], tmp_path / f"{name}-json.png")
        assert again.read_bytes()[:8] == PNG_MAGIC


def test_holds_is_computed_from_the_measured_values():
    # Each row is what R0 and R1 give on their own with the same settings, eigenvector and
    # generator, and ``holds`` compares those numbers.
    _, obj = nonlinear_cases()[0]
    rhos, steps = [0.05, 0.3], 4
    report = check_bound(obj, rhos, steps=steps, seed=7)
    gen = torch.Generator().manual_seed(7)
    eig = hessian_eigenvalues(obj, 1, tol=1e-4, seed=gen)
    assert report.lambda_max == float(eig.eigenvalues[0])
    for rho, row in zip(rhos, report.rows, strict=True):
        common = {"steps": steps, "restarts": 1, "eigen": eig, "seed": gen}
        r0 = zeroth_order_sharpness(obj, rho, **common)
        r1 = first_order_flatness(obj, rho, starts=[r0.delta], **common)
        assert (row.r0, row.r1) == (r0.value, r1.value)
        assert row.holds is (r0.value <= r1.value)
        assert row.max_grad_norm == r1.max_grad_norm
    assert report.all_hold is all(r.holds for r in report.rows)


def test_a_violated_row_is_reported(tmp_path, monkeypatch):
    # A genuinely violated row: R1's ascent is crippled (one start along the flattest
    # eigenvector, a negligible step), so it finds rho^2 lambda_min < R0 = rho^2 lambda_max / 2.
    model, data, hess = least_squares()
    lams, vecs = torch.linalg.eigh(hess)
    assert lams[0] < lams[-1] / 2
    obj = Objective(model, nn.MSELoss(), data)

    def crippled(objective, rho, *, seed, at, **_ignored):
        return first_order_flatness(
            objective,
            rho,
            init=(),
            restarts=0,
            starts=[rho * vecs[:, 0]],
            steps=1,
            step_size=1e-9,
            seed=seed,
            at=at,
        )

    monkeypatch.setattr(_bounds, "first_order_flatness", crippled)
    report = check_bound(obj, [0.1, 1.0], steps=10, eigen_tol=1e-8)
    for row in report.rows:
        assert row.r0 == pytest.approx(row.rho**2 * float(lams[-1]) / 2, rel=1e-6)
        assert row.r1 == pytest.approx(row.rho**2 * float(lams[0]), rel=1e-6)
        assert row.holds is False
    assert report.all_hold is False
    lines = report.table().splitlines()[2:]
    assert [line.split()[-1] for line in lines] == ["NO", "NO"]
    assert json.loads(json.dumps(report.to_dict()))["all_hold"] is False
    assert report.plot(tmp_path / "bad.png").read_bytes()[:8] == PNG_MAGIC


def test_at_checks_the_bound_around_another_point():
    model, data, hess = least_squares()
    lam = float(torch.linalg.eigvalsh(hess)[-1])
    obj = Objective(model, nn.MSELoss(), data)
    minimum = obj.theta
    with torch.no_grad():
        model.weight.add_(0.3)
    snap = ModelSnapshot.take(model)
    report = check_bound(obj, [0.01, 0.1], at=minimum)
    snap.assert_unchanged(model)
    assert report.loss == pytest.approx(obj.loss(minimum), rel=1e-12)
    for row in report.rows:
        assert row.r1 == pytest.approx(row.rho**2 * lam, rel=1e-3)
        assert row.r0 == pytest.approx(row.rho**2 * lam / 2, rel=1e-3)
    away = check_bound(obj, [0.01])
    assert away.rows[0].r0 > 2 * report.rows[0].r0  # the model's own point differs


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_weights_raise_non_finite_loss_error(bad):
    model, data, _ = least_squares()
    with torch.no_grad():
        model.bias.fill_(bad)
    obj = Objective(model, nn.MSELoss(), data)
    with pytest.raises(NonFiniteLossError):
        check_bound(obj, [0.1], steps=2)


def test_model_is_unchanged():
    x, y = image_data(13, seed=0)
    model = bn_cnn()
    model.train()
    snap = ModelSnapshot.take(model)
    obj = Objective(model, nn.CrossEntropyLoss(), batches(x, y, 5))
    check_bound(obj, [0.05, 0.2], steps=3)
    snap.assert_unchanged(model)


def test_bad_radii_are_clear_errors():
    _, obj = nonlinear_cases()[0]
    with pytest.raises(ValueError, match="rhos is empty"):
        check_bound(obj, [])
    for bad in ([0.1, 0.0], [math.nan], [-1.0]):
        with pytest.raises(ValueError, match="each rho must be a finite number > 0"):
            check_bound(obj, bad)
    with pytest.raises(TypeError, match="rhos must be a sequence"):
        check_bound(obj, "0.1")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        check_bound(obj, [0.1], steps=0)
    with pytest.raises(ValueError, match="no rows"):
        plot_bound_rows([], "unused.png")


# ------------------------------------------------------------------ config= and the adaptive ball
def test_config_equals_the_keyword_settings():
    _, obj = nonlinear_cases()[0]
    from flatlens.measures import AscentConfig

    by_keywords = check_bound(obj, [0.05, 0.2], steps=3, restarts=0, seed=1).to_dict()
    config = AscentConfig(1.0, steps=3, restarts=0)  # its radius is replaced by each rho
    by_config = check_bound(obj, [0.05, 0.2], config=config, seed=1).to_dict()
    for report in (by_keywords, by_config):
        for key in ("seconds", "peak_memory_bytes", "peak_memory_kind"):
            report.pop(key)
    assert by_keywords == by_config
    with pytest.raises(TypeError, match="both config and"):
        check_bound(obj, [0.1], config=config, steps=2)
    with pytest.raises(ValueError, match="l2 ball"):
        check_bound(obj, [0.1], norm="linf")


def test_adaptive_rows_approach_the_scaled_hessians_top_eigenvalue():
    """In the ball ||delta / s|| <= rho, R1 / rho^2 -> lambda_max(S H S) at a minimum of a
    quadratic (least squares), S = diag(|theta| + eta)."""
    model, data, hess = least_squares()
    obj = Objective(model, nn.MSELoss(), data)
    eta = 0.1
    s = obj.theta.abs() + eta
    lam = float(torch.linalg.eigvalsh(s[:, None] * hess * s[None, :])[-1])
    report = check_bound(obj, [1e-3, 1e-2], adaptive=True, adaptive_eta=eta, steps=20)
    assert report.adaptive and report.adaptive_eta == eta
    assert report.lambda_max == pytest.approx(lam, rel=1e-4)
    for row in report.rows:
        assert row.r1_ratio == pytest.approx(1.0, rel=1e-3)
        assert row.r0 / row.rho**2 == pytest.approx(lam / 2, rel=1e-3)
        assert row.holds
