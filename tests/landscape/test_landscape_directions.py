"""Directions: filter/layer/model normalization, interpolation, PCA and Hessian eigenvectors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import classification_data, dense_hessian, tiny_mlp, uneven_batches
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from flatlens import Objective
from flatlens.landscape import (
    Direction,
    as_direction,
    cosine,
    eigen_directions,
    interpolation_direction,
    normalize_direction,
    pca_directions,
    random_direction,
)


class Params(nn.Module):
    """A bag of parameters of arbitrary shapes (the forward pass is never called)."""

    def __init__(self, shapes: list[tuple[int, ...]], seed: int, zero_filter: bool) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        for i, shape in enumerate(shapes):
            w = torch.randn(shape, generator=gen, dtype=torch.float64)
            if zero_filter and len(shape) >= 2:
                w[0] = 0.0
            self.register_parameter(f"p{i}", nn.Parameter(w))

    def forward(self, x):  # pragma: no cover - never called
        raise AssertionError("directions must not run the model")


def bag_objective(shapes, seed=0, zero_filter=False) -> Objective:
    model = Params(shapes, seed, zero_filter)
    return Objective(model, F.mse_loss, (torch.zeros(1, 1), torch.zeros(1, 1)))


def mlp_objective(seed: int = 0, dtype=torch.float64) -> Objective:
    x, y = classification_data(23, dtype=dtype)
    return Objective(
        tiny_mlp(seed=seed, dtype=dtype), F.cross_entropy, uneven_batches(x, y, [10, 13])
    )


shape_strategy = st.lists(
    st.lists(st.integers(1, 4), min_size=0, max_size=4).map(tuple), min_size=1, max_size=5
)


@given(shapes=shape_strategy, seed=st.integers(0, 2**16), zero_filter=st.booleans())
def test_filter_normalized_filters_have_the_parameter_filter_norms(shapes, seed, zero_filter):
    obj = bag_objective(shapes, seed, zero_filter)
    d = random_direction(obj, normalization="filter", ignore="biasbn", seed=seed)
    theta = obj.theta
    for _, sl, shape in obj.space.segments():
        dv, wv = d.vector[sl], theta[sl]
        if len(shape) < 2:
            assert torch.count_nonzero(dv) == 0, "1-D parameters must be zeroed by ignore='biasbn'"
            continue
        dn = torch.linalg.vector_norm(dv.view(shape[0], -1), dim=1)
        wn = torch.linalg.vector_norm(wv.view(shape[0], -1), dim=1)
        torch.testing.assert_close(dn, wn, rtol=1e-12, atol=0.0)


@given(shapes=shape_strategy, seed=st.integers(0, 2**16))
def test_filter_normalization_without_ignore_scales_1d_parameters_as_one_filter(shapes, seed):
    obj = bag_objective(shapes, seed)
    d = random_direction(obj, normalization="filter", ignore=None, seed=seed)
    theta = obj.theta
    for _, sl, shape in obj.space.segments():
        if len(shape) < 2:
            torch.testing.assert_close(
                torch.linalg.vector_norm(d.vector[sl]),
                torch.linalg.vector_norm(theta[sl]),
                rtol=1e-12,
                atol=0.0,
            )


def test_layer_and_model_normalization():
    shapes = [(3, 4), (4,), (2, 3, 2, 2), ()]
    obj = bag_objective(shapes, 5)
    theta = obj.theta
    layer = random_direction(obj, normalization="layer", ignore=None, seed=3).vector
    for _, sl, _ in obj.space.segments():
        assert math.isclose(float(layer[sl].norm()), float(theta[sl].norm()), rel_tol=1e-12)
    model = random_direction(obj, normalization="model", ignore="biasbn", seed=3).vector
    kept = torch.cat([theta[sl] for _, sl, s in obj.space.segments() if len(s) >= 2])
    assert math.isclose(float(model.norm()), float(kept.norm()), rel_tol=1e-12)
    # The same Gaussian draw underlies every normalization: directions are parallel per layer.
    raw = random_direction(obj, normalization=None, ignore=None, seed=3).vector
    for _, sl, _ in obj.space.segments():
        assert math.isclose(cosine(raw[sl], layer[sl]), 1.0, rel_tol=1e-12)


def test_entries_are_gaussian_not_uniform():
    obj = bag_objective([(200, 100)], 0)
    v = random_direction(obj, normalization=None, ignore=None, seed=11).vector.numpy()
    z = (v - v.mean()) / v.std()
    kurtosis = float((z**4).mean())  # 3 for a Gaussian, 1.8 for a uniform distribution
    assert abs(v.mean()) < 0.03 and abs(v.std() - 1) < 0.02
    assert abs(kurtosis - 3.0) < 0.15


def test_seeding_and_dtype():
    obj = mlp_objective()
    a = random_direction(obj, seed=4)
    b = random_direction(obj, seed=4)
    c = random_direction(obj, seed=torch.Generator().manual_seed(4))
    assert torch.equal(a.vector, b.vector) and torch.equal(a.vector, c.vector)
    assert not torch.equal(a.vector, random_direction(obj, seed=5).vector)
    obj32 = mlp_objective(dtype=torch.float32)
    d32 = random_direction(obj32, seed=4)
    assert d32.vector.dtype == torch.float32
    torch.testing.assert_close(d32.vector.double(), a.vector, rtol=1e-6, atol=1e-7)
    assert a.to_dict()["settings"] == {"normalization": "filter", "ignore": "biasbn", "seed": 4}
    assert math.isclose(a.norm, float(a.vector.norm()), rel_tol=1e-12)


def test_bad_arguments():
    obj = mlp_objective()
    with pytest.raises(ValueError, match="normalization"):
        random_direction(obj, normalization="filters")
    with pytest.raises(ValueError, match="ignore"):
        random_direction(obj, ignore="bias")
    with pytest.raises(TypeError, match="seed"):
        random_direction(obj, seed=1.5)
    with pytest.raises(ValueError, match="shape"):
        as_direction(obj, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        as_direction(obj, torch.full((obj.num_params,), math.nan, dtype=torch.float64))
    with pytest.raises(TypeError, match="Direction"):
        as_direction(obj, [0.0] * obj.num_params)
    with pytest.raises(ValueError, match="shape"):
        normalize_direction(obj, torch.zeros(2))


def test_cosine_matches_numpy():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    ref = float(
        np.dot(a.numpy(), b.numpy()) / (np.linalg.norm(a.numpy()) * np.linalg.norm(b.numpy()))
    )
    assert math.isclose(cosine(a, b), ref, rel_tol=1e-6)
    assert math.isclose(cosine(Direction(a), Direction(a)), 1.0, rel_tol=1e-12)
    assert math.isnan(cosine(a, torch.zeros(50)))
    with pytest.raises(ValueError, match="lengths"):
        cosine(a, torch.zeros(3))


def test_interpolation_direction_from_model_state_dict_and_vector():
    obj = mlp_objective(seed=0)
    other = tiny_mlp(seed=1)
    ref = torch.cat([p.detach().reshape(-1) for p in other.parameters()]) - obj.theta
    for end in (
        other,
        other.state_dict(),
        torch.cat([p.detach().reshape(-1) for p in other.parameters()]),
    ):
        d = interpolation_direction(obj, end)
        assert d.source == "interpolation"
        assert torch.equal(d.vector, ref)
        assert math.isclose(d.settings["distance"], float(ref.norm()), rel_tol=1e-12)
    sd = other.state_dict()
    del sd["2.bias"]
    with pytest.raises(ValueError, match=r"2\.bias"):
        interpolation_direction(obj, sd)
    with pytest.raises(ValueError, match="shape"):
        interpolation_direction(obj, {**other.state_dict(), "0.weight": torch.zeros(2, 2)})
    with pytest.raises(TypeError, match="state dict"):
        interpolation_direction(obj, 3)


def test_pca_recovers_a_planar_trajectory():
    gen = torch.Generator().manual_seed(0)
    n = 40
    q, _ = torch.linalg.qr(torch.randn(n, 2, generator=gen, dtype=torch.float64))
    u, v = q[:, 0], q[:, 1]
    final = torch.randn(n, generator=gen, dtype=torch.float64)
    t = torch.linspace(0, 1, 12, dtype=torch.float64)
    alphas, betas = 3.0 * (1 - t) ** 2, 0.5 * torch.sin(6 * t) * (1 - t)
    points = [final + a * u + b * v for a, b in zip(alphas, betas, strict=True)]
    res = pca_directions(points, k=2)
    # The directions span {u, v} and are orthonormal.
    basis = torch.stack([d.vector for d in res.directions])
    torch.testing.assert_close(
        basis @ basis.T, torch.eye(2, dtype=torch.float64), atol=1e-12, rtol=0
    )
    proj = basis.T @ (basis @ q)
    torch.testing.assert_close(proj, q, atol=1e-10, rtol=0)
    np.testing.assert_allclose(res.explained_variance_ratio.sum(), 1.0, rtol=1e-12)
    # Coordinates reconstruct every checkpoint relative to the final one.
    diffs = torch.stack(points) - final
    recon = torch.as_tensor(res.coordinates) @ basis
    torch.testing.assert_close(recon, diffs, atol=1e-10, rtol=0)
    np.testing.assert_allclose(res.coordinates[-1], 0.0, atol=1e-12)
    assert (res.coordinates[0] <= 0).all()
    # Against a numpy SVD reference: variances and singular values.
    s_ref = np.linalg.svd(diffs.numpy(), compute_uv=False)
    np.testing.assert_allclose(res.singular_values, s_ref[:2], rtol=1e-10)
    np.testing.assert_allclose(
        res.explained_variance_ratio, s_ref[:2] ** 2 / (s_ref**2).sum(), rtol=1e-10
    )
    (xlo, xhi), (ylo, yhi) = res.span()
    assert xlo < res.coordinates[:, 0].min() and xhi > 0 and ylo < 0 < yhi


def test_pca_from_state_dicts_needs_the_objective():
    obj = mlp_objective()
    models = [tiny_mlp(seed=s) for s in range(4)]
    with pytest.raises(ValueError, match="objective"):
        pca_directions([m.state_dict() for m in models])
    res = pca_directions([m.state_dict() for m in models], k=3, objective=obj)
    flats = [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in models]
    ref = pca_directions(flats, k=3)
    for a, b in zip(res.directions, ref.directions, strict=True):
        torch.testing.assert_close(a.vector, b.vector, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="k must"):
        pca_directions(flats, k=4)
    with pytest.raises(ValueError, match="two checkpoints"):
        pca_directions(flats[:1])


def test_eigen_directions_match_the_dense_hessian():
    obj = mlp_objective()
    dirs = eigen_directions(obj, k=2, tol=1e-10)
    evals, evecs = torch.linalg.eigh(dense_hessian(obj))
    for j, d in enumerate(dirs):
        ref_val, ref_vec = evals[-1 - j], evecs[:, -1 - j]
        assert math.isclose(d.settings["eigenvalue"], float(ref_val), rel_tol=1e-8)
        assert math.isclose(abs(float(d.vector @ ref_vec)), 1.0, rel_tol=1e-8)
        assert math.isclose(d.norm, 1.0, rel_tol=1e-10)
        assert d.source == "eigen"
