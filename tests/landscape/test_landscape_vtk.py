"""Landscape.to_vtk: a VTK XML PolyData file that VTK's own reader (ParaView's) opens and
that holds the grid's values, checked also against the format with the standard library."""

from __future__ import annotations

import math
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import torch.nn.functional as F
from helpers import classification_data, tiny_mlp, uneven_batches

from flatlens import Objective
from flatlens.landscape import Landscape, line, plane, random_direction

VTK_TYPES = {"Float32", "Float64", "Int8", "UInt8", "Int32", "UInt32", "Int64", "UInt64"}
CELL_KINDS = ("Verts", "Lines", "Strips", "Polys")


@pytest.fixture(scope="module")
def landscapes():
    x, y = classification_data(23)
    obj = Objective(tiny_mlp(), F.cross_entropy, uneven_batches(x, y, [12, 11]))
    d1, d2 = random_direction(obj, seed=0), random_direction(obj, seed=1)
    return {
        "plane": plane(obj, d1, d2, span=((-1, 1), (-0.5, 1.0)), num_points=(5, 4), metrics=None),
        "line": line(obj, d1, num_points=6, metrics=None),
    }


# ------------------------------------------------------------------ a strict format check
def _numbers(array: ElementTree.Element) -> np.ndarray:
    kind = array.get("type")
    text = (array.text or "").split()
    if kind.startswith(("Int", "UInt")):
        return np.array([int(t) for t in text], dtype=np.int64)
    return np.array([float(t) for t in text], dtype=np.float64)


def read_vtp_strictly(path: Path) -> dict:
    """Parse a .vtp file, asserting the VTK XML PolyData rules a reader relies on."""
    root = ElementTree.parse(path).getroot()
    assert root.tag == "VTKFile"
    assert root.get("type") == "PolyData" and root.get("version") == "1.0"
    assert root.get("byte_order") in ("LittleEndian", "BigEndian")
    assert root.get("header_type") in ("UInt32", "UInt64")
    (poly,) = list(root)
    assert poly.tag == "PolyData"
    (piece,) = list(poly)
    assert piece.tag == "Piece"
    counts = {k: int(piece.get(f"NumberOf{k}")) for k in ("Points", *CELL_KINDS)}
    children = [c.tag for c in piece]
    assert children == ["PointData", "CellData", "Points", *CELL_KINDS]
    out: dict = {"counts": counts, "point": {}, "cell": {}}
    for array in piece.iter("DataArray"):
        assert array.get("type") in VTK_TYPES and array.get("format") == "ascii"
        assert int(array.get("NumberOfComponents", "1")) >= 1 and array.get("Name")
        values = _numbers(array)
        if values.size and array.get("RangeMin") is not None:
            assert float(array.get("RangeMin")) == values.min()
            assert float(array.get("RangeMax")) == values.max()
    for section, key, size in (("PointData", "point", counts["Points"]),):
        for array in piece.find(section):
            out[key][array.get("Name")] = values = _numbers(array)
            assert values.shape == (size,), array.get("Name")
    n_cells = sum(counts[k] for k in CELL_KINDS)
    for array in piece.find("CellData"):
        out["cell"][array.get("Name")] = values = _numbers(array)
        assert values.shape == (n_cells,)
    (points,) = list(piece.find("Points"))
    assert points.get("NumberOfComponents") == "3"
    out["points"] = _numbers(points).reshape(counts["Points"], 3)
    for kind in CELL_KINDS:
        arrays = {a.get("Name"): _numbers(a) for a in piece.find(kind)}
        assert set(arrays) == {"connectivity", "offsets"}
        conn, offsets = arrays["connectivity"], arrays["offsets"]
        assert len(offsets) == counts[kind]
        assert np.all(np.diff(np.concatenate([[0], offsets])) > 0)
        assert (offsets[-1] if len(offsets) else 0) == len(conn)
        assert np.all((conn >= 0) & (conn < counts["Points"]))
        out[kind] = np.split(conn, offsets[:-1]) if len(offsets) else []
    return out


def _point_order(values: np.ndarray) -> np.ndarray:
    """Grid values in the file's point order: p = j * n_a + i."""
    return values.T.reshape(-1) if values.ndim == 2 else values


# ------------------------------------------------------------------ VTK's reader
def read_with_vtk(path: Path) -> dict:
    vtk = pytest.importorskip("vtk")
    from vtkmodules.util.numpy_support import vtk_to_numpy

    errors = []
    reader = vtk.vtkXMLPolyDataReader()
    reader.AddObserver("ErrorEvent", lambda obj, event: errors.append(event))
    reader.GetExecutive().AddObserver("ErrorEvent", lambda obj, event: errors.append(event))
    reader.SetFileName(str(path))
    assert reader.CanReadFile(str(path))
    reader.Update()
    assert not errors and reader.GetErrorCode() == 0
    mesh = reader.GetOutput()
    data = mesh.GetPointData()
    fields = {
        data.GetArrayName(k): vtk_to_numpy(data.GetArray(k))
        for k in range(data.GetNumberOfArrays())
    }
    polys = vtk_to_numpy(mesh.GetPolys().GetConnectivityArray())
    lines = vtk_to_numpy(mesh.GetLines().GetConnectivityArray())
    return {
        "points": vtk_to_numpy(mesh.GetPoints().GetData()),
        "fields": fields,
        "num_polys": mesh.GetNumberOfPolys(),
        "num_lines": mesh.GetNumberOfLines(),
        "polys": polys,
        "lines": lines,
        "scalars": data.GetScalars().GetName(),
    }


