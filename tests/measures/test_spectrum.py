"""flatlens.measures._spectrum against dense float64 Hessians: eigenvalues, trace, density."""

from __future__ import annotations

import copy
import functools
import gc
import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch
from helpers import (
    ModelSnapshot,
    bn_cnn,
    classification_data,
    dense_reference,
    image_data,
    logistic_data,
    logistic_hessian,
    logistic_regression,
    objective_reference,
    quadratic_objective_parts,
    tiny_mlp,
    uneven_batches,
)
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from flatlens import Objective
from flatlens.measures import SymmetricOperator
from flatlens.measures._density import DensityResult, hessian_density
from flatlens.measures._spectrum import EigenResult, hessian_eigenvalues, hessian_trace


@functools.cache
def mlp_case():
    model = tiny_mlp()
    x, y = classification_data()
    return model, x, y, dense_reference(model, F.cross_entropy, (x, y))


@functools.cache
def cnn_case():
    model = bn_cnn()
    x, y = image_data()
    return model, x, y, dense_reference(model, F.cross_entropy, (x, y))


def mlp_objective(*, batched: bool = False, **kw) -> Objective:
    """The tiny MLP's risk over 23 samples: one batch (fast, cached graph) or 5 uneven ones."""
    model, x, y, _ = mlp_case()
    data = uneven_batches(x, y, [5, 5, 5, 5, 3]) if batched else (x, y)
    return Objective(model, F.cross_entropy, data, **kw)


def expected_eigs(eigs: torch.Tensor, which: str, k: int) -> torch.Tensor:
    if which == "LA":
        return eigs.sort(descending=True).values[:k]
    if which == "SA":
        return eigs.sort().values[:k]
    return eigs[eigs.abs().argsort(descending=True)][:k]


def assert_eigs_close(
    got: torch.Tensor, expected: torch.Tensor, rtol: float, scale: float | None = None
) -> None:
    """|got - expected| <= rtol * max(|expected|, 1e-6 * scale), scale = ||H||_2 by default
    approximated by max |expected| (the floor matters only for zero eigenvalues)."""
    got = got.to(torch.float64)
    floor = 1e-6 * (float(expected.abs().max()) if scale is None else scale)
    err = (got - expected).abs()
    assert bool((err <= rtol * expected.abs().clamp(min=floor)).all()), (got, expected)


def assert_eigenvectors(res: EigenResult, hessian: torch.Tensor, tol: float) -> None:
    vecs = res.eigenvectors.to(torch.float64)
    k = res.eigenvalues.numel()
    assert vecs.shape == (k, hessian.shape[0])
    assert torch.allclose(vecs @ vecs.T, torch.eye(k, dtype=torch.float64), atol=1e-6)
    true_res = torch.linalg.vector_norm(vecs @ hessian - res.eigenvalues[:, None] * vecs, dim=1)
    assert bool((true_res <= tol * float(hessian.norm(2))).all()), true_res


# ---------------------------------------------------------------------------------- eigenvalues
@pytest.mark.parametrize("case", ["mlp", "cnn"])
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_top5_matches_dense(case, which):
    model, x, y, ref = {"mlp": mlp_case, "cnn": cnn_case}[case]()
    sizes = [5, 5, 5, 5, 3] if case == "mlp" else [5, 5, 3]
    obj = Objective(model, F.cross_entropy, uneven_batches(x, y, sizes))
    start = obj.counts["hvp"]
    res = hessian_eigenvalues(obj, k=5, which=which, tol=1e-7)
    expected = expected_eigs(ref.eigenvalues, which, 5)
    assert_eigs_close(res.eigenvalues, expected, rtol=1e-6)
    assert res.eigenvalues.dtype == torch.float64 and res.eigenvalues.shape == (5,)
    assert_eigenvectors(res, ref.hessian, tol=1e-3)
    assert bool(res.converged.all())
    assert res.num_hvps == obj.counts["hvp"] - start > 0
    # Reported residual norms are the real ones.
    vecs = res.eigenvectors
    true_res = torch.linalg.vector_norm(vecs @ ref.hessian - res.eigenvalues[:, None] * vecs, dim=1)
    assert torch.allclose(res.residuals, true_res, atol=1e-9)
    key = {"LA": lambda t: -t, "SA": lambda t: t, "LM": lambda t: -t.abs()}[which]
    assert torch.equal(torch.sort(key(res.eigenvalues)).values, key(res.eigenvalues))


