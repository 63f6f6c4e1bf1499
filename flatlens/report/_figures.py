"""Matplotlib figures for Hessian spectra and densities, saved atomically.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot), so they never
touch the user's interactive backend and work headless. Names and titles are drawn as text,
never as mathtext (:func:`flatlens.core._text.literal`): a module named ``$x^$`` is drawn as
it reads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from flatlens.core._io import write_figure
from flatlens.core._text import literal

__all__ = ["plot_block_spectra", "plot_density", "plot_eigenvalues"]


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
    ax.set_title(literal(title) if title else "Hessian spectral density (SLQ)")
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
        ax.bar(x, vals, width=width, label=literal(label))
    ax.set_xticks(np.arange(max(len(v) for v in values.values())) + 0.4 - width / 2)
    ax.set_xticklabels([str(i + 1) for i in range(max(len(v) for v in values.values()))])
    ax.set_xlabel("index i")
    ax.set_ylabel("λ_i")
    ax.set_title(literal(title) if title else "Top Hessian eigenvalues")
    if len(values) > 1:
        ax.legend()
    ax.grid(alpha=0.3, axis="y")
    write_figure(fig, path)


def _block_rows(result: Any) -> list[tuple[str, np.ndarray, Any]]:
    """``(name, eigenvalues, (grid, density) or None)`` of each block of a
    :class:`~flatlens.measures.BlockSpectraResult` or of its ``to_dict()``."""
    blocks = result["blocks"] if isinstance(result, Mapping) else result.blocks
    rows = []
    for b in blocks:
        get = b.get if isinstance(b, Mapping) else lambda key, b=b: getattr(b, key, None)
        vals = np.asarray(get("eigenvalues"), dtype=float).reshape(-1)
        dens = get("density")
        curve = None
        if dens is not None:
            if isinstance(dens, Mapping):
                curve = (np.asarray(dens["grid"], float), np.asarray(dens["density"], float))
            else:
                curve = (np.asarray(dens.grid, float), np.asarray(dens.density, float))
        rows.append((literal(get("name")), vals, curve))
    return rows


def plot_block_spectra(result: Any, path: str | os.PathLike, *, title: str = "") -> Path:
    """Plot per-block Hessian spectra (:func:`~flatlens.measures.block_spectra`).

    Left: a strip chart of each block's top eigenvalues lambda_i(H_bb) (the largest as a
    bar, the others as dots) on a log axis, symmetric-log when some are <= 0. Right, when
    the result holds densities: each block's SLQ density on a log axis, overlaid (a block
    with a single distinct eigenvalue as a dashed line at it).

    Args:
        result: A :class:`~flatlens.measures.BlockSpectraResult` or its ``to_dict()``.
        path: Output file (format from the suffix), written atomically.
        title: Figure title.

    Returns:
        The path written.
    """
    rows = _block_rows(result)
    if not rows:
        raise ValueError("the result has no blocks to plot")
    curves = [(name, c) for name, _, c in rows if c is not None]
    n = len(rows)
    width = min(max(4.5, 0.45 * n + 1.5), 20.0)
    fig = Figure(figsize=(width + (5.5 if curves else 0), 4.2))
    axes = fig.subplots(1, 2, width_ratios=[width, 5.5]) if curves else [fig.subplots()]
    ax = axes[0]
    colors = [f"C{i % 10}" for i in range(n)]
    tops = np.array([v[0] if v.size else np.nan for _, v, _ in rows])
    ax.bar(np.arange(n), tops, width=0.6, color=colors, alpha=0.35)
    for i, (_, vals, _) in enumerate(rows):
        ax.plot(np.full(vals.size, i), vals, "o", color=colors[i], ms=4)
    finite = np.concatenate([v[np.isfinite(v)] for _, v, _ in rows])
    if finite.size and (finite <= 0).any():
        positive = np.abs(finite[finite != 0])
        ax.set_yscale("symlog", linthresh=float(positive.min()) if positive.size else 1.0)
    elif finite.size:
        ax.set_yscale("log")
    ax.set_xticks(np.arange(n))
    turn = n > 4
    ax.set_xticklabels(
        [name for name, _, _ in rows], rotation=45 if turn else 0, ha="right" if turn else "center"
    )
    ax.set_ylabel("top eigenvalues of H_bb")
    ax.set_title(literal(title) if title else "Per-block Hessian spectra")
    ax.grid(alpha=0.3, axis="y")
    if curves:
        dax = axes[1]
        peak = 0.0
        for i, (name, _, curve) in enumerate(rows):
            if curve is None:
                continue
            grid, dens = curve
            if grid[-1] - grid[0] <= 1e-6 * max(float(np.abs(grid).max()), 1e-300):
                # One distinct eigenvalue (e.g. a one-parameter block): a point mass.
                dax.axvline(float(grid.mean()), color=colors[i], ls="--", lw=1.2, label=name)
                continue
            dens = np.maximum(dens, 1e-12)
            peak = max(peak, float(dens.max()))
            dax.plot(grid, dens, color=colors[i], label=name, lw=1.2)
        dax.set_yscale("log")
        if peak > 0:
            dax.set_ylim(max(peak * 1e-8, 1e-12), peak * 3)
        dax.set_xlabel("eigenvalue")
        dax.set_ylabel("density")
        dax.set_title("block densities (SLQ)")
        dax.grid(alpha=0.3)
        if len(curves) <= 12:
            dax.legend(fontsize="small")
    fig.tight_layout()
    return write_figure(fig, path)
