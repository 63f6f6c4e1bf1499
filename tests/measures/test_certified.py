"""What an eigenvalue bound covers (``EigenResult.bound_kind``): float32 pairs re-evaluated
with float64 products are certified against the exact (float64) Hessian; without that
re-evaluation, and for difference products, the bound is an estimate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import bn_cnn, dense_reference, image_data, symmetric_with_spectrum

from flatlens import Objective, SymmetricOperator, hessian_eigenvalues
from flatlens.measures._lanczos import lanczos_eigsh


def float32_case():
    model = bn_cnn(dtype=torch.float32)
    x, y = image_data(n=24, dtype=torch.float32)
    ref = dense_reference(model, F.cross_entropy, (x, y))
    return model, x, y, torch.linalg.eigvalsh(ref.hessian).flip(0)


def test_float32_pairs_are_certified_by_float64_products():
    model, x, y, exact = float32_case()
    obj = Objective(model, F.cross_entropy, (x, y))
    res = hessian_eigenvalues(obj, 2, tol=1e-6)
    assert res.bound_kind == "certified" and res.reference_hvps == 2 and not res.bound_note
    err = (res.eigenvalues - exact[:2]).abs()
    assert bool((err <= res.error_bounds).all()), (err, res.error_bounds)
    # The values are the float64 Rayleigh quotients: far closer than float32 rounding.
    assert float(err.max()) <= 1e-9 * float(exact[0])
    assert res.to_dict()["bound_kind"] == "certified"
    for p, q in zip(model.parameters(), bn_cnn(dtype=torch.float32).parameters(), strict=True):
        assert torch.equal(p, q)  # the float64 copy left the model alone


def test_without_the_float64_products_the_bound_is_an_estimate():
    model, x, y, _ = float32_case()
    obj = Objective(model, F.cross_entropy, (x, y))
    res = hessian_eigenvalues(obj, 2, tol=1e-4, certify=False)
    assert res.bound_kind == "estimate" and res.reference_hvps == 0
    assert "certify=False" in res.bound_note
    tight = Objective(model, F.cross_entropy, (x, y), memory_budget=1.0)
    assert "no memory" in hessian_eigenvalues(tight, 1, tol=1e-4).bound_note
    f32 = SymmetricOperator(lambda v: v * 2.0, 10, dtype=torch.float32)
    assert hessian_eigenvalues(f32, 1).bound_kind == "estimate"
    with pytest.raises(ValueError, match="certify=True"):
        hessian_eigenvalues(f32, 1, certify=True)


def test_float64_products_are_certified_as_they_are():
    model = bn_cnn()
    x, y = image_data(n=24)
    res = hessian_eigenvalues(Objective(model, F.cross_entropy, (x, y)), 2, tol=1e-8)
    assert res.bound_kind == "certified" and res.reference_hvps == 0
    fd = Objective(model, F.cross_entropy, (x, y), hvp_method="finite_difference")
    est = hessian_eigenvalues(fd, 1, tol=1e-6)
    assert est.bound_kind == "estimate" and "Richardson" in est.bound_note
    with pytest.raises(ValueError, match="certify=True"):
        hessian_eigenvalues(fd, 1, tol=1e-6, certify=True)


def test_lanczos_stops_as_soon_as_the_bound_it_reports_meets_tol():
    """The stop rule uses the bound the certificate reports (recurrence residuals plus an
    estimate of the allowance, 90% of tol): one product fewer does not meet tol."""
    gen = torch.Generator().manual_seed(0)
    lam = torch.cat([torch.tensor([2.0, 1.9]), torch.rand(298, generator=gen, dtype=torch.float64)])
    a, _ = symmetric_with_spectrum(lam)
    v0 = torch.randn(300, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for tol in (1e-2, 1e-3):
        out = lanczos_eigsh(lambda v: a @ v, v0, 1, tol=tol)
        assert bool(out.converged.all())
        assert abs(float(out.eigenvalues[0]) - 2.0) <= float(out.error_bounds[0])
        short = lanczos_eigsh(lambda v: a @ v, v0, 1, tol=tol, max_matvecs=out.num_matvecs - 1)
        assert not bool(short.converged.all())


def test_the_eigen_start_of_the_ascents_takes_the_basis_options():
    import json

    from flatlens import AscentConfig, first_order_flatness

    model = bn_cnn()
    x, y = image_data(n=24)
    obj = Objective(model, F.cross_entropy, (x, y))
    plain = first_order_flatness(obj, 0.05, steps=3, seed=0)
    low = first_order_flatness(
        obj, 0.05, steps=3, seed=0, basis_device="cpu", basis_dtype=torch.float32
    )
    assert low.value == pytest.approx(plain.value, rel=1e-5)
    out = json.loads(json.dumps(low.to_dict()))
    assert out["config"]["basis_dtype"] == "torch.float32"
    assert AscentConfig(**out["config"]) == low.config
    with pytest.raises(ValueError, match="basis_dtype"):
        AscentConfig(0.1, basis_dtype=torch.int8)