def test_default_tol_is_an_honest_certificate():
    _, _, _, ref = mlp_case()
    obj = mlp_objective(batched=True)
    loose = hessian_eigenvalues(obj, k=3)
    assert loose.tol == 1e-4 and loose.which == "LA" and loose.method == "lanczos"
    assert_eigs_close(loose.eigenvalues, expected_eigs(ref.eigenvalues, "LA", 3), rtol=1e-4)
    err = (loose.eigenvalues - expected_eigs(ref.eigenvalues, "LA", 3)).abs()
    assert bool((err <= loose.error_bounds + 1e-12).all())
    tight = hessian_eigenvalues(obj, k=3, tol=1e-10)
    assert loose.num_hvps <= tight.num_hvps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_start_reaches_the_top_eigenvalue_with_fewer_hvps(seed):
    # theta = u1 + u2, so the gradient A theta = u1 + 0.5 u2 lies in the top eigenspace.
    n = 1000
    spectrum = torch.cat([torch.tensor([1.0, 0.5]), torch.linspace(-0.45, 0.45, n - 2)])
    model, loss_fn, data, a = quadratic_objective_parts(spectrum, seed=seed)
    vecs = torch.linalg.eigh(a).eigenvectors
    with torch.no_grad():
        next(model.parameters()).copy_(vecs[:, -1] + vecs[:, -2])
    obj = Objective(model, loss_fn, data)
    res = {
        start: hessian_eigenvalues(obj, 1, tol=1e-4, seed=seed, start=start)
        for start in ("gradient", "random")
    }
    for start, r in res.items():
        assert r.start == start and bool(r.converged.all())
        assert abs(float(r.eigenvalues[0]) - 1.0) <= float(r.error_bounds[0]) <= 1e-4
    assert res["gradient"].num_hvps + 2 <= res["random"].num_hvps  # 10 vs 12-14
    # "SA" always starts from r alone: the gradient says nothing about the bottom.
    assert hessian_eigenvalues(obj, 1, which="SA", tol=1e-2).start == "random"
    # At the minimum the gradient is zero: r alone, and the result says so.
    with torch.no_grad():
        next(model.parameters()).zero_()
    at_min = hessian_eigenvalues(obj, 1, tol=1e-4, seed=seed)
    assert at_min.start == "random" and at_min.to_dict()["start"] == "random"
    assert abs(float(at_min.eigenvalues[0]) - 1.0) <= float(at_min.error_bounds[0]) <= 1e-4


def test_dataloader_and_single_batch_agree_with_dense():
    model, x, y, ref = mlp_case()
    for data in ((x, y), DataLoader(TensorDataset(x, y), batch_size=6)):
        res = hessian_eigenvalues(Objective(model, F.cross_entropy, data), k=2, tol=1e-8)
        assert_eigs_close(res.eigenvalues, expected_eigs(ref.eigenvalues, "LA", 2), rtol=1e-7)


def test_logistic_regression_closed_form_spectrum():
    model = logistic_regression()
    x, y = logistic_data()
    closed = torch.linalg.eigvalsh(logistic_hessian(model, x))
    obj = Objective(model, nn.BCEWithLogitsLoss(), uneven_batches(x, y, [16, 16, 8]))
    for which in ("LA", "SA"):
        res = hessian_eigenvalues(obj, k=2, which=which, tol=1e-9)
        assert_eigs_close(res.eigenvalues, expected_eigs(closed, which, 2), rtol=1e-7)
    with pytest.raises(ValueError, match="num_params = 6"):
        hessian_eigenvalues(obj, k=6)


