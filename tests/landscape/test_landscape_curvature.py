"""The |lambda_min / lambda_max| map against dense Hessians."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from helpers import (
    classification_data,
    dense_hessian,
    quadratic_objective_parts,
    tiny_mlp,
    uneven_batches,
)

from flatlens import Objective
from flatlens.landscape import curvature_map, random_direction


def test_quadratic_has_the_same_spectrum_everywhere():
    model, loss_fn, data, _ = quadratic_objective_parts([-0.5, 0.1, 1.0, 2.0, 4.0])
    obj = Objective(model, loss_fn, data)
    d1, d2 = random_direction(obj, seed=0, ignore=None), random_direction(obj, seed=1, ignore=None)
    cm = curvature_map(obj, d1, d2, num_points=(3, 3), tol=1e-10)
    np.testing.assert_allclose(cm.values["lambda_max"], 4.0, rtol=1e-9)
    np.testing.assert_allclose(cm.values["lambda_min"], -0.5, rtol=1e-9)
    np.testing.assert_allclose(cm.values["ratio"], 0.125, rtol=1e-9)
    assert cm.settings["num_hvps"] > 0 and cm.settings["all_converged"]
    assert cm.center["ratio"] == cm.values["ratio"][1, 1]


def test_mlp_line_matches_dense_eigenvalues():
    x, y = classification_data(23)
    obj = Objective(tiny_mlp(), F.cross_entropy, uneven_batches(x, y, [10, 13]))
    d = random_direction(obj, seed=2)
    cm = curvature_map(obj, d, span=(-1, 1), num_points=3, tol=1e-10)
    assert cm.ndim == 1
    for a, top, bottom in zip(cm.x, cm.values["lambda_max"], cm.values["lambda_min"], strict=True):
        evals = torch.linalg.eigvalsh(dense_hessian(obj, at=obj.theta + a * d.vector))
        np.testing.assert_allclose([top, bottom], [float(evals[-1]), float(evals[0])], rtol=1e-7)
    np.testing.assert_allclose(
        cm.values["ratio"], np.abs(cm.values["lambda_min"] / cm.values["lambda_max"]), rtol=0
    )
