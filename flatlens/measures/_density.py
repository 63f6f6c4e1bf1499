"""The spectral density of the Hessian of an :class:`~flatlens.Objective` (or of any
symmetric operator) by stochastic Lanczos quadrature."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import Tensor
from tqdm.auto import tqdm

from flatlens.core._checks import make_generator
from flatlens.core._memory import tracks_peak_memory
from flatlens.core._results import MeasureResult
from flatlens.measures._krylov import lanczos_tridiagonal
from flatlens.measures._operators import as_operator

__all__ = ["DensityResult", "hessian_density"]


@dataclass
class DensityResult(MeasureResult):
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


@tracks_peak_memory
def hessian_density(
    objective: Any,
    *,
    num_runs: int = 4,
    lanczos_steps: int = 64,
    num_points: int = 1000,
    kernel_width: float = 0.01,
    seed: int | torch.Generator = 0,
    progress: bool = False,
    at: Tensor | None = None,
    basis_device: torch.device | str | None = None,
    basis_dtype: torch.dtype | None = None,
) -> DensityResult:
    """Spectral density phi(t) = (1/n) sum_i delta(t - lambda_i) by stochastic Lanczos quadrature.

    Each run starts Lanczos from a random unit vector v, builds the tridiagonal T with full
    reorthogonalization (float64 sums) and solves it with the symmetric tridiagonal
    eigensolver (``scipy.linalg.eigh_tridiagonal``): nodes theta_j are its eigenvalues and
    weights tau_j = (e_1^T y_j)^2 (so v^T f(H) v ~ sum_j tau_j f(theta_j)). The density is
    the average over runs of sum_j tau_j N(t; theta_j, sigma^2), with
    sigma = kernel_width * (max node - min node). The operator's rounding moves each node
    by about the eigenvalue allowance d, far below sigma. Memory: ``lanczos_steps``
    vectors of num_params, allocated as the run grows.

    Args:
        objective: The empirical risk, or a symmetric operator (see
            :func:`hessian_eigenvalues`).
        num_runs: Number of random start vectors.
        lanczos_steps: Lanczos steps per run (products per run).
        num_points: Size of the output grid.
        kernel_width: Gaussian width relative to the spectrum's range.
        seed: Seed or generator.
        progress: Show a tqdm bar of products done (of at most num_runs * lanczos_steps).
        at: Flat parameter vector where the Hessian is taken (default: the model's).
        basis_device: Keep the Lanczos basis there (as for :func:`hessian_eigenvalues`).
        basis_dtype: Store the basis in this dtype (as for :func:`hessian_eigenvalues`).
    """
    if num_runs < 1 or lanczos_steps < 1 or num_points < 2:
        raise ValueError("num_runs and lanczos_steps must be >= 1 and num_points >= 2")
    if not kernel_width > 0:
        raise ValueError(f"kernel_width must be > 0, got {kernel_width!r}")
    gen = make_generator(seed)
    op = as_operator(objective, at)
    total = num_runs * min(lanczos_steps, op.n)
    bar = tqdm(total=total, desc="density", unit="matvec", disable=not progress, leave=False)
    op.on_product = bar.update
    nodes, weights = [], []
    try:
        for _ in range(num_runs):
            alpha, beta = lanczos_tridiagonal(
                op.matvec,
                op.random(gen),
                lanczos_steps,
                basis_device=basis_device,
                basis_dtype=basis_dtype,
            )
            if alpha.numel() == 1:
                vals, vecs = alpha.numpy(), np.ones((1, 1))
            else:
                vals, vecs = scipy.linalg.eigh_tridiagonal(alpha.numpy(), beta.numpy())
            nodes.append(vals)
            weights.append(vecs[0] ** 2)
    finally:
        op.on_product = None
        bar.close()
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
        num_hvps=op.count,
        seed=seed if isinstance(seed, int) else None,
    )