@pytest.mark.parametrize(
    ("spec", "names", "which"),
    [
        ("2", ["2.weight", "2.bias"], "LA"),
        pytest.param("2", ["2.weight", "2.bias"], "SA"),
        ("0.weight", ["0.weight"], "LA"),
        ("0.weight", ["0.weight"], "SA"),
    ],
)
def test_spectrum_of_one_layer_is_the_sub_block(spec, names, which):
    ref = mlp_case()[3]
    full = mlp_objective()
    idx = torch.cat(
        [torch.arange(full.num_params)[sl] for n, sl, _ in full.space.segments() if n in names]
    )
    block = ref.hessian[idx][:, idx]
    block_eigs = torch.linalg.eigvalsh(block)
    assert not torch.allclose(block_eigs[-3:], ref.eigenvalues[-3:])  # a real sub-problem
    obj = mlp_objective(params=spec)
    res = hessian_eigenvalues(obj, k=3, which=which, tol=1e-8)
    scale = float(block_eigs.abs().max())
    assert_eigs_close(res.eigenvalues, expected_eigs(block_eigs, which, 3), 1e-6, scale)
    assert_eigenvectors(res, block, tol=1e-4)


def test_module_selection_spectrum():
    model, x, y, ref = mlp_case()
    obj = Objective(model, F.cross_entropy, (x, y), params=model[0])
    block = ref.hessian[:25, :25]
    res = hessian_eigenvalues(obj, k=2, tol=1e-8)
    assert_eigs_close(res.eigenvalues, expected_eigs(torch.linalg.eigvalsh(block), "LA", 2), 1e-6)


def test_repeated_eigenvalues_of_a_multi_output_linear_model():
    torch.manual_seed(0)
    model = nn.Linear(4, 2).double()
    x, _ = classification_data(n=30)
    y = torch.randn(30, 2, dtype=torch.float64)

    def squared_error(out, target):
        return ((out - target) ** 2).sum(dim=1).mean()

    ref = dense_reference(model, squared_error, (x, y))
    top = expected_eigs(ref.eigenvalues, "LA", 4)
    assert torch.allclose(top[0], top[1]) and torch.allclose(top[2], top[3])
    res = hessian_eigenvalues(Objective(model, squared_error, (x, y)), k=4, tol=1e-8)
    assert_eigs_close(res.eigenvalues, top, rtol=1e-6)


def test_float32():
    model = tiny_mlp(dtype=torch.float32)
    x, y = classification_data(dtype=torch.float32)
    ref = dense_reference(model, F.cross_entropy, (x, y))
    obj = Objective(model, F.cross_entropy, uneven_batches(x, y, [5, 5, 5, 5, 3]))
    res = hessian_eigenvalues(obj, k=3, tol=1e-5)
    assert res.eigenvectors.dtype == torch.float32
    assert_eigs_close(res.eigenvalues, expected_eigs(ref.eigenvalues, "LA", 3), rtol=1e-4)
    tr = hessian_trace(obj, num_probes=30, seed=0)
    assert abs(tr.value - float(ref.hessian.trace())) <= 4 * tr.stderr + 1e-4
    dens = hessian_density(obj, num_runs=2, lanczos_steps=20)
    assert np.trapezoid(dens.density, dens.grid) == pytest.approx(1.0, abs=1e-6)


def million_cnn(seed: int = 0) -> nn.Sequential:
    """Five 3x3 convolutions with BatchNorm (eval mode, non-trivial running statistics),
    ReLU and max pooling, then a linear layer: 981,802 parameters."""
    torch.manual_seed(seed)
    widths = [3, 32, 64, 128, 256, 256]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers += [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
        if i in (1, 2):
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10)]
    model = nn.Sequential(*layers)
    gen = torch.Generator().manual_seed(seed + 1)
    for bn in (m for m in model if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.copy_(0.1 * torch.randn(bn.num_features, generator=gen))
        bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=gen))
    return model.eval()


