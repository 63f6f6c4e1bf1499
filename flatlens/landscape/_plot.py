"""Plots of landscapes: 1-D curves, 2-D contours (matplotlib) and 3-D surfaces (plotly).

Matplotlib figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot), so
they work headless and never touch the user's interactive backend; a ``path`` ending in
``.png``, ``.pdf`` or ``.svg`` saves them. The plotly surface is written as one HTML file
that embeds plotly.js, so it opens offline. Every file is written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flatlens.core._io import write_figure, write_text
from flatlens.core._text import literal
from flatlens.landscape._storage import Landscape

__all__ = ["plot_contour", "plot_line", "plot_surface"]

_LABELS = {
    "loss": "loss",
    "accuracy": "accuracy",
    "lambda_max": "λ_max",
    "lambda_min": "λ_min",
    "ratio": "|λ_min / λ_max|",
}


def _label(metric: str, log: bool) -> str:
    """The axis label of ``metric``, drawn literally (a metric's name is the user's)."""
    name = _LABELS.get(metric, literal(metric))
    return f"log10 {name}" if log else name


def _values(landscape: Landscape, metric: str, log: bool) -> np.ndarray:
    if metric not in landscape.values:
        raise ValueError(f"landscape has no metric {metric!r}; it has {landscape.metrics}")
    z = np.asarray(landscape.values[metric], dtype=np.float64)
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.log10(np.where(z > 0, z, np.nan))
    return z


def plot_line(
    landscapes: Landscape | Mapping[str, Landscape],
    path: str | os.PathLike | None = None,
    *,
    metrics: Sequence[str] | None = None,
    log: bool = False,
    title: str = "",
) -> Any:
    """Curves a -> metric(theta + a d) of one or several 1-D landscapes.

    The loss goes on the left axis (log scale with ``log=True``) and, when present,
    accuracy on a right axis (dashed); the centre a = 0 is marked.

    Args:
        landscapes: A 1-D landscape or ``{label: landscape}`` to compare.
        path: Save to this ``.png``/``.pdf``/``.svg`` file.
        metrics: Which to draw; default loss and accuracy where held.
        log: Log scale for the loss axis.
        title: Figure title.

    Returns:
        The matplotlib ``Figure``.
    """
    from matplotlib.figure import Figure

    runs = {"": landscapes} if isinstance(landscapes, Landscape) else dict(landscapes)
    if not runs:
        raise ValueError("nothing to plot: pass a landscape or a non-empty mapping")
    for label, ls in runs.items():
        if ls.ndim != 1:
            raise ValueError(f"plot_line needs 1-D landscapes; {label or 'this'} is {ls.ndim}-D")
    first = next(iter(runs.values()))
    wanted = (
        list(metrics)
        if metrics is not None
        else [m for m in ("loss", "accuracy") if m in first.values] or first.metrics[:1]
    )
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    right = ax.twinx() if len(wanted) > 1 else None
    colors = [f"C{i}" for i in range(10)]
    for i, (label, ls) in enumerate(runs.items()):
        for j, metric in enumerate(wanted):
            target = ax if j == 0 or right is None else right
            target.plot(
                ls.x,
                ls.values[metric] if metric in ls.values else np.full(ls.shape, np.nan),
                color=colors[i % 10],
                linestyle="-" if j == 0 else "--",
                label=literal(f"{label} {metric}".strip() if label or j else metric),
            )
    ax.set_xlabel("a (step along d)")
    ax.set_ylabel(_LABELS.get(wanted[0], literal(wanted[0])))
    if log:
        ax.set_yscale("log")
    if right is not None:
        right.set_ylabel(_LABELS.get(wanted[1], literal(wanted[1])) + " (dashed)")
    ax.axvline(0.0, color="0.5", linewidth=0.8, linestyle=":")
    handles, names = ax.get_legend_handles_labels()
    if right is not None:
        more = right.get_legend_handles_labels()
        handles, names = handles + more[0], names + more[1]
    if len(handles) > 1:
        ax.legend(handles, names, fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    ax.set_title(literal(title) if title else "1-D loss landscape")
    if path is not None:
        write_figure(fig, path)
    return fig


def plot_contour(
    landscape: Landscape,
    path: str | os.PathLike | None = None,
    *,
    metric: str = "loss",
    filled: bool = False,
    levels: int | Sequence[float] = 30,
    log: bool = False,
    trajectory: np.ndarray | None = None,
    title: str = "",
) -> Any:
    """Contour lines (or filled contours) of a 2-D landscape, centre marked with a star.

    Args:
        landscape: A 2-D landscape.
        path: Save to this ``.png``/``.pdf``/``.svg`` file.
        metric: Which values to draw.
        filled: Filled contours with a colour bar instead of labelled lines.
        levels: Number of levels or their values.
        log: Contour log10 of the values.
        trajectory: ``(T, 2)`` coordinates to overlay; default ``landscape.trajectory``
            (the path of a PCA plane), drawn from its start (circle) to the centre.
        title: Figure title.

    Returns:
        The matplotlib ``Figure``.
    """
    from matplotlib.figure import Figure

    if landscape.ndim != 2:
        raise ValueError(f"plot_contour needs a 2-D landscape, got {landscape.ndim}-D")
    z = np.ma.masked_invalid(_values(landscape, metric, log).T)
    fig = Figure(figsize=(5.6, 4.8))
    ax = fig.subplots()
    xx, yy = np.meshgrid(landscape.x, landscape.y)
    if filled:
        cs = ax.contourf(xx, yy, z, levels=levels, cmap="viridis")
        fig.colorbar(cs, ax=ax, label=_label(metric, log))
    else:
        cs = ax.contour(xx, yy, z, levels=levels, cmap="viridis", linewidths=0.9)
        ax.clabel(cs, inline=True, fontsize=7, fmt="%.3g")
    traj = landscape.trajectory if trajectory is None else np.asarray(trajectory, float)
    if traj is not None and len(traj):
        ax.plot(traj[:, 0], traj[:, 1], "-", color="#c53030", linewidth=1.2, label="trajectory")
        ax.plot(traj[:, 0], traj[:, 1], ".", color="#c53030", markersize=4)
        ax.plot(traj[0, 0], traj[0, 1], "o", color="#c53030", markersize=6, label="start")
    ax.plot(0.0, 0.0, "*", color="#d69e2e", markersize=13, markeredgecolor="k", label="θ")
    if landscape.cosine is not None:
        ax.text(
            0.01,
            0.01,
            f"cos(d1, d2) = {landscape.cosine:.3f}",
            transform=ax.transAxes,
            fontsize=7,
            color="0.2",
            bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1.5},
        )
    ax.set_xlabel("a (along d1)")
    ax.set_ylabel("b (along d2)")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(literal(title) if title else f"2-D {_label(metric, False)} landscape")
    if path is not None:
        write_figure(fig, path)
    return fig


def plot_surface(
    landscape: Landscape,
    path: str | os.PathLike | None = None,
    *,
    metric: str = "loss",
    log: bool = False,
    title: str = "",
) -> Any:
    """An interactive 3-D surface of a 2-D landscape with contours projected below it.

    Args:
        landscape: A 2-D landscape.
        path: Write a self-contained ``.html`` file (plotly.js embedded, works offline).
        metric: Which values to draw.
        log: Plot log10 of the values.
        title: Figure title.

    Returns:
        The ``plotly.graph_objects.Figure``.
    """
    import plotly.graph_objects as go

    if landscape.ndim != 2:
        raise ValueError(f"plot_surface needs a 2-D landscape, got {landscape.ndim}-D")
    z = _values(landscape, metric, log).T
    finite = z[np.isfinite(z)]
    contours = {"show": True, "usecolormap": True, "project_z": True}
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        contours.update(start=lo, end=hi, size=(hi - lo) / 20 if hi > lo else 1.0)
    fig = go.Figure(
        data=[
            go.Surface(
                x=landscape.x,
                y=landscape.y,
                z=z,
                colorscale="Viridis",
                contours={"z": contours},
                colorbar={"title": {"text": _label(metric, log)}},
                name=metric,
            )
        ]
    )
    cz = float(z[landscape.center_index[1], landscape.center_index[0]])
    fig.add_trace(
        go.Scatter3d(
            x=[0.0],
            y=[0.0],
            z=[cz],
            mode="markers",
            marker={"size": 5, "color": "red"},
            name="θ",
        )
    )
    fig.update_layout(
        title=title or f"{_LABELS.get(metric, metric)} surface",
        scene={
            "xaxis_title": "a (along d1)",
            "yaxis_title": "b (along d2)",
            "zaxis_title": _label(metric, log),
        },
        margin={"l": 0, "r": 0, "t": 40, "b": 0},
    )
    if path is not None:
        if not os.fspath(path).lower().endswith((".html", ".htm")):
            raise ValueError(f"surface path must end in .html, got {os.fspath(path)!r}")
        write_text(path, fig.to_html(include_plotlyjs=True, full_html=True))
    return fig