@pytest.mark.parametrize("log", [False, True])
def test_a_plane_is_a_quad_surface_holding_the_grid_values(landscapes, tmp_path, log):
    ls: Landscape = landscapes["plane"]
    path = ls.to_vtk(tmp_path / "plane", log=log)
    assert path == tmp_path / "plane.vtp" and sorted(tmp_path.iterdir()) == [path]
    na, nb = ls.shape
    loss = ls.values["loss"]
    height = np.log(loss + 0.1) if log else loss
    parsed = read_vtp_strictly(path)
    assert parsed["counts"] == {
        "Points": na * nb, "Verts": 0, "Lines": 0, "Strips": 0, "Polys": (na - 1) * (nb - 1)
    }  # fmt: skip
    a, b = np.meshgrid(ls.x, ls.y, indexing="xy")
    expected = np.stack([a.reshape(-1), b.reshape(-1), _point_order(height)], axis=1)
    assert np.array_equal(parsed["points"], expected)  # exact: shortest round-trip reprs
    for name in ("loss", "accuracy"):
        assert np.array_equal(parsed["point"][name], _point_order(ls.values[name]))
    assert np.array_equal(parsed["point"]["zvalue"], _point_order(height))
    assert np.array_equal(parsed["point"]["finite"], np.ones(na * nb))
    # Cell (i, j) joins grid points (i, j), (i+1, j), (i+1, j+1), (i, j+1).
    quads = np.array(parsed["Polys"])
    assert quads.shape == ((na - 1) * (nb - 1), 4)
    assert list(quads[0]) == [0, 1, na + 1, na] and list(quads[-1]) == [
        (nb - 2) * na + na - 2, (nb - 2) * na + na - 1, na * nb - 1, na * nb - 2
    ]  # fmt: skip
    corner_mean = (height[:-1, :-1] + height[1:, :-1] + height[1:, 1:] + height[:-1, 1:]) / 4
    np.testing.assert_allclose(parsed["cell"]["averaged zvalue"], _point_order(corner_mean))

    vtk = read_with_vtk(path)
    assert vtk["num_polys"] == (na - 1) * (nb - 1) and vtk["num_lines"] == 0
    assert np.array_equal(vtk["points"], expected)
    assert np.array_equal(vtk["polys"], quads.reshape(-1))
    assert vtk["scalars"] == "zvalue"
    assert np.array_equal(vtk["fields"]["loss"], _point_order(loss))
    assert np.array_equal(vtk["fields"]["zvalue"], _point_order(height))


def test_a_line_is_one_polyline(landscapes, tmp_path):
    ls: Landscape = landscapes["line"]
    path = ls.to_vtk(tmp_path / "line.vtp", metric="accuracy")
    parsed = read_vtp_strictly(path)
    n = ls.shape[0]
    assert parsed["counts"]["Lines"] == 1 and parsed["counts"]["Polys"] == 0
    assert [list(c) for c in parsed["Lines"]] == [list(range(n))]
    expected = np.stack([ls.x, np.zeros(n), ls.values["accuracy"]], axis=1)
    assert np.array_equal(parsed["points"], expected)
    assert np.array_equal(parsed["point"]["loss"], ls.values["loss"])
    vtk = read_with_vtk(path)
    assert vtk["num_lines"] == 1 and np.array_equal(vtk["lines"], np.arange(n))
    assert np.array_equal(vtk["points"], expected)


def test_non_finite_points_get_the_extreme_height_and_are_flagged(landscapes, tmp_path):
    ls: Landscape = landscapes["plane"]
    values = {k: v.copy() for k, v in ls.values.items()}
    loss = values["loss"]
    loss[0, 0], loss[1, 2], loss[-1, -1] = math.inf, math.nan, 1e4
    broken = Landscape(coords=ls.coords, values=values, center_index=ls.center_index)
    path = broken.to_vtk(tmp_path / "broken.vtp", zmax=50.0)
    parsed = read_vtp_strictly(path)
    finite = np.isfinite(loss)
    capped = np.minimum(loss, 50.0)
    top = capped[finite].max()
    assert top == 50.0  # the 1e4 point is capped by zmax, the inf and NaN points follow it
    assert np.array_equal(parsed["point"]["finite"], _point_order(finite.astype(float)))
    assert np.array_equal(parsed["point"]["zvalue"], _point_order(np.where(finite, capped, top)))
    assert np.array_equal(parsed["point"]["loss"], _point_order(np.where(finite, loss, 1e4)))
    vtk = read_with_vtk(path)
    assert np.all(np.isfinite(vtk["points"]))


def test_bad_requests_say_what_to_do(landscapes, tmp_path):
    ls: Landscape = landscapes["plane"]
    with pytest.raises(ValueError, match="not in this landscape"):
        ls.to_vtk(tmp_path / "x.vtp", metric="top5")
    negative = Landscape(
        coords=ls.coords, values={"loss": ls.values["loss"] - 10}, center_index=ls.center_index
    )
    with pytest.raises(ValueError, match="without log"):
        negative.to_vtk(tmp_path / "x.vtp", log=True)
    empty = Landscape(
        coords=ls.coords, values={"loss": np.full(ls.shape, np.nan)}, center_index=ls.center_index
    )
    with pytest.raises(ValueError, match="no grid point"):
        empty.to_vtk(tmp_path / "x.vtp")
    with pytest.raises(ValueError, match="zmax"):
        ls.to_vtk(tmp_path / "x.vtp", zmax=math.inf)
    assert not any(tmp_path.iterdir())  # nothing half-written
