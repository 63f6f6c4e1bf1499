"""Matplotlib figures for Hessian spectra and densities, saved atomically.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot), so they never
touch the user's interactive backend and work headless.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from flatlens.core._io import write_figure

__all__ = ["plot_density", "plot_eigenvalues"]


def plot_density(density, path: str | os.PathLike, *, log: bool = True, title: str = "") -> None:
    """Plot a :class:`~flatlens.measures.DensityResult` (log-scale density by default)."""
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    dens = np.maximum(np.asarray(density.density), 1e-12) if log else density.density
    ax.plot(density.grid, dens, color="#2b6cb0")
    if log:
        ax.set_yscale("log")
        ax.set_ylim(max(dens.max() * 1e-8, 1e-12), dens.max() * 3)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title or "Hessian spectral density (SLQ)")
    ax.grid(alpha=0.3)
    write_figure(fig, path)


def plot_eigenvalues(
    values: dict[str, Sequence[float]], path: str | os.PathLike, *, title: str = ""
) -> None:
    """Bar chart of the top eigenvalues of one or more runs, ``{label: eigenvalues}``."""
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    width = 0.8 / max(len(values), 1)
    for i, (label, vals) in enumerate(values.items()):
        x = np.arange(len(vals)) + i * width
        ax.bar(x, vals, width=width, label=label)
    ax.set_xticks(np.arange(max(len(v) for v in values.values())) + 0.4 - width / 2)
    ax.set_xticklabels([str(i + 1) for i in range(max(len(v) for v in values.values()))])
    ax.set_xlabel("index i")
    ax.set_ylabel("λ_i")
    ax.set_title(title or "Top Hessian eigenvalues")
    if len(values) > 1:
        ax.legend()
    ax.grid(alpha=0.3, axis="y")
    write_figure(fig, path)
