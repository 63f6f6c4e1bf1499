"""The Hessian spectrum of an :class:`~flatlens.Objective`: extreme eigenvalues, trace, density.

All three only need Hessian-vector products v -> H v, which run on the model's device.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.linalg
import torch
from torch import Tensor
from tqdm.auto import tqdm

from flatlens.core._checks import check_positive_int, make_generator
from flatlens.core._objective import Objective
from flatlens.core._results import Result
from flatlens.measures._lanczos import Which, lanczos_eigsh, lanczos_tridiagonal, power_iteration

__all__ = [
    "DensityResult",
    "EigenResult",
    "TraceResult",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
]


def random_vector(
    objective: Objective, generator: torch.Generator, kind: str = "gaussian"
) -> Tensor:
    """A random flat vector (drawn on the CPU, so every device and rank gets the same one)."""
    n = objective.num_params
    if kind == "rademacher":
        v = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8).to(torch.float64)
        v = 2 * v - 1
    else:
        v = torch.randn(n, generator=generator, dtype=torch.float64)
    return v.to(objective.device, objective.dtype)


def _start_vector(
    objective: Objective, theta: Tensor, generator: torch.Generator, *, use_gradient: bool
) -> tuple[Tensor, str]:
    """``(r / ||r|| + g / ||g||, "gradient")`` (r Gaussian, g the gradient at ``theta``), or
    ``(r, "random")`` when not asked for or when g is zero or not finite."""
    r = random_vector(objective, generator)
    if not use_gradient:
        return r, "random"
    g = objective.gradient(at=theta)
    g_norm = torch.linalg.vector_norm(g)
    if not bool(torch.isfinite(g_norm)) or g_norm == 0:
        return r, "random"
    return r / torch.linalg.vector_norm(r) + g / g_norm, "gradient"


@dataclass
class EigenResult(Result):
    """Extreme eigenpairs of the Hessian.

    Attributes:
        eigenvalues: 1-D float64 tensor, most wanted first (descending for ``"LA"``).
        eigenvectors: ``(k, num_params)`` tensor of unit rows (left out of ``to_dict``).
        residuals: ``||H u - lambda u||`` for each pair.
        error_bounds: Certified bound on each eigenvalue's error, min(||r||, ||r||^2/gap).
        converged: Whether each bound is within ``tol`` relative.
        num_hvps: Hessian-vector products spent (at most ``max_hvps``).
        start: The Lanczos start vector used: ``"gradient"`` or ``"random"``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor = field(metadata={"json": False})
    residuals: Tensor
    error_bounds: Tensor
    converged: Tensor
    num_hvps: int
    k: int
    which: str
    method: str
    tol: float
    max_hvps: int | None
    seed: int | None
    num_restarts: int = 0
    start: str = "gradient"