def test_float32_certificate_on_a_million_parameter_cnn():
    """Float32 Hessian of a ~1M-parameter BatchNorm CNN against its float64 copy (solved to
    tol 1e-10): each float32 bound covers the distance to the float64 eigenvalue."""
    model = million_cnn()
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    ref = hessian_eigenvalues(
        Objective(copy.deepcopy(model).double(), F.cross_entropy, (x.double(), y)), 2, tol=1e-10
    )
    assert bool(ref.converged.all())
    obj = Objective(model, F.cross_entropy, (x, y))
    assert 0.9e6 < obj.num_params < 1.1e6
    for k, tol in ((1, 1e-4), (2, 1e-5)):
        res = hessian_eigenvalues(obj, k, tol=tol)
        err = (res.eigenvalues - ref.eigenvalues[:k]).abs()
        assert bool((err <= res.error_bounds + ref.error_bounds[:k]).all()), (err, res)
        assert bool(res.converged.all())
        assert res.num_hvps == k + 1 + (res.num_hvps - k - 1)  # checks are counted
        # Re-evaluated with float64 products: the bound covers the float32 operator's
        # distance from the exact Hessian (issue 22), and the values are float64's.
        assert res.bound_kind == "certified" and res.reference_hvps == k
        assert 0 < res.rounding < 1e-5 * float(ref.eigenvalues[0])


def test_at_takes_the_hessian_elsewhere():
    model, x, y, ref = mlp_case()
    obj = mlp_objective()
    at = obj.theta * 0.5
    ref_at = dense_reference(model, F.cross_entropy, (x, y), at=at)
    res = hessian_eigenvalues(obj, k=2, tol=1e-8, at=at)
    assert_eigs_close(res.eigenvalues, expected_eigs(ref_at.eigenvalues, "LA", 2), rtol=1e-6)
    assert not torch.allclose(ref_at.eigenvalues[-1], ref.eigenvalues[-1])


# ---------------------------------------------------------------------------------- power
@pytest.mark.parametrize(
    ("case", "which", "tol"),
    [
        ("mlp", "LA", 1e-9),
        ("mlp", "SA", 1e-9),
        ("mlp", "LM", 1e-9),
        # The CNN's dominant eigenvalue is negative (-0.935 vs 0.932): LA needs the shift.
        ("cnn", "LA", 1e-7),
    ],
)
def test_power_iteration_top1(case, which, tol):
    model, x, y, ref = {"mlp": mlp_case, "cnn": cnn_case}[case]()
    obj = Objective(model, F.cross_entropy, (x, y))
    res = hessian_eigenvalues(obj, k=1, which=which, method="power", tol=tol, max_hvps=3000)
    assert res.method == "power"
    assert_eigs_close(res.eigenvalues, expected_eigs(ref.eigenvalues, which, 1), rtol=1e-3)
    assert_eigenvectors(res, ref.hessian, tol=0.05)


def test_power_iteration_top3_with_deflation():
    _, _, _, ref = mlp_case()
    res = hessian_eigenvalues(mlp_objective(), k=3, method="power", tol=1e-10, max_hvps=3000)
    assert_eigs_close(res.eigenvalues, expected_eigs(ref.eigenvalues, "LA", 3), rtol=1e-3)


# ---------------------------------------------------------------------------------- trace
@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_trace_within_four_standard_errors(method, case):
    model, x, y, ref = {"mlp": mlp_case, "cnn": cnn_case}[case]()
    obj = Objective(model, F.cross_entropy, (x, y))
    true = float(ref.hessian.trace())
    # >= 20 stochastic samples: P(|t| > 4) < 1e-3 per call for an unbiased estimator.
    for seed in range(2):
        res = hessian_trace(obj, num_probes=60, method=method, seed=seed)
        assert res.stderr > 0
        assert abs(res.value - true) <= 4 * res.stderr + 1e-9 * float(ref.hessian.abs().sum())
        assert res.num_hvps == 60
    assert res.method == method and res.num_probes == 60


