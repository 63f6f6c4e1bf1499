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

from flatlens import Objective
from flatlens.data import batches
from flatlens.measures._bounds import BoundReport, check_bound, plot_bound_rows

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


def test_a_violated_row_is_reported(tmp_path):
    _, obj = nonlinear_cases()[0]
    report = check_bound(obj, [0.1], steps=3)
    row = report.rows[0]
    row.holds = False  # as if R1's ascent had missed the maximum
    report.all_hold = False
    assert "NO" in report.table()
    assert report.plot(tmp_path / "bad.png").read_bytes()[:8] == PNG_MAGIC
    assert isinstance(report, BoundReport)


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