def hessian_eigenvalues(
    objective: Objective,
    k: int = 1,
    *,
    which: Which = "LA",
    method: Literal["lanczos", "power"] = "lanczos",
    tol: float = 1e-4,
    max_hvps: int | None = None,
    basis_size: int | None = None,
    seed: int | torch.Generator = 0,
    progress: bool = False,
    at: Tensor | None = None,
    start: Literal["gradient", "random"] = "gradient",
    max_iter: int | None = None,
) -> EigenResult:
    """The k extreme eigenvalues of H = grad^2 L(theta) and their eigenvectors.

    ``method="lanczos"`` runs thick-restart Lanczos with full reorthogonalization on the
    model's device and stops once each wanted eigenvalue's certified error bound
    min(||r||, ||r||^2 / gap), r = H u - lambda u, is at most ``tol`` relative.
    ``method="power"`` runs power iteration with deflation and stops when the Rayleigh
    quotient changes by less than ``tol`` relative (no certificate).

    Args:
        objective: The empirical risk whose Hessian is taken.
        k: Number of eigenpairs (1 <= k < num_params).
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest
            magnitude.
        method: ``"lanczos"`` or ``"power"``.
        tol: Relative accuracy wanted, > 0.
        max_hvps: Budget of Hessian-vector products for either method (default: Lanczos
            ``max(500, 20 basis_size)``, power iteration ``1000 k``).
            When it is spent before ``tol`` is met, ``converged`` says so.
        basis_size: Lanczos vectors kept between restarts (memory: ``basis_size + 1``
            vectors of ``num_params``); default ``max(2k + 10, 24)``, capped at n.
        seed: Seed or generator for the start vector.
        progress: Show a tqdm bar.
        at: Flat parameter vector where the Hessian is taken (default: the model's).
        start: Lanczos start vector. ``"gradient"`` (for ``"LA"`` and ``"LM"``) is
            r / ||r|| + g / ||g|| with r Gaussian and g = grad L(theta): the gradient of a
            trained network lies mostly in the top eigenspace (Gur-Ari et al., 2018), and
            r keeps every eigenvector in reach. It costs one gradient: free when the
            objective caches its graph, one more pass over the data otherwise (not counted
            in ``num_hvps``). ``"random"`` is r alone (always used for ``"SA"`` and for
            power iteration, and when g is zero); the result's ``start`` says which ran.
        max_iter: Deprecated name of ``max_hvps``.

    Returns:
        An :class:`EigenResult`.
    """
    n = objective.num_params
    if not isinstance(k, int) or not 1 <= k < n:
        raise ValueError(f"k must be an integer with 1 <= k < num_params = {n}, got {k!r}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if which not in ("LA", "SA", "LM"):
        raise ValueError(f"which must be 'LA', 'SA' or 'LM', not {which!r}")
    if max_iter is not None:
        if max_hvps is not None:
            raise TypeError("pass max_hvps only (max_iter is its deprecated name)")
        warnings.warn(
            "hessian_eigenvalues(max_iter=) is deprecated: it is an HVP budget, use max_hvps=",
            DeprecationWarning,
            stacklevel=2,
        )
        max_hvps = max_iter
    if max_hvps is not None:
        max_hvps = check_positive_int("max_hvps", max_hvps)
    if start not in ("gradient", "random"):
        raise ValueError(f"start must be 'gradient' or 'random', not {start!r}")
    gen = make_generator(seed)
    theta = objective.point(at)
    start_hvps = objective.counts["hvp"]

    def matvec(v: Tensor) -> Tensor:
        return objective.hvp(v, at=theta)

    if method == "lanczos":
        v0, used = _start_vector(
            objective, theta, gen, use_gradient=start == "gradient" and which != "SA"
        )
        out = lanczos_eigsh(
            matvec,
            v0,
            k,
            which=which,
            tol=tol,
            max_matvecs=max_hvps,
            basis_size=basis_size,
            generator=gen,
            progress=progress,
        )
    elif method == "power":
        used = "random"
        out = power_iteration(
            matvec,
            n,
            k,
            which=which,
            tol=tol,
            max_matvecs=max_hvps,
            make_start=lambda: random_vector(objective, gen),
            progress=progress,
        )
    else:
        raise ValueError(f"method must be 'lanczos' or 'power', not {method!r}")
    return EigenResult(
        eigenvalues=out.eigenvalues,
        eigenvectors=out.eigenvectors,
        residuals=out.residuals,
        error_bounds=out.error_bounds,
        converged=out.converged,
        num_hvps=objective.counts["hvp"] - start_hvps,
        k=k,
        which=which,
        method=method,
        tol=tol,
        max_hvps=max_hvps,
        seed=seed if isinstance(seed, int) else None,
        num_restarts=out.num_restarts,
        start=used,
    )


@dataclass
class TraceResult(Result):
    """Stochastic estimate of tr(H).

    Attributes:
        value: The estimate.
        stderr: Its standard error (of the stochastic part for Hutch++).
        num_hvps: Hessian-vector products spent.
    """

    value: float
    stderr: float
    num_hvps: int
    num_samples: int
    method: str
    seed: int | None


def hessian_trace(
    objective: Objective,
    *,
    num_samples: int = 99,
    method: Literal["hutch++", "hutchinson"] = "hutch++",
    seed: int | torch.Generator = 0,
    progress: bool = False,
    at: Tensor | None = None,
) -> TraceResult:
    """Estimate tr(H) with ``num_samples`` Hessian-vector products.

    * Hutchinson: tr(H) ~ (1/m) sum_i z_i^T H z_i with Rademacher z_i.
    * Hutch++ (Meyer et al., 2021): with m/3 products sketch Q = orth(H S), add the exact
      tr(Q^T H Q) (m/3 products) and Hutchinson on the deflated rest (I - QQ^T) H (I - QQ^T)
      (the remaining products). Its variance falls like 1/m^2 instead of 1/m.

    Args:
        objective: The empirical risk.
        num_samples: HVP budget m (>= 2 for Hutchinson, >= 3 for Hutch++).
        method: ``"hutch++"`` or ``"hutchinson"``.
        seed: Seed or generator.
        progress: Show a tqdm bar.
        at: Flat parameter vector where the Hessian is taken (default: the model's).
    """
    if method not in ("hutch++", "hutchinson"):
        raise ValueError(f"method must be 'hutch++' or 'hutchinson', not {method!r}")
    least = 3 if method == "hutch++" else 2
    if not isinstance(num_samples, int) or num_samples < least:
        raise ValueError(f"num_samples must be an integer >= {least} for {method}")
    gen = make_generator(seed)
    theta = objective.point(at)
    start = objective.counts["hvp"]
    bar = tqdm(total=num_samples, desc="trace", disable=not progress, leave=False)

    def hvp(v: Tensor) -> Tensor:
        bar.update(1)
        return objective.hvp(v, at=theta)

    exact = 0.0
    Q = None
    n_stoch = num_samples
    if method == "hutch++":
        s = min(num_samples // 3, objective.num_params)
        S = torch.stack([random_vector(objective, gen, "rademacher") for _ in range(s)], dim=1)
        HS = torch.stack([hvp(S[:, i]) for i in range(s)], dim=1)
        Q, _ = torch.linalg.qr(HS)
        exact = sum(float(Q[:, i] @ hvp(Q[:, i])) for i in range(Q.shape[1]))
        n_stoch = num_samples - 2 * s
    samples = []
    for _ in range(n_stoch):
        z = random_vector(objective, gen, "rademacher")
        if Q is not None:
            z = z - Q @ (Q.T @ z)
        samples.append(float(z @ hvp(z)))
    bar.close()
    arr = np.asarray(samples, dtype=np.float64)
    stderr = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else float("nan")
    return TraceResult(
        value=exact + float(arr.mean()),
        stderr=stderr,
        num_hvps=objective.counts["hvp"] - start,
        num_samples=num_samples,
        method=method,
        seed=seed if isinstance(seed, int) else None,
    )


@dataclass
class DensityResult(Result):
    """Spectral density of H by stochastic Lanczos quadrature.

    Attributes:
        grid: Evaluation points (1-D array).
        density: Gaussian-smoothed density on ``grid``; integrates to 1 (trapezoid rule).
        nodes: Ritz values of each run (list of arrays).
        weights: Quadrature weights of each run (each sums to 1).
        sigma: Width of the Gaussian kernel.
    """

    grid: np.ndarray
    density: np.ndarray
    nodes: list[np.ndarray]
    weights: list[np.ndarray]
    sigma: float
    num_runs: int
    lanczos_steps: int
    num_hvps: int
    seed: int | None


def hessian_density(
    objective: Objective,
    *,
    num_runs: int = 4,
    lanczos_steps: int = 64,
    num_points: int = 1000,
    kernel_width: float = 0.01,
    seed: int | torch.Generator = 0,
    progress: bool = False,
    at: Tensor | None = None,
) -> DensityResult:
    """Spectral density phi(t) = (1/n) sum_i delta(t - lambda_i) by stochastic Lanczos quadrature.

    Each run starts Lanczos from a random unit vector v, builds the tridiagonal T with full
    reorthogonalization and solves it with the symmetric tridiagonal eigensolver
    (``scipy.linalg.eigh_tridiagonal``): nodes theta_j are its eigenvalues and weights
    tau_j = (e_1^T y_j)^2 (so v^T f(H) v ~ sum_j tau_j f(theta_j)). The density is the
    average over runs of sum_j tau_j N(t; theta_j, sigma^2), with
    sigma = kernel_width * (max node - min node).

    Args:
        objective: The empirical risk.
        num_runs: Number of random start vectors.
        lanczos_steps: Lanczos steps per run (HVPs per run).
        num_points: Size of the output grid.
        kernel_width: Gaussian width relative to the spectrum's range.
        seed: Seed or generator.
        progress: Show a tqdm bar.
        at: Flat parameter vector where the Hessian is taken (default: the model's).
    """
    if num_runs < 1 or lanczos_steps < 1 or num_points < 2:
        raise ValueError("num_runs and lanczos_steps must be >= 1 and num_points >= 2")
    if not kernel_width > 0:
        raise ValueError(f"kernel_width must be > 0, got {kernel_width!r}")
    gen = make_generator(seed)
    theta = objective.point(at)
    start = objective.counts["hvp"]
    nodes, weights = [], []
    for _ in tqdm(range(num_runs), desc="density", disable=not progress, leave=False):
        alpha, beta = lanczos_tridiagonal(
            lambda v: objective.hvp(v, at=theta),
            random_vector(objective, gen),
            lanczos_steps,
        )
        if alpha.numel() == 1:
            vals, vecs = alpha.numpy(), np.ones((1, 1))
        else:
            vals, vecs = scipy.linalg.eigh_tridiagonal(alpha.numpy(), beta.numpy())
        nodes.append(vals)
        weights.append(vecs[0] ** 2)
    all_nodes = np.concatenate(nodes)
    lo, hi = float(all_nodes.min()), float(all_nodes.max())
    sigma = kernel_width * max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points)
    density = np.zeros_like(grid)
    for vals, w in zip(nodes, weights, strict=True):
        z = (grid[:, None] - vals[None, :]) / sigma
        density += (np.exp(-0.5 * z**2) * w[None, :]).sum(axis=1)
    density /= num_runs * sigma * math.sqrt(2 * math.pi)
    density /= np.trapezoid(density, grid)
    return DensityResult(
        grid=grid,
        density=density,
        nodes=nodes,
        weights=weights,
        sigma=sigma,
        num_runs=num_runs,
        lanczos_steps=lanczos_steps,
        num_hvps=objective.counts["hvp"] - start,
        seed=seed if isinstance(seed, int) else None,
    )
