"""Plots write real PNG/PDF files and a self-contained plotly HTML file."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch.nn.functional as F
from helpers import classification_data, tiny_mlp, uneven_batches

from flatlens import Objective
from flatlens.landscape import (
    line,
    pca_directions,
    plane,
    plot_contour,
    plot_line,
    plot_surface,
    random_direction,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def figure_data_in(html: str) -> list[dict]:
    """The trace list passed to ``Plotly.newPlot(id, traces, layout, config)`` in the page."""
    start = html.index("Plotly.newPlot(")
    rest = html[html.index(",", start) + 1 :].lstrip()
    traces, _ = json.JSONDecoder().raw_decode(rest)
    return traces


def decode(array: dict | list) -> np.ndarray:
    """A plotly JSON array: a plain list or ``{"dtype", "bdata", "shape"}`` (base64)."""
    if isinstance(array, list):
        return np.asarray(array, dtype=float)
    values = np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"])
    shape = array.get("shape")
    return values.reshape([int(n) for n in shape.split(",")]) if shape else values


@pytest.fixture(scope="module")
def landscapes():
    x, y = classification_data(23)
    obj = Objective(tiny_mlp(), F.cross_entropy, uneven_batches(x, y, [10, 13]))
    flats = [obj.theta + 0.2 * k * random_direction(obj, seed=k).vector for k in range(3, 0, -1)]
    pca = pca_directions([*flats, obj.theta], k=2)
    two = plane(
        obj, *pca.directions, span=pca.span(), num_points=(9, 7), trajectory=pca.coordinates
    )
    one = line(obj, random_direction(obj, seed=0), num_points=11)
    other = line(
        Objective(tiny_mlp(seed=3), F.cross_entropy, (x, y)),
        random_direction(obj, seed=0),
        num_points=11,
    )
    return one, other, two


def test_line_plot_png_and_pdf(tmp_path, landscapes):
    one, other, _ = landscapes
    fig = plot_line(one, tmp_path / "line.png", log=True)
    assert (tmp_path / "line.png").read_bytes().startswith(PNG_MAGIC)
    assert fig.axes[0].get_yscale() == "log" and len(fig.axes) == 2  # loss + accuracy axes
    plot_line({"a": one, "b": other}, tmp_path / "both.pdf", metrics=["loss"])
    assert (tmp_path / "both.pdf").read_bytes().startswith(b"%PDF")
    with pytest.raises(ValueError, match="1-D"):
        plot_line(landscapes[2])
    with pytest.raises(ValueError, match=r"\.png"):
        plot_line(one, tmp_path / "line.jpg")


@pytest.mark.parametrize("filled", [False, True])
def test_contour_png_with_centre_and_trajectory(tmp_path, landscapes, filled):
    _, _, two = landscapes
    fig = plot_contour(two, tmp_path / "c.png", filled=filled, log=filled)
    assert (tmp_path / "c.png").read_bytes().startswith(PNG_MAGIC)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "θ" in labels and "trajectory" in labels
    plot_contour(two, tmp_path / "acc.pdf", metric="accuracy", levels=5)
    with pytest.raises(ValueError, match="no metric"):
        plot_contour(two, metric="top5")
    with pytest.raises(ValueError, match="2-D"):
        plot_contour(landscapes[0])


def test_surface_html_is_self_contained_and_holds_the_figure(tmp_path, landscapes):
    _, _, two = landscapes
    fig = plot_surface(two, tmp_path / "s.html")
    html = (tmp_path / "s.html").read_text()
    assert '<script src="http' not in html  # plotly.js is embedded, not fetched
    assert "plotly.js v" in html or "Plotly" in html
    assert len(html) > 1_000_000  # the embedded library
    surface = fig.data[0]
    assert surface.type == "surface" and surface.contours.z.show
    np.testing.assert_array_equal(surface.x, two.x)
    np.testing.assert_array_equal(surface.z, two.values["loss"].T)
    # The HTML file holds this figure: decode the traces passed to Plotly.newPlot.
    traces = figure_data_in(html)
    assert [t["type"] for t in traces] == ["surface", "scatter3d"]
    np.testing.assert_array_equal(decode(traces[0]["z"]), two.values["loss"].T)
    np.testing.assert_array_equal(decode(traces[0]["x"]), two.x)
    with pytest.raises(ValueError, match="html"):
        plot_surface(two, tmp_path / "s.png")
