"""Saving and loading landscapes: npz + JSON sidecar, exact round trip, atomic files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch.nn.functional as F
from helpers import classification_data, tiny_mlp, uneven_batches

from flatlens import Objective
from flatlens.landscape import Landscape, line, load, pca_directions, plane, random_direction
from flatlens.landscape._storage import read, store_paths


def objective():
    x, y = classification_data(23)
    return Objective(tiny_mlp(), F.cross_entropy, uneven_batches(x, y, [10, 13]))


def test_plane_round_trip_with_trajectory_is_exact(tmp_path):
    obj = objective()
    flats = [obj.theta + 0.1 * k * random_direction(obj, seed=k).vector for k in range(4)]
    flats.append(obj.theta)
    pca = pca_directions(flats, k=2)
    ls = plane(obj, *pca.directions, span=pca.span(), num_points=(5, 4), trajectory=pca.coordinates)
    path = ls.save(tmp_path / "sub" / "pca")
    assert path == tmp_path / "sub" / "pca.npz"
    back = load(tmp_path / "sub" / "pca.npz")
    assert back.equals(ls, timing=True)
    for m in ls.metrics:
        assert back.values[m].dtype == np.float64
        np.testing.assert_array_equal(back.values[m], ls.values[m])
    np.testing.assert_array_equal(back.trajectory, pca.coordinates)
    assert back.center == ls.center and back.cosine == ls.cosine
    assert back.directions == ls.directions and back.settings == json.loads(
        json.dumps(ls.to_dict()["settings"])
    )
    # The sidecar is strict JSON with the metadata.
    meta = json.loads((tmp_path / "sub" / "pca.json").read_text())
    assert meta["format"] == "flatlens.landscape/1"
    assert meta["metrics"] == ["loss", "accuracy"] and meta["shape"] == list(ls.shape)
    assert meta["fingerprint"] == ls.fingerprint and meta["num_done"] == ls.values["loss"].size
    assert [p.name for p in (tmp_path / "sub").iterdir()] in (
        ["pca.npz", "pca.json"],
        ["pca.json", "pca.npz"],
    )


def test_line_round_trip_and_nan_values(tmp_path):
    obj = objective()
    ls = line(obj, random_direction(obj, seed=1), num_points=7)
    ls.values["loss"][0] = np.nan  # e.g. a diverged point
    ls.save(tmp_path / "l.npz")
    back, done = read(tmp_path / "l")
    assert done.all() and back.equals(ls)
    assert np.isnan(back.values["loss"][0])
    assert back.ndim == 1 and back.shape == (7,)
    with pytest.raises(ValueError, match="second axis"):
        _ = back.y
    changed = load(tmp_path / "l")
    changed.values["accuracy"][3] += 0.5
    assert not changed.equals(ls)


def test_store_paths_and_bad_files(tmp_path):
    assert store_paths("a/b") == store_paths("a/b.npz") == store_paths("a/b.json")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing")
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="not a readable flatlens landscape"):
        load(tmp_path / "other")


def test_to_dict_is_json_ready():
    obj = objective()
    ls = line(obj, random_direction(obj, seed=1), num_points=5)
    d = ls.to_dict()
    assert d["kind"] == "Landscape"
    text = json.dumps(d, allow_nan=False)
    assert isinstance(json.loads(text)["values"]["loss"], list)
    assert isinstance(ls, Landscape) and ls.x is ls.coords[0]
