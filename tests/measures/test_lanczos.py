"""flatlens.measures._lanczos on dense symmetric matrices with known spectra."""

from __future__ import annotations

import pytest
import torch
from helpers import symmetric_with_spectrum

from flatlens.measures._krylov import lanczos_tridiagonal
from flatlens.measures._lanczos import lanczos_eigsh
from flatlens.measures._power import power_iteration


def wanted(lam: torch.Tensor, which: str, k: int) -> torch.Tensor:
    lam = torch.as_tensor(lam, dtype=torch.float64)
    if which == "LA":
        return lam.sort(descending=True).values[:k]
    if which == "SA":
        return lam.sort().values[:k]
    return lam[lam.abs().argsort(descending=True)][:k]


def start(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def solve(lam, k, which="LA", *, tol=1e-10, seed=0, **kw):
    a, _ = symmetric_with_spectrum(lam, seed=seed)
    out = lanczos_eigsh(
        lambda v: a @ v,
        start(a.shape[0]),
        k,
        which=which,
        tol=tol,
        generator=torch.Generator().manual_seed(2),
        **kw,
    )
    return a, out


def check_pairs(a: torch.Tensor, out, expected: torch.Tensor, rtol: float) -> None:
    scale = float(expected.abs().max())
    assert out.eigenvalues.shape == expected.shape
    err = (out.eigenvalues - expected).abs()
    assert bool((err <= rtol * expected.abs().clamp(min=1e-6 * scale)).all()), (
        out.eigenvalues,
        expected,
    )
    vecs = out.eigenvectors
    k = expected.numel()
    assert vecs.shape == (k, a.shape[0])
    assert torch.allclose(vecs @ vecs.T, torch.eye(k, dtype=vecs.dtype), atol=1e-8)
    res = torch.linalg.vector_norm(vecs @ a - out.eigenvalues[:, None] * vecs, dim=1)
    # A pair bounded by Kato-Temple (bound ~ r^2 / gap, gap <= 2 ||A||) may stop with a
    # larger residual than a Weyl-bounded one: r <= sqrt(2 bound ||A||).
    allowed = torch.clamp(torch.sqrt(2.02 * out.error_bounds * scale), min=1e-4 * scale)
    assert bool((res <= allowed).all()), res
    # Reported residuals are the true ones (up to rounding) and the certificate holds.
    assert torch.allclose(out.residuals, res, atol=1e-8 * scale)
    assert bool((err <= out.error_bounds + 1e-11 * scale).all()), (err, out.error_bounds)
    assert bool(out.converged.all())


def spread(n: int, lo: float, hi: float, seed: int = 0) -> torch.Tensor:
    """n distinct eigenvalues in [lo, hi], not equispaced (a realistic gap structure)."""
    gen = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


# ---------------------------------------------------------------------------------- eigsh
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("k", [1, 5])
def test_indefinite_spectrum(which, k):
    lam = torch.cat([spread(150, -3.0, 2.0), torch.tensor([4.0, 3.5, -3.8, -4.5, 2.9])])
    a, out = solve(lam, k, which)
    check_pairs(a, out, wanted(lam, which, k), rtol=1e-8)


def test_order_of_results():
    lam = torch.tensor([-9.0, -5.0, -1.0, 0.5, 2.0, 6.0, 8.0, 0.1, 0.2, 0.3])
    assert solve(lam, 3, "LA")[1].eigenvalues.tolist() == pytest.approx([8.0, 6.0, 2.0])
    assert solve(lam, 3, "SA")[1].eigenvalues.tolist() == pytest.approx([-9.0, -5.0, -1.0])
    assert solve(lam, 3, "LM")[1].eigenvalues.tolist() == pytest.approx([-9.0, 8.0, 6.0])


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_n_smaller_than_basis(which):
    lam = torch.tensor([3.0, -4.0, 1.0, 2.0, -0.5, 0.1, 7.0, -7.5])
    a, out = solve(lam, 3, which)
    check_pairs(a, out, wanted(lam, which, 3), rtol=1e-10)
    assert out.num_matvecs <= 8 + 3  # n steps and k residual checks


def test_k_is_n_minus_one():
    lam = torch.tensor([1.0, 2.0, 3.0, 4.0])
    a, out = solve(lam, 3, "SA")
    check_pairs(a, out, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), rtol=1e-10)