def test_hutchpp_is_exact_when_the_sketch_spans_the_space():
    model, loss_fn, data, a = quadratic_objective_parts(torch.linspace(-1.0, 3.0, 10))
    obj = Objective(model, loss_fn, data)
    res = hessian_trace(obj, num_probes=33, method="hutch++")
    assert res.value == pytest.approx(float(a.trace()), abs=1e-10)
    assert res.stderr <= 1e-10
    assert 0 < res.rounding <= 1e-12


def live_vectors(n: int) -> float:
    """Bytes of live CPU tensor storage of at least n float64s, in vectors of n float64s."""
    sizes = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for o in gc.get_objects():
            if isinstance(o, torch.Tensor) and o.device.type == "cpu":
                try:
                    storage = o.untyped_storage()
                except (NotImplementedError, RuntimeError):  # functorch wrappers, meta
                    continue
                if storage.nbytes() >= 8 * n:
                    sizes[storage.data_ptr()] = storage.nbytes()
    return sum(sizes.values()) / (8 * n)


def test_hutchpp_holds_a_third_of_its_budget_in_vectors():
    """Memory: s = m/3 sketch vectors (Q overwrites H S; S is never stored) plus a few
    (the old code held S, H S and Q: 3s)."""
    n, m = 3001, 30
    lam = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    base, peak = live_vectors(n), [0.0]

    def matvec(v: torch.Tensor) -> torch.Tensor:
        peak[0] = max(peak[0], live_vectors(n) - base)
        return lam * v

    res = hessian_trace(SymmetricOperator(matvec, n), num_probes=m)
    assert res.num_hvps == m
    assert m // 3 <= peak[0] <= m // 3 + 4, peak[0]
    assert abs(res.value - float(lam.sum())) <= 4 * res.stderr + res.rounding


def test_hutchpp_beats_hutchinson_on_a_low_rank_spectrum():
    lam = torch.cat([torch.tensor([50.0, 40.0, 30.0, 20.0, 10.0]), torch.full((45,), 0.1)])
    model, loss_fn, data, _a = quadratic_objective_parts(lam)
    obj = Objective(model, loss_fn, data)
    pp = [hessian_trace(obj, num_probes=30, seed=s).value for s in range(5)]
    hu = [hessian_trace(obj, num_probes=30, method="hutchinson", seed=s).value for s in range(5)]
    true = float(lam.sum())
    assert max(abs(v - true) for v in pp) < 0.5 * max(abs(v - true) for v in hu)


# ---------------------------------------------------------------------------------- density
def cdf(density: DensityResult, t: float) -> float:
    mask = density.grid <= t
    if mask.sum() < 2:
        return 0.0
    return float(np.trapezoid(density.density[mask], density.grid[mask]))


def test_density_integrates_to_one_and_sits_on_the_spectrum():
    _, _, _, ref = mlp_case()
    obj = mlp_objective()
    lam = ref.eigenvalues
    res = hessian_density(obj, num_runs=8, lanczos_steps=43, kernel_width=0.01)
    assert np.trapezoid(res.density, res.grid) == pytest.approx(1.0, abs=1e-9)
    assert (res.density >= 0).all()
    assert res.num_hvps <= 8 * 43  # runs stop at an invariant subspace (zero eigenvalues)
    for nodes, weights in zip(res.nodes, res.weights, strict=True):
        assert weights.sum() == pytest.approx(1.0, abs=1e-10)
        assert nodes.min() >= float(lam[0]) - 1e-9 and nodes.max() <= float(lam[-1]) + 1e-9
    # The density's mean is a stochastic estimate of tr(H)/n: the Ritz measure of a unit
    # start vector v has mean v^T H v, whose spread over Gaussian v is about
    # sqrt(2 mean(lambda^2) / n) per run.
    mean = float(np.trapezoid(res.grid * res.density, res.grid))
    sd = math.sqrt(2 * float((lam**2).mean()) / lam.numel() / res.num_runs)
    assert abs(mean - float(lam.mean())) <= 4 * sd
    # Its CDF follows the empirical eigenvalue CDF.
    for q in (0.25, 0.5, 0.75):
        t = float(torch.quantile(lam, q))
        empirical = float((lam <= t).double().mean())
        assert abs(cdf(res, t) - empirical) <= 0.2, (q, cdf(res, t), empirical)


