"""A landscape as a VTK XML PolyData surface (``.vtp``) for ParaView, VisIt or VTK.

The layout is the one loss-landscape's ``h52vtp.py`` writes (Li et al., 2018, whose
published surfaces were rendered in ParaView from such files): a ``VTKFile`` of type
``PolyData``, version 1.0, ASCII data arrays. For a plane with axes a (n_a points) and b
(n_b points), point p = j * n_a + i sits at (a_i, b_j, z_ij) with height z_ij the chosen
metric at that grid point (``values[metric][i, j]``), optionally log(z + 0.1); the
(n_a - 1)(n_b - 1) cells are the quadrilaterals (p, p + 1, p + n_a + 1, p + n_a), each with
the mean height of its corners as cell data (``averaged zvalue``). Every metric of the
landscape is a point field of its own, so the surface can be coloured by accuracy as well.
A line becomes one polyline through (a_i, 0, z_i).

Numbers are written with Python's shortest round-trip repr, so a reader recovers every
float64 value exactly. ASCII has no NaN or infinity: points whose height is not finite (not
evaluated yet, or overflowed far from the centre) get the largest finite height (the
smallest, for -inf) and are marked 0 in the ``finite`` point field; the metric fields hold
the same substitute there.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING
from xml.sax.saxutils import quoteattr

import numpy as np

from flatlens.core._io import write_text

if TYPE_CHECKING:
    from flatlens.landscape._storage import Landscape

__all__ = ["LOG_OFFSET", "heights", "to_vtk"]

LOG_OFFSET = 0.1
"""``log=True`` plots log(z + LOG_OFFSET), as ``h52vtp.py`` does (finite at z = 0)."""
PER_LINE = 6


def heights(
    landscape: Landscape, metric: str = "loss", *, log: bool = False, zmax: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The surface heights of ``metric`` and a mask of the grid points where it is finite.

    z = min(value, zmax) (when ``zmax`` is given), then log(z + 0.1) with ``log``; heights
    that are not finite are replaced by the largest finite height (the smallest for -inf).

    Raises:
        ValueError: an unknown metric, no finite value at all, or ``log`` with a value at or
            below -0.1.
    """
    if metric not in landscape.values:
        raise ValueError(f"metric {metric!r} is not in this landscape: {landscape.metrics}")
    z = np.array(landscape.values[metric], dtype=np.float64)
    finite = np.isfinite(z)
    if zmax is not None:
        if not math.isfinite(zmax):
            raise ValueError(f"zmax must be a finite number, got {zmax!r}")
        z = np.minimum(z, zmax)  # NaN stays NaN
    if not finite.any():
        raise ValueError(f"no grid point has a finite {metric}; evaluate the landscape first")
    if log:
        low = float(z[finite].min())
        if low <= -LOG_OFFSET:
            raise ValueError(
                f"log=True plots log({metric} + {LOG_OFFSET}), but {metric} reaches {low:.4g}; "
                "plot it without log"
            )
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.log(z + LOG_OFFSET)
    return _fill(z, finite), finite


def _fill(z: np.ndarray, finite: np.ndarray) -> np.ndarray:
    """``z`` with NaN and +inf set to its largest finite value and -inf to its smallest."""
    if finite.all():
        return z
    out = z.copy()
    good = z[finite]
    out[~finite] = good.max()
    out[np.isneginf(z)] = good.min()
    return out


def _numbers(values: np.ndarray, per_line: int = PER_LINE, indent: str = "          ") -> str:
    flat = [repr(float(v)) if isinstance(v, float | np.floating) else str(v) for v in values]
    rows = [" ".join(flat[k : k + per_line]) for k in range(0, len(flat), per_line)]
    return "".join(f"{indent}{row}\n" for row in rows)


def _array(name: str, vtk_type: str, values: np.ndarray, components: int = 1) -> str:
    values = np.asarray(values).reshape(-1)
    attrs = f'type="{vtk_type}" Name={quoteattr(name)} NumberOfComponents="{components}"'
    attrs += ' format="ascii"'
    if components == 1 and values.size:
        lo, hi = values.min(), values.max()
        attrs += f' RangeMin="{_scalar(lo)}" RangeMax="{_scalar(hi)}"'
    body = _numbers(values, per_line=PER_LINE if components == 1 else 3 * 2)
    return f"        <DataArray {attrs}>\n{body}        </DataArray>\n"