def test_restarts_keep_the_answer_exact():
    lam = spread(300, 0.0, 1.0, seed=3)
    a, out = solve(lam, 4, "LA", basis_size=10)
    assert out.num_restarts > 0
    check_pairs(a, out, wanted(lam, "LA", 4), rtol=1e-8)


def test_repeated_eigenvalue_below_the_wanted_ones():
    lam = torch.cat([torch.tensor([9.0, 8.0, 7.0]), torch.full((20,), 2.0), spread(40, -1, 1)])
    a, out = solve(lam, 3, "LA")
    check_pairs(a, out, torch.tensor([9.0, 8.0, 7.0], dtype=torch.float64), rtol=1e-10)


def test_zero_matrix_and_definite_matrices():
    lam = torch.zeros(30, dtype=torch.float64)
    _, out = solve(lam, 2, "LA")
    assert out.eigenvalues.abs().max() <= 1e-12
    lam = spread(60, 1.0, 2.0)
    a, out = solve(lam, 2, "SA")
    check_pairs(a, out, wanted(lam, "SA", 2), rtol=1e-9)


@pytest.mark.parametrize(
    "lam",
    [
        [5.0] * 3 + [1.0] * 7,  # n smaller than the basis
        [5.0] * 3 + [1.0] * 47 + [0.0] * 50,  # n larger than the basis
    ],
    ids=["small", "large"],
)
def test_repeated_top_eigenvalue_few_distinct(lam):
    a, out = solve(lam, 3, "LA")
    check_pairs(a, out, torch.tensor([5.0, 5.0, 5.0], dtype=torch.float64), rtol=1e-10)


def test_repeated_top_eigenvalue_many_distinct_what_the_certificate_covers():
    """Single-vector Lanczos sees one copy of a repeated eigenvalue (5 x3 here), so the
    top-k *set* is not certified with multiplicity (it may return [5, 5, 4]). What holds,
    and what the docs promise: each returned value lies within its residual norm of an
    eigenvalue of A (|theta - lambda| <= ||A v - theta v||, Weyl), the reported residuals
    are the true ones, and the largest returned value is the top eigenvalue."""
    lam = torch.cat([torch.full((3,), 5.0), spread(97, 0.0, 4.0)])
    a, out = solve(lam, 3, "LA")
    vecs = out.eigenvectors
    res = torch.linalg.vector_norm(vecs @ a - out.eigenvalues[:, None] * vecs, dim=1)
    assert torch.allclose(out.residuals, res, atol=1e-10)
    dist = (out.eigenvalues[:, None] - lam[None, :].double()).abs().min(dim=1).values
    assert bool((dist <= res + 1e-12).all()), (dist, res)
    assert abs(float(out.eigenvalues[0]) - 5.0) <= 1e-9


def test_stops_as_soon_as_converged_and_no_later():
    lam = spread(200, -1.0, 1.0, seed=5)
    lam[:3] = torch.tensor([3.0, 2.5, 2.2])
    _a, tight = solve(lam, 3, "LA", tol=1e-10)
    _, loose = solve(lam, 3, "LA", tol=1e-3)
    assert loose.num_matvecs < tight.num_matvecs
    err = (loose.eigenvalues - wanted(lam, "LA", 3)).abs()
    assert bool((err <= 1e-3 * wanted(lam, "LA", 3).abs()).all())
    assert bool(loose.converged.all())
    # It stopped at the first product after which the k wanted pairs were certified (no
    # guard pair is waited for): one product less on the same path is not enough.
    _, early = solve(lam, 3, "LA", tol=1e-3, max_matvecs=loose.num_matvecs - 1)
    assert early.num_matvecs == loose.num_matvecs - 1
    assert not bool(early.converged.all())
    err = (early.eigenvalues - wanted(lam, "LA", 3)).abs()
    assert bool((err <= early.error_bounds).all())


