"""Matplotlib figures for spectra, densities and comparisons.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot), so they never
touch the user's interactive backend and work headless.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from flatlens.io import write_bytes

__all__ = ["plot_density", "plot_eigenvalues", "plot_flatness_vs_gap", "save_figure"]


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 130) -> None:
    """Save a figure atomically (format from the suffix) and close it."""
    buffer = io.BytesIO()
    fmt = os.fspath(path).rsplit(".", 1)[-1].lower()
    fig.savefig(buffer, format=fmt, dpi=dpi, bbox_inches="tight")
    write_bytes(path, buffer.getvalue())


def plot_density(density, path: str | os.PathLike, *, log: bool = True, title: str = "") -> None:
    """Plot a :class:`~flatlens.spectrum.DensityResult` (log-scale density by default)."""
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
    save_figure(fig, path)


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
    save_figure(fig, path)


def plot_flatness_vs_gap(
    rows: Sequence[dict], measures: Sequence[str], path: str | os.PathLike, *, gap: str = "gap"
) -> None:
    """Scatter each flatness measure against the generalization gap, one panel each.

    ``rows`` are dicts with a ``label`` (e.g. the optimizer), ``gap`` and the measures;
    each panel's title carries Kendall's tau when given as ``tau_<measure>``.
    """
    fig = Figure(figsize=(4 * len(measures), 3.4))
    axes = fig.subplots(1, len(measures), squeeze=False)
    labels = sorted({r.get("label", "") for r in rows})
    colors = dict(zip(labels, matplotlib.colormaps["tab10"].colors, strict=False))
    for ax, measure in zip(axes[0], measures, strict=True):
        for label in labels:
            pts = [(r[measure], r[gap]) for r in rows if r.get("label", "") == label]
            pts = [(a, b) for a, b in pts if a is not None and b is not None]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.scatter(xs, ys, label=label, color=colors[label])
        tau = rows[0].get(f"tau_{measure}") if rows else None
        ax.set_title(f"{measure}" + (f"  (τ = {tau:.2f})" if tau is not None else ""))
        ax.set_xlabel(measure)
        ax.set_ylabel(gap)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path)
