"""The spectrum measures on symmetric operators other than an Objective, against scipy eigh."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse
import torch
from helpers import classification_data, symmetric_with_spectrum, tiny_mlp
from scipy.sparse.linalg import LinearOperator
from torch.nn import functional as F

from flatlens import Objective
from flatlens.measures import SymmetricOperator
from flatlens.measures._density import hessian_density
from flatlens.measures._operators import as_operator
from flatlens.measures._spectrum import hessian_eigenvalues, hessian_trace


def dense(n: int = 60, seed: int = 0) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    lam = torch.cat([torch.tensor([5.0, 4.0, -4.5]), torch.rand(n - 3, generator=gen) * 2 - 1])
    a, _ = symmetric_with_spectrum(lam, seed=seed)
    return a.numpy()


def check_extremes(
    op, a: np.ndarray, *, k: int = 3, tol: float = 1e-10, whiches: str = "LA SA LM"
) -> None:
    lam = scipy.linalg.eigh(a, eigvals_only=True)
    expected = {"LA": lam[::-1][:k], "SA": lam[:k], "LM": lam[np.argsort(-np.abs(lam))][:k]}
    for which, want in ((w, expected[w]) for w in whiches.split()):
        res = hessian_eigenvalues(op, k, which=which, tol=tol)
        got = res.eigenvalues.numpy()
        assert np.allclose(got, want, rtol=0, atol=10 * tol * np.abs(lam).max()), (which, got)
        assert bool(res.converged.all()) and res.start == "random"
        assert np.all(np.abs(got - want) <= res.error_bounds.numpy())
        vecs = res.eigenvectors.to(torch.float64).numpy()
        true_res = np.linalg.norm(vecs @ a - got[:, None] * vecs, axis=1)
        assert np.allclose(res.residuals.numpy(), true_res, atol=1e-9 * np.abs(lam).max())


# ---------------------------------------------------------------------------------- kinds
def test_symmetric_operator_matches_eigh():
    a = dense()
    at = torch.from_numpy(a)
    check_extremes(SymmetricOperator(lambda v: at @ v, 60), a)


def test_scipy_linear_operator_sparse_matrix_and_array():
    a = dense(seed=1)
    lin = LinearOperator((60, 60), matvec=lambda x: a @ x, dtype=np.float64)
    check_extremes(lin, a)
    check_extremes(scipy.sparse.csr_matrix(a), a, k=2)
    check_extremes(a, a, k=1)


def test_square_tensor_and_float32_operator():
    a = dense(seed=2)
    check_extremes(torch.from_numpy(a), a, k=2)
    a32 = torch.from_numpy(a).float()
    res = hessian_eigenvalues(SymmetricOperator(lambda v: a32 @ v, 60, dtype=torch.float32), 2)
    assert res.eigenvectors.dtype == torch.float32
    lam = scipy.linalg.eigh(a32.double().numpy(), eigvals_only=True)[::-1][:2]
    assert np.all(np.abs(res.eigenvalues.numpy() - lam) <= res.error_bounds.numpy())


def test_objective_linear_operator_round_trip():
    """Objective.as_linear_operator (SciPy) gives the same spectrum as the Objective."""
    model = tiny_mlp()
    x, y = classification_data()
    obj = Objective(model, F.cross_entropy, (x, y))
    direct = hessian_eigenvalues(obj, 3, tol=1e-10, start="random")
    via = hessian_eigenvalues(obj.as_linear_operator(), 3, tol=1e-10)
    assert torch.allclose(direct.eigenvalues, via.eigenvalues, rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------------------------- curvlinops
def test_curvlinops_ggn_and_hessian_operators():
    curvlinops = pytest.importorskip("curvlinops")
    model = tiny_mlp()
    x, y = classification_data()
    params = [p for p in model.parameters() if p.requires_grad]
    data = [(x[:12], y[:12]), (x[12:], y[12:])]
    loss = torch.nn.CrossEntropyLoss()
    ggn = curvlinops.GGNLinearOperator(model, loss, params, data)
    n = ggn.shape[0]
    dense_ggn = (ggn @ torch.eye(n, dtype=torch.float64)).numpy()
    dense_ggn = (dense_ggn + dense_ggn.T) / 2
    # The GGN is positive semi-definite with a large null space: only its top is asked for.
    check_extremes(ggn, dense_ggn, k=2, whiches="LA LM")
    # curvlinops 2.x operators are SciPy LinearOperators: the same through to_scipy().
    check_extremes(ggn.to_scipy(), dense_ggn, k=1, whiches="LA")
    hess = curvlinops.HessianLinearOperator(model, loss, params, data)
    ours = hessian_eigenvalues(Objective(model, F.cross_entropy, data), 2, tol=1e-10)
    theirs = hessian_eigenvalues(hess, 2, tol=1e-10)
    assert torch.allclose(ours.eigenvalues, theirs.eigenvalues, rtol=1e-8, atol=1e-12)
    tr = hessian_trace(ggn, num_probes=3 * n + 3)  # the sketch spans the space: exact
    assert tr.value == pytest.approx(float(np.trace(dense_ggn)), abs=1e-9)


# ---------------------------------------------------------------------------------- measures
def test_trace_and_density_of_an_operator():
    a = dense(seed=3)
    op = SymmetricOperator(lambda v: torch.from_numpy(a) @ v, 60)
    lam = scipy.linalg.eigh(a, eigvals_only=True)
    exact = hessian_trace(op, num_probes=183)  # sketch of 60 = n vectors: exact
    assert exact.value == pytest.approx(float(np.trace(a)), abs=1e-9)
    assert exact.num_hvps == 183
    hutch = hessian_trace(op, num_probes=40, method="hutchinson", seed=1)
    assert abs(hutch.value - float(np.trace(a))) <= 4 * hutch.stderr
    assert hutch.rounding == 0.0
    dens = hessian_density(op, num_runs=2, lanczos_steps=80)
    assert dens.num_hvps == 2 * 60  # the runs stop at n
    for nodes in dens.nodes:
        assert np.allclose(np.sort(nodes), lam, atol=1e-9)
    low = hessian_density(op, num_runs=1, lanczos_steps=20, basis_dtype=torch.float32)
    assert np.trapezoid(low.density, low.grid) == pytest.approx(1.0, abs=1e-9)


def test_checks_are_batched_through_matmat_and_counted():
    a = torch.from_numpy(dense(seed=4))
    calls = {"matvec": 0, "matmat": []}

    def matvec(v):
        calls["matvec"] += 1
        return a @ v

    def matmat(x):
        calls["matmat"].append(x.shape[1])
        return a @ x

    res = hessian_eigenvalues(SymmetricOperator(matvec, 60, matmat=matmat), 3, tol=1e-8)
    assert calls["matmat"] == [3]  # the three residual checks
    assert res.num_hvps == calls["matvec"] + 3
    power = hessian_eigenvalues(SymmetricOperator(matvec, 60), 1, method="power", tol=1e-8)
    assert power.num_hvps > 0 and power.start == "random"


def test_power_method_on_an_operator():
    a = dense(seed=5)
    res = hessian_eigenvalues(a, 1, method="power", tol=1e-12, max_hvps=2000)
    top = scipy.linalg.eigh(a, eigvals_only=True)[-1]
    assert abs(float(res.eigenvalues[0]) - top) <= 1e-6


# ---------------------------------------------------------------------------------- errors
def test_operator_errors():
    a = dense()
    with pytest.raises(TypeError, match="SymmetricOperator"):
        hessian_eigenvalues(lambda v: v, 1)
    with pytest.raises(TypeError, match="expected an Objective"):
        hessian_trace("not an operator")
    with pytest.raises(ValueError, match="square"):
        hessian_eigenvalues(np.zeros((3, 4)), 1)
    with pytest.raises(ValueError, match="at= applies to an Objective"):
        hessian_eigenvalues(a, 1, at=torch.zeros(60))
    with pytest.raises(ValueError, match="k must"):
        hessian_eigenvalues(a, 60)
    with pytest.raises(ValueError, match="n must"):
        SymmetricOperator(lambda v: v, 1)
    bad = SymmetricOperator(lambda v: v[:-1], 60)
    with pytest.raises(ValueError, match="shape"):
        hessian_eigenvalues(bad, 1)
    assert as_operator(a).n == 60 and as_operator(a).dtype == torch.float64