def test_a_cluster_below_the_top_does_not_delay_the_stop():
    """The old rule also waited for the next pair, deep in the cluster at 2 (80 products
    at tol 1e-6); the top pair alone needs a dozen Lanczos steps."""
    gen = torch.Generator().manual_seed(0)
    cluster = 2.0 + 0.01 * torch.rand(40, generator=gen, dtype=torch.float64)
    lam = torch.cat([torch.tensor([3.0]), cluster, spread(259, -1.0, 1.0)])
    a, out = solve(lam, 1, "LA", tol=1e-6)
    assert out.num_matvecs <= 20
    check_pairs(a, out, torch.tensor([3.0], dtype=torch.float64), rtol=1e-6)


def test_quadratic_bound_needs_a_converged_neighbour():
    """After a few steps the top Ritz value can sit between unseen eigenvalues (1000, 990,
    985) with its nearest neighbour an unconverged bulk mixture: the gap to that neighbour
    is no gap of the spectrum. Kato-Temple is used only once the neighbour met tol."""
    n = 2000
    gen = torch.Generator().manual_seed(0)
    d = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * 100
    d[:5] = torch.tensor([1000.0, 990.0, 985.0, 970.0, 960.0], dtype=torch.float64)
    out = lanczos_eigsh(lambda v: d * v, start(n, seed=3), 1, tol=1e-4)
    assert bool(out.converged.all())
    assert abs(float(out.eigenvalues[0]) - 1000.0) <= float(out.error_bounds[0])


def test_budget_exhausted_reports_not_converged():
    lam = spread(400, 0.0, 1.0, seed=6)
    _a, out = solve(lam, 2, "LA", tol=1e-12, max_matvecs=30)
    assert out.num_matvecs == 30
    assert not bool(out.converged.all())
    # The reported bounds still bound the true error.
    err = (out.eigenvalues - wanted(lam, "LA", 2)).abs()
    assert bool((err <= out.error_bounds + 1e-12).all())


def test_same_start_same_result_and_sign_convention():
    lam = spread(80, -1.0, 1.0)
    _, one = solve(lam, 3, "LM")
    _, two = solve(lam, 3, "LM")
    assert torch.equal(one.eigenvalues, two.eigenvalues)
    assert torch.equal(one.eigenvectors, two.eigenvectors)
    rows = one.eigenvectors
    assert bool((rows.gather(1, rows.abs().argmax(1, keepdim=True)) > 0).all())


def test_float32_operator():
    lam = spread(100, -2.0, 5.0)
    a, _ = symmetric_with_spectrum(lam)
    a32 = a.float()
    out = lanczos_eigsh(lambda v: a32 @ v, start(100).float(), 3, tol=1e-5)
    assert out.eigenvectors.dtype == torch.float32
    assert torch.allclose(out.eigenvalues, wanted(lam, "LA", 3), rtol=1e-4)