def _scalar(value: float | int | np.generic) -> str:
    return repr(float(value)) if isinstance(value, float | np.floating) else str(int(value))


def _cells(tag: str, connectivity: np.ndarray, offsets: np.ndarray) -> str:
    return (
        f"      <{tag}>\n"
        + _array("connectivity", "Int64", connectivity)
        + _array("offsets", "Int64", offsets)
        + f"      </{tag}>\n"
    )


def to_vtk(
    landscape: Landscape,
    path: str | os.PathLike,
    *,
    metric: str = "loss",
    log: bool = False,
    zmax: float | None = None,
) -> Path:
    """Write ``landscape`` as a ``.vtp`` PolyData surface (a polyline for a line); see the
    module docstring for the layout.

    Args:
        landscape: A line or a plane.
        path: The file to write (atomically); ``.vtp`` is appended when it has no suffix.
        metric: The metric that gives the heights.
        log: Heights log(z + 0.1) instead of z.
        zmax: Cap the metric at this value before the log (as ``h52vtp.py``'s ``--zmax``).

    Returns:
        The path written.
    """
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".vtp")
    z, finite = heights(landscape, metric, log=log, zmax=zmax)

    def order(arr: np.ndarray) -> np.ndarray:
        """Grid values in point order: p = j * n_a + i for a plane."""
        arr = np.asarray(arr)
        return arr.T.reshape(-1) if arr.ndim == 2 else arr

    zflat = order(z)
    if landscape.ndim == 2:
        nx, ny = landscape.shape
        a, b = np.meshgrid(landscape.coords[0], landscape.coords[1], indexing="xy")
        xyz = np.stack([a.reshape(-1), b.reshape(-1), zflat], axis=1)
        i, j = np.meshgrid(np.arange(nx - 1), np.arange(ny - 1), indexing="xy")
        p = (j * nx + i).reshape(-1)
        quads = np.stack([p, p + 1, p + nx + 1, p + nx], axis=1)
        polys = _cells("Polys", quads.reshape(-1), 4 * np.arange(1, len(quads) + 1))
        lines = _cells("Lines", np.zeros(0, np.int64), np.zeros(0, np.int64))
        cell_data = _array("averaged zvalue", "Float64", zflat[quads].mean(axis=1))
        num_lines, num_polys = 0, len(quads)
    else:
        n = len(zflat)
        xyz = np.stack([landscape.coords[0], np.zeros(n), zflat], axis=1)
        lines = _cells("Lines", np.arange(n), np.array([n]))
        polys = _cells("Polys", np.zeros(0, np.int64), np.zeros(0, np.int64))
        cell_data, num_lines, num_polys = "", 1, 0
    point_data = _array("zvalue", "Float64", zflat)
    for name in landscape.metrics:
        values = np.asarray(landscape.values[name], dtype=np.float64)
        ok = np.isfinite(values)
        if ok.any():
            point_data += _array(name, "Float64", order(_fill(values, ok)))
    point_data += _array("finite", "UInt8", order(finite.astype(np.uint8)))
    empty = _cells("Verts", np.zeros(0, np.int64), np.zeros(0, np.int64))
    strips = _cells("Strips", np.zeros(0, np.int64), np.zeros(0, np.int64))
    text = (
        '<?xml version="1.0"?>\n'
        '<VTKFile type="PolyData" version="1.0" byte_order="LittleEndian" '
        'header_type="UInt64">\n'
        "  <PolyData>\n"
        f'    <Piece NumberOfPoints="{len(xyz)}" NumberOfVerts="0" '
        f'NumberOfLines="{num_lines}" NumberOfStrips="0" NumberOfPolys="{num_polys}">\n'
        '      <PointData Scalars="zvalue">\n'
        f"{point_data}"
        "      </PointData>\n"
        + (
            f'      <CellData Scalars="averaged zvalue">\n{cell_data}      </CellData>\n'
            if cell_data
            else "      <CellData>\n      </CellData>\n"
        )
        + "      <Points>\n"
        + _array("Points", "Float64", xyz, components=3)
        + "      </Points>\n"
        + empty
        + lines
        + strips
        + polys
        + "    </Piece>\n"
        "  </PolyData>\n"
        "</VTKFile>\n"
    )
    write_text(path, text)
    return path