def test_density_of_two_clusters():
    lam = torch.cat([1.0 + 0.01 * torch.randn(60, dtype=torch.float64), torch.full((20,), 10.0)])
    model, loss_fn, data, _ = quadratic_objective_parts(lam)
    obj = Objective(model, loss_fn, data)
    res = hessian_density(obj, num_runs=10, lanczos_steps=30, kernel_width=0.01)
    low, high = cdf(res, 2.0), 1.0 - cdf(res, 9.0)
    gap = cdf(res, 9.0) - cdf(res, 2.0)
    assert low == pytest.approx(0.75, abs=0.1)
    assert high == pytest.approx(0.25, abs=0.1)
    assert gap <= 1e-3
    assert np.trapezoid(res.density, res.grid) == pytest.approx(1.0, abs=1e-9)


def test_density_with_more_steps_than_dimensions():
    model, loss_fn, data, _a = quadratic_objective_parts(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    res = hessian_density(Objective(model, loss_fn, data), num_runs=3, lanczos_steps=50)
    for nodes in res.nodes:
        assert np.allclose(np.sort(nodes), [1.0, 2.0, 3.0, 4.0], atol=1e-10)
    assert np.trapezoid(res.density, res.grid) == pytest.approx(1.0, abs=1e-9)


# ---------------------------------------------------------------------------------- seeds
def test_same_seed_same_result_different_seed_differs():
    obj = mlp_objective()
    e1, e2 = hessian_eigenvalues(obj, k=2, seed=3), hessian_eigenvalues(obj, k=2, seed=3)
    assert torch.equal(e1.eigenvalues, e2.eigenvalues)
    assert torch.equal(e1.eigenvectors, e2.eigenvectors)
    e3 = hessian_eigenvalues(obj, k=2, seed=4)
    assert not torch.equal(e1.eigenvalues, e3.eigenvalues) or e1.num_hvps != e3.num_hvps
    for method in ("hutch++", "hutchinson"):
        t1 = hessian_trace(obj, num_probes=9, method=method, seed=1)
        t2 = hessian_trace(obj, num_probes=9, method=method, seed=1)
        t3 = hessian_trace(obj, num_probes=9, method=method, seed=2)
        assert t1.value == t2.value and t1.stderr == t2.stderr
        assert t1.value != t3.value
    d1 = hessian_density(obj, num_runs=2, lanczos_steps=10, seed=5)
    d2 = hessian_density(obj, num_runs=2, lanczos_steps=10, seed=5)
    d3 = hessian_density(obj, num_runs=2, lanczos_steps=10, seed=6)
    assert np.array_equal(d1.density, d2.density) and np.array_equal(d1.grid, d2.grid)
    assert not np.array_equal(d1.density, d3.density)


def test_generator_seed_and_global_rng_untouched():
    obj = mlp_objective()
    state = torch.get_rng_state()
    by_int = hessian_trace(obj, num_probes=9, seed=7)
    by_gen = hessian_trace(obj, num_probes=9, seed=torch.Generator().manual_seed(7))
    assert by_int.value == by_gen.value
    assert by_int.seed == 7
    hessian_eigenvalues(obj, k=2, seed=torch.Generator().manual_seed(1))
    hessian_density(obj, num_runs=2, lanczos_steps=5)
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------------- state safety
def test_model_unchanged_by_every_measure():
    model = bn_cnn()
    model.train()
    model[1].eval()
    x, y = image_data()
    F.cross_entropy(model(x), y).backward()
    snap = ModelSnapshot.take(model)
    for eval_mode in (True, False):
        obj = Objective(model, F.cross_entropy, uneven_batches(x, y, [6, 7]), eval_mode=eval_mode)
        hessian_eigenvalues(obj, k=2)
        snap.assert_unchanged(model)
        hessian_eigenvalues(obj, k=1, method="power", max_hvps=20)
        snap.assert_unchanged(model)
        hessian_trace(obj, num_probes=6)
        snap.assert_unchanged(model)
        hessian_density(obj, num_runs=1, lanczos_steps=5)
        snap.assert_unchanged(model)


@pytest.mark.parametrize("exc", [RuntimeError("hvp failed"), KeyboardInterrupt()])
@pytest.mark.parametrize("measure", ["eigenvalues", "trace", "density"])
def test_model_unchanged_when_a_measure_is_interrupted(measure, exc):
    model = bn_cnn()
    model.train()
    x, y = image_data()
    snap = ModelSnapshot.take(model)
    calls = {"n": 0}

    def loss_fn(out, target):
        calls["n"] += 1
        if calls["n"] >= 12:  # well inside the measure, after the determinism check
            raise exc
        return F.cross_entropy(out, target)

    # Without the cached graph every HVP calls loss_fn, so the error lands mid-measure.
    obj = Objective(model, loss_fn, uneven_batches(x, y, [6, 7]), cache_graph=False)
    run = {
        "eigenvalues": lambda: hessian_eigenvalues(obj, k=2),
        "trace": lambda: hessian_trace(obj, num_probes=9),
        "density": lambda: hessian_density(obj, num_runs=2, lanczos_steps=10),
    }[measure]
    with pytest.raises(type(exc)):
        run()
    snap.assert_unchanged(model)


# ---------------------------------------------------------------------------------- errors
def test_bad_arguments():
    obj = mlp_objective()
    n = obj.num_params
    bad_eigs = [
        ({"k": n}, ValueError, "k must"),
        ({"k": n + 5}, ValueError, "k must"),
        ({"k": 0}, ValueError, "k must"),
        ({"k": 2.0}, ValueError, "k must"),
        ({"tol": 0.0}, ValueError, "tol"),
        ({"tol": -1e-3}, ValueError, "tol"),
        ({"tol": float("nan")}, ValueError, "tol"),
        ({"which": "LR"}, ValueError, "which"),
        ({"method": "arnoldi"}, ValueError, "method"),
        ({"max_hvps": 0}, ValueError, "max_hvps"),
        ({"seed": "zero"}, TypeError, "seed"),
        ({"start": "ones"}, ValueError, "start"),
    ]
    for kwargs, exc, match in bad_eigs:
        with pytest.raises(exc, match=match):
            hessian_eigenvalues(obj, **kwargs)
    with pytest.raises(ValueError, match="num_probes"):
        hessian_trace(obj, num_probes=2)
    with pytest.raises(ValueError, match="num_probes"):
        hessian_trace(obj, num_probes=1, method="hutchinson")
    with pytest.raises(ValueError, match="method"):
        hessian_trace(obj, method="exact")
    with pytest.raises(ValueError, match="num_runs"):
        hessian_density(obj, num_runs=0)
    with pytest.raises(ValueError, match="lanczos_steps"):
        hessian_density(obj, lanczos_steps=0)
    with pytest.raises(ValueError, match="kernel_width"):
        hessian_density(obj, kernel_width=0.0)
    assert obj.counts["hvp"] == 0  # rejected before any work


# ---------------------------------------------------------------------------------- results
def test_results_are_json_ready_with_settings():
    obj = mlp_objective()
    eig = hessian_eigenvalues(obj, k=2, which="SA", tol=1e-6, seed=3)
    tr = hessian_trace(obj, num_probes=9, method="hutchinson", seed=1)
    dens = hessian_density(obj, num_runs=2, lanczos_steps=8, seed=2)
    assert tr.num_hvps == 9 and dens.num_hvps == 2 * 8
    assert abs(np.trapezoid(dens.density, dens.grid) - 1.0) < 1e-3
    assert all(abs(float(np.sum(w)) - 1.0) < 1e-10 for w in dens.weights)
    for res in (eig, tr, dens):
        d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
        assert d["kind"] == type(res).__name__
        assert d["num_hvps"] == res.num_hvps > 0
    d = eig.to_dict()
    assert "eigenvectors" not in d
    assert d["k"] == 2 and d["which"] == "SA" and d["tol"] == 1e-6 and d["seed"] == 3
    assert d["method"] == "lanczos"
    assert d["eigenvalues"] == eig.eigenvalues.tolist()
    assert len(d["residuals"]) == 2 and len(d["converged"]) == 2
    d = tr.to_dict()
    assert d["method"] == "hutchinson" and d["num_probes"] == 9 and d["seed"] == 1
    assert d["value"] == tr.value
    d = dens.to_dict()
    assert d["num_runs"] == 2 and d["lanczos_steps"] == 8 and d["seed"] == 2
    assert len(d["grid"]) == len(d["density"]) == 1000


def test_progress_bars(capsys):
    obj = mlp_objective()
    hessian_eigenvalues(obj, k=1, progress=True)
    hessian_trace(obj, num_probes=6, progress=True)
    hessian_density(obj, num_runs=1, lanczos_steps=4, progress=True)
    err = capsys.readouterr().err
    assert "lanczos" in err and "trace" in err and "density" in err
    assert "/500" not in err  # work done, not a budget that is rarely spent


def test_objective_reference_for_spectrum():
    """dense_hessian via the helper equals the direct reference (used by other test files)."""
    _, _, _, ref = cnn_case()
    model, x, y, _ = cnn_case()
    obj = Objective(model, F.cross_entropy, uneven_batches(x, y, [5, 5, 3]))
    assert torch.allclose(objective_reference(obj).hessian, ref.hessian, atol=1e-13)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_max_hvps_is_one_hard_budget_for_both_methods(method):
    obj = mlp_objective()
    res = hessian_eigenvalues(obj, k=2, method=method, tol=1e-14, max_hvps=7)
    assert res.num_hvps <= 7
    assert res.max_hvps == 7
    assert not bool(res.converged.all())
    with pytest.warns(FutureWarning, match="max_hvps"):
        old = hessian_eigenvalues(obj, k=2, method=method, tol=1e-14, max_iter=7)
    assert torch.equal(old.eigenvalues, res.eigenvalues)
    with pytest.raises(TypeError, match="pass max_hvps only"):
        hessian_eigenvalues(obj, k=2, max_hvps=7, max_iter=7)


def test_basis_size_is_passed_through_and_bounds_memory():
    obj = mlp_objective()
    small = hessian_eigenvalues(obj, k=1, tol=1e-8, basis_size=4)
    default = hessian_eigenvalues(obj, k=1, tol=1e-8)
    assert small.num_restarts > default.num_restarts
    assert abs(float(small.eigenvalues[0] - default.eigenvalues[0])) <= 1e-6 * abs(
        float(default.eigenvalues[0])
    )


def test_value_is_the_first_eigenvalue_as_a_float():
    obj = mlp_objective()
    top = hessian_eigenvalues(obj, k=2, tol=1e-8)
    assert isinstance(top.value, float) and top.value == float(top.eigenvalues[0])
    low = hessian_eigenvalues(obj, k=1, which="SA", tol=1e-8)
    assert low.value == float(low.eigenvalues[0]) < top.value