# ---------------------------------------------------------------------------------- float32
def diagonal_case(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 diagonal spectrum: five separated top values, a bulk in [-100, 100] and a
    cluster near -500; and its exact values in descending order (float64)."""
    gen = torch.Generator().manual_seed(seed)
    d = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * 100
    d[:5] = torch.tensor([1000.0, 990.0, 985.0, 970.0, 960.0], dtype=torch.float64)
    d[5:10] = -500.0 + torch.arange(5, dtype=torch.float64)
    d32 = d.float()
    return d32, d32.double().sort(descending=True).values


@pytest.mark.parametrize(("k", "tol"), [(1, 1e-4), (3, 1e-5)])
def test_float32_certificate_holds_at_a_million_parameters(k, tol):
    """Basis and products in float32, n = 1e6: every bound covers the true error (the
    recurrence alone claimed 1e-6 while off by 1e-3 at this size), is within tol, and the
    reported residuals are the true ones."""
    n = 1_000_000
    d, exact = diagonal_case(n)
    out = lanczos_eigsh(lambda v: d * v, start(n).float(), k, tol=tol)
    assert out.eigenvectors.dtype == torch.float32
    err = (out.eigenvalues - exact[:k]).abs()
    assert bool((err <= out.error_bounds).all()), (err, out.error_bounds)
    assert bool(out.converged.all())
    assert bool((out.error_bounds <= tol * out.eigenvalues.abs()).all())
    u = out.eigenvectors.double()
    true_res = torch.linalg.vector_norm(u * d.double() - out.eigenvalues[:, None] * u, dim=1)
    assert torch.allclose(out.residuals, true_res, rtol=1e-3, atol=1e-9 * 1000)
    assert 0 < out.rounding <= 1e-5 * 1000  # measured, a few eps32 of ||A||
    assert out.basis_vectors <= 25


def test_unreachable_tol_warns_and_stays_honest():
    d, exact = diagonal_case(100_000)
    with pytest.warns(RuntimeWarning, match="rounding"):
        out = lanczos_eigsh(lambda v: d * v, start(100_000).float(), 1, tol=1e-9)
    assert not bool(out.converged.all())
    assert abs(float(out.eigenvalues[0] - exact[0])) <= float(out.error_bounds[0])
    assert out.num_matvecs < 100  # it stops once rounding is what is left


def test_rounding_given_replaces_the_measurement_at_the_same_cost():
    lam = spread(120, -1.0, 2.0)
    a, measured = solve(lam, 2, tol=1e-8)
    _, given = solve(lam, 2, tol=1e-8, rounding=0.0)
    assert given.num_matvecs == measured.num_matvecs  # the measurement takes no product
    assert given.rounding <= 1e-13 <= measured.rounding + 1e-13
    check_pairs(a, given, wanted(lam, "LA", 2), rtol=1e-8)


@pytest.mark.parametrize("noise", [1e-6, 1e-4])
def test_the_rounding_allowance_sees_a_noisy_operator(noise):
    """Products with an error of relative size ``noise`` that changes from call to call (as
    float32 HVPs round differently for each vector): the allowance, measured from the
    distance between each checked product and the one the Lanczos products assemble,
    covers it, and every bound holds for the exact operator."""
    n = 5000
    gen = torch.Generator().manual_seed(0)
    d = torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1
    d[:3] = torch.tensor([5.0, 4.0, 3.5], dtype=torch.float64)
    noise_gen = torch.Generator().manual_seed(1)

    def noisy(v):
        e = torch.randn(n, generator=noise_gen, dtype=torch.float64)
        return d * v + noise * 5.0 * torch.linalg.vector_norm(v) * e / e.norm()

    with pytest.warns(RuntimeWarning, match="rounding"):  # tol is out of reach
        out = lanczos_eigsh(noisy, start(n), 2, tol=1e-10, max_matvecs=120)
    assert out.rounding >= noise * 5.0  # at least the error of one product
    exact = torch.tensor([5.0, 4.0], dtype=torch.float64)
    assert bool(((out.eigenvalues - exact).abs() <= out.error_bounds).all())


def test_matmat_batches_the_final_checks():
    lam = spread(80, -1.0, 1.0)
    a, _ = symmetric_with_spectrum(lam)
    calls = []

    def matmat(rows):
        calls.append(rows.shape[0])
        return rows @ a

    out = lanczos_eigsh(lambda v: a @ v, start(80), 3, tol=1e-8, matmat=matmat)
    assert calls == [3]  # the three residual checks in one call
    check_pairs(a, out, wanted(lam, "LA", 3), rtol=1e-8)


# ---------------------------------------------------------------------------------- memory
def test_basis_grows_as_needed():
    lam = spread(2000, -1.0, 1.0, seed=5)
    lam[0] = 4.0
    a, out = solve(lam, 1, "LA", tol=1e-4)
    steps = out.num_matvecs - 1
    assert steps < 12
    assert out.basis_vectors <= steps + 4 < 25  # not basis_size + 1 = 25 rows up front
    check_pairs(a, out, torch.tensor([4.0], dtype=torch.float64), rtol=1e-4)


def test_lower_precision_basis_keeps_the_certificate():
    lam = spread(300, -1.0, 1.0, seed=2)
    lam[:3] = torch.tensor([3.0, 2.5, 2.2])
    expected = wanted(lam, "LA", 2)
    _a, ref = solve(lam, 2, tol=1e-6)
    _, on_cpu = solve(lam, 2, tol=1e-6, basis_device="cpu")
    assert torch.equal(ref.eigenvalues, on_cpu.eigenvalues)
    _, f32 = solve(lam, 2, tol=1e-6, basis_dtype=torch.float32)
    assert bool(f32.converged.all()) and f32.eigenvectors.dtype == torch.float64
    for dtype in (torch.float32, torch.bfloat16):
        _, out = solve(lam, 2, tol=1e-6, basis_dtype=dtype, max_matvecs=200)
        assert bool(((out.eigenvalues - expected).abs() <= out.error_bounds).all())


def test_refinement_restarts_from_the_returned_vectors():
    """A float16 basis drifts: the recurrence claims tol before the true residual meets it,
    so Lanczos restarts from the returned vectors and their products."""
    n = 200_000
    gen = torch.Generator().manual_seed(0)
    d = torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1
    d[:4] = torch.tensor([3.0, 2.5, 2.2, 2.1], dtype=torch.float64)
    d32 = d.float()
    v0 = start(n).float()
    out = lanczos_eigsh(lambda v: d32 * v, v0, 2, tol=1e-4, basis_dtype=torch.float16)
    assert out.num_refinements >= 1
    assert bool(out.converged.all())
    exact = torch.tensor([3.0, 2.5], dtype=torch.float64)
    assert bool(((out.eigenvalues - exact).abs() <= out.error_bounds).all())


def test_progress_counts_products_without_a_budget_total(capsys):
    lam = spread(60, -1.0, 1.0)
    solve(lam, 1, tol=1e-6, progress=True)
    err = capsys.readouterr().err
    assert "lanczos" in err and "matvec" in err
    assert "/500" not in err and "/1" not in err


def test_eigsh_errors():
    a, _ = symmetric_with_spectrum([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="k must be"):
        lanczos_eigsh(lambda v: a @ v, start(3), 3)
    with pytest.raises(ValueError, match="k must be"):
        lanczos_eigsh(lambda v: a @ v, start(3), 0)
    with pytest.raises(ValueError, match="basis_size"):
        lanczos_eigsh(lambda v: a @ v, start(3), 2, basis_size=2)
    b, _ = symmetric_with_spectrum(spread(20, 0.0, 1.0))
    with pytest.raises(ValueError, match=r"max_matvecs \(max_hvps\) must be at least 4"):
        lanczos_eigsh(lambda v: b @ v, start(20), 2, max_matvecs=3)
    with pytest.raises(ValueError, match=r"at least 5: .* and one rounding check"):
        lanczos_eigsh(lambda v: b @ v, start(20), 2, max_matvecs=4, basis_dtype=torch.float32)
    with pytest.raises(ValueError, match="rounding"):
        lanczos_eigsh(lambda v: b @ v, start(20), 2, rounding=-1.0)


# ---------------------------------------------------------------------------------- tridiagonal
def test_tridiagonal_full_run_reproduces_the_spectrum():
    lam = spread(30, -2.0, 3.0)
    a, _ = symmetric_with_spectrum(lam)
    alpha, beta = lanczos_tridiagonal(lambda v: a @ v, start(30), 30)
    assert alpha.shape == (30,) and beta.shape == (29,)
    t = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    assert torch.allclose(torch.linalg.eigvalsh(t), lam.sort().values, atol=1e-10)
    # More steps than the dimension are clipped to n.
    alpha2, _ = lanczos_tridiagonal(lambda v: a @ v, start(30), 100)
    assert alpha2.shape == (30,)


def test_tridiagonal_is_the_projection():
    a, _ = symmetric_with_spectrum(spread(50, 0.0, 1.0))
    v0 = start(50)
    alpha, beta = lanczos_tridiagonal(lambda v: a @ v, v0, 6)
    # Classic three-term recurrence without reorthogonalization, fine for 6 steps.
    q_prev, q = torch.zeros(50, dtype=torch.float64), v0 / v0.norm()
    b_prev = 0.0
    for j in range(6):
        w = a @ q - b_prev * q_prev
        assert float(q @ w) == pytest.approx(float(alpha[j]), abs=1e-12)
        w = w - alpha[j] * q
        if j < 5:
            assert float(w.norm()) == pytest.approx(float(beta[j]), rel=1e-10)
            q_prev, q, b_prev = q, w / w.norm(), float(w.norm())


def test_tridiagonal_stops_at_an_invariant_subspace():
    a, _ = symmetric_with_spectrum([2.0] * 10 + [-1.0] * 10 + [0.5] * 10)
    alpha, beta = lanczos_tridiagonal(lambda v: a @ v, start(30), 20)
    assert alpha.numel() == 3 and beta.numel() == 2
    t = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    assert torch.allclose(
        torch.linalg.eigvalsh(t), torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    )


# ---------------------------------------------------------------------------------- power
def power(lam, k, which, **kw):
    a, _ = symmetric_with_spectrum(lam)
    gen = torch.Generator().manual_seed(4)
    n = a.shape[0]
    return a, power_iteration(
        lambda v: a @ v,
        n,
        k,
        which=which,
        make_start=lambda: torch.randn(n, generator=gen, dtype=torch.float64),
        **kw,
    )


@pytest.mark.parametrize(
    ("which", "lam"),
    [
        ("LA", [10.0, 6.0, 5.0, -2.0]),
        ("LA", [-10.0, 4.0, 3.0, 1.0]),  # the dominant eigenvalue is negative
        ("SA", [-10.0, 4.0, 3.0, 1.0]),
        ("SA", [10.0, -4.0, -3.0, 1.0]),  # the dominant eigenvalue is positive
        ("LM", [-10.0, 6.0, 5.0, 1.0]),
    ],
)
def test_power_top1(which, lam):
    lam = torch.cat([torch.tensor(lam), spread(60, -0.5, 0.5)])
    a, out = power(lam, 1, which, tol=1e-7)
    expected = wanted(lam, which, 1)
    assert abs(float(out.eigenvalues[0] - expected[0])) <= 1e-3 * abs(float(expected[0]))
    u = out.eigenvectors[0]
    assert float(u.norm()) == pytest.approx(1.0)
    assert float((a @ u - out.eigenvalues[0] * u).norm()) <= 0.05 * abs(float(expected[0]))
    assert bool(out.converged.all())


def test_power_deflation_top3():
    lam = torch.cat([torch.tensor([10.0, 6.0, 3.0]), spread(60, -1.0, 1.0)])
    _a, out = power(lam, 3, "LA", tol=1e-8)
    assert torch.allclose(
        out.eigenvalues, torch.tensor([10.0, 6.0, 3.0], dtype=torch.float64), rtol=1e-3
    )
    assert torch.allclose(
        out.eigenvectors @ out.eigenvectors.T, torch.eye(3, dtype=torch.float64), atol=1e-3
    )
    assert out.num_matvecs > 3


def test_power_errors():
    with pytest.raises(ValueError, match="k must be"):
        power([1.0, 2.0], 2, "LA")
