"""Resumable stores: an interrupted run continues where it stopped and ends identical."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ModelSnapshot, bn_cnn, classification_data, image_data, tiny_mlp, uneven_batches

from flatlens import Objective
from flatlens.landscape import line, load, plane, random_direction
from flatlens.landscape._storage import read

METHODS = ["serial", "vmap"]


class Stop(Exception):
    """Stands in for a kill."""


def counting(loss_fn, limit=None, exc=Stop):
    """Wrap a loss to count calls (per point and batch) and raise after ``limit`` calls."""
    state = {"n": 0}

    def fn(out, y):
        state["n"] += 1
        if limit is not None and state["n"] > limit:
            raise exc("killed")
        return loss_fn(out, y)

    return fn, state


def cnn_objective(loss_fn=F.cross_entropy):
    x, y = image_data(13)
    return Objective(bn_cnn(), loss_fn, uneven_batches(x, y, [6, 7]))


def mlp_objective(loss_fn=F.cross_entropy, seed=0, model_seed=0):
    x, y = classification_data(23, seed=seed)
    return Objective(tiny_mlp(seed=model_seed), loss_fn, uneven_batches(x, y, [10, 13]))


def no_temp_files(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("method", METHODS)
def test_resume_after_a_callback_interrupt_gives_identical_arrays(tmp_path, method):
    obj = cnn_objective()
    d1, d2 = random_direction(obj, seed=0), random_direction(obj, seed=1)
    kwargs = dict(span=(-1, 1), num_points=(7, 5), method=method, chunk_size=5)
    full = plane(obj, d1, d2, **kwargs)

    store = tmp_path / "plane"
    seen = []

    def stop_after_three(done, total):
        seen.append(done)
        if len(seen) == 3:
            raise Stop

    with pytest.raises(Stop):
        plane(obj, d1, d2, store=store, save_interval_s=0.0, callback=stop_after_three, **kwargs)
    partial, done = read(store)
    assert done.sum() == 1 + 3 * 5  # the centre and three chunks
    assert np.isnan(partial.values["loss"][~done]).all()
    assert no_temp_files(tmp_path)

    loss_fn, calls = counting(F.cross_entropy)
    obj2 = cnn_objective(loss_fn)
    resumed = plane(obj2, d1, d2, store=store, **kwargs)
    missing = full.values["loss"].size - 16
    assert resumed.num_evaluated == missing
    # Two batches per missing point (serial) or per missing chunk (one vmapped call each),
    # plus three passes at the centre: the Objective's determinism check (two) and the
    # evaluation that must match the store's centre.
    calls_left = missing if method == "serial" else -(-(full.values["loss"].size - 1) // 5) - 3
    assert calls["n"] == 2 * calls_left + 2 * 3
    for m in full.metrics:
        np.testing.assert_array_equal(resumed.values[m], full.values[m])
    assert resumed.center == full.center
    assert load(store).equals(resumed)
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize("method", METHODS)
def test_resume_after_a_keyboard_interrupt_inside_the_loss(tmp_path, method):
    ref_obj = mlp_objective()
    d = random_direction(ref_obj, seed=3)
    full = line(ref_obj, d, num_points=21, method=method, chunk_size=4)
    model = tiny_mlp(seed=0)
    snap = ModelSnapshot.take(model)
    # Interrupt in the third chunk (after the centre's three passes over two batches).
    per_chunk = 2 * 4 if method == "serial" else 2
    loss_fn, _ = counting(F.cross_entropy, limit=6 + 2 * per_chunk + 1, exc=KeyboardInterrupt)
    x, y = classification_data(23, seed=0)
    obj = Objective(model, loss_fn, uneven_batches(x, y, [10, 13]))
    store = tmp_path / "line.npz"
    with pytest.raises(KeyboardInterrupt):
        # The default save interval (1 s) never fires here: the save on the way out must.
        line(obj, d, num_points=21, method=method, chunk_size=4, store=store)
    snap.assert_unchanged(model)
    _, done = read(store)
    assert done.sum() == 1 + 2 * 4
    resumed = line(mlp_objective(), d, num_points=21, method=method, chunk_size=4, store=store)
    np.testing.assert_array_equal(resumed.values["loss"], full.values["loss"])
    np.testing.assert_array_equal(resumed.values["accuracy"], full.values["accuracy"])


def test_a_finished_store_is_returned_without_evaluating(tmp_path):
    obj = mlp_objective()
    d = random_direction(obj, seed=0)
    first = line(obj, d, num_points=9, store=tmp_path / "s")
    loss_fn, calls = counting(F.cross_entropy)
    again = line(mlp_objective(loss_fn), d, num_points=9, store=tmp_path / "s")
    assert again.num_evaluated == 0
    assert calls["n"] == 2 * 3  # only the centre: determinism check and the value check
    assert again.equals(first)


def test_refuses_to_resume_with_different_arguments(tmp_path):
    obj = mlp_objective()
    d = random_direction(obj, seed=0)
    store = tmp_path / "s.npz"
    line(obj, d, num_points=9, store=store, method="serial", chunk_size=3)
    cases = {
        "grid": lambda: line(obj, d, num_points=11, store=store),
        "directions": lambda: line(obj, random_direction(obj, seed=1), num_points=9, store=store),
        "theta": lambda: line(mlp_objective(model_seed=5), d, num_points=9, store=store),
        "centre": lambda: line(mlp_objective(seed=9), d, num_points=9, store=store),
        "metrics": lambda: line(obj, d, num_points=9, store=store, metrics=["loss"]),
        "values at the centre": lambda: line(
            Objective(obj.model, torch.nn.MultiMarginLoss(), [(x, y) for x, y, _ in obj.batches()]),
            d,
            num_points=9,
            store=store,
        ),
    }
    for what, call in cases.items():
        with pytest.raises(ValueError, match=what):
            call()
    with pytest.raises(ValueError, match="method='serial'"):
        line(obj, d, num_points=9, store=store, method="vmap")
    with pytest.raises(ValueError, match="chunk_size=3"):
        line(obj, d, num_points=9, store=store, chunk_size=4)
    # The defaults resume with the stored execution settings.
    assert line(obj, d, num_points=9, store=store).settings["chunk_size"] == 3


def test_store_is_not_a_landscape(tmp_path):
    bad = tmp_path / "x.npz"
    np.savez(bad, a=np.zeros(3))
    obj = mlp_objective()
    with pytest.raises(ValueError, match="not a readable flatlens landscape"):
        line(obj, random_direction(obj), num_points=3, store=bad)


def margin(outputs, targets):
    """Mean over the batch of the target logit minus the mean logit (a custom metric)."""
    return (outputs.gather(1, targets[:, None]).squeeze(1) - outputs.mean(-1)).mean()


def test_resume_with_a_custom_metric(tmp_path):
    obj = mlp_objective()
    d = random_direction(obj, seed=1)
    kwargs = dict(num_points=13, chunk_size=3, metrics=[margin])
    full = line(obj, d, **kwargs)

    def stop_after_two(done, total):
        if done >= 7:
            raise Stop

    store = tmp_path / "margin"
    with pytest.raises(Stop):
        line(obj, d, store=store, save_interval_s=0.0, callback=stop_after_two, **kwargs)
    resumed = line(mlp_objective(), d, store=store, **kwargs)
    assert 0 < resumed.num_evaluated < 12
    assert resumed.metrics == ["loss", "margin"]
    for m in full.metrics:
        np.testing.assert_array_equal(resumed.values[m], full.values[m])

    def other(outputs, targets):  # another function under the same name: another landscape
        return outputs.mean()

    other.__name__ = "margin"
    with pytest.raises(ValueError, match="centre"):
        line(mlp_objective(), d, store=store, num_points=13, chunk_size=3, metrics=[other])
