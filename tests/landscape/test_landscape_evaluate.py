"""line/plane against brute-force loops that set the weights and evaluate the loss."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    ModelSnapshot,
    bn_cnn,
    classification_data,
    image_data,
    tiny_mlp,
    uneven_batches,
)
from torch import nn

from flatlens import Objective
from flatlens.core import NonFiniteLossError
from flatlens.landscape import _evaluate as runner
from flatlens.landscape import (
    grid_axis,
    interpolation_direction,
    line,
    plane,
    random_direction,
)

METHODS = ["serial", "vmap"]


def mlp_setup(seed=0, dtype=torch.float64, n=23, sizes=(10, 8, 5)):
    x, y = classification_data(n, dtype=dtype, seed=seed)
    model = tiny_mlp(seed=seed, dtype=dtype)
    return model, x, y, uneven_batches(x, y, list(sizes))


def cnn_setup(dtype=torch.float64):
    x, y = image_data(13, dtype=dtype)
    model = bn_cnn(dtype=dtype)
    return model, x, y, uneven_batches(x, y, [6, 7])


def brute_force(model, x, y, points, loss=F.cross_entropy):
    """Loss and accuracy at each flat point: copy the model, write the weights, call it."""
    out = []
    for flat in points:
        ref = copy.deepcopy(model).eval()
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat, ref.parameters())
            logits = ref(x)
            hits = (logits.argmax(-1) == y).double().mean() if not y.is_floating_point() else 0
            out.append((float(loss(logits, y)), float(hits)))
    return np.array(out)


def flat(model):
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


def test_grid_axis_holds_zero_exactly():
    for span, steps in [((-1, 1), 51), ((-1, 1), 41), ((-0.3, 0.7), 11), ((-1, 2), 7)]:
        axis = grid_axis(span, steps)
        assert np.count_nonzero(axis == 0.0) == 1
        assert axis[0] == span[0] and axis[-1] == span[1]
        assert np.all(np.diff(axis) > 0)
    assert len(grid_axis((-1, 1), 51)) == 51
    assert len(grid_axis((-1, 1), 10)) == 11  # 0 inserted
    assert len(grid_axis((0, 1), 5)) == 5
    for bad in [((0.1, 1), 5), ((1, -1), 5), ((-1, 1), 1), ((-1, math.inf), 5), (("a", 1), 3)]:
        with pytest.raises(ValueError):
            grid_axis(*bad)


@pytest.mark.parametrize("method", METHODS)
def test_line_along_interpolation_equals_brute_force(method):
    model, x, y, batches = mlp_setup()
    other = tiny_mlp(seed=7)
    snap = ModelSnapshot.take(model)
    obj = Objective(model, F.cross_entropy, batches)
    d = interpolation_direction(obj, other)
    ls = line(obj, d, span=(-0.5, 1.5), num_points=9, method=method, chunk_size=3)
    snap.assert_unchanged(model)
    start, end = flat(model), flat(other)
    ref = brute_force(model, x, y, [start + a * (end - start) for a in ls.x])
    np.testing.assert_allclose(ls.values["loss"], ref[:, 0], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(ls.values["accuracy"], ref[:, 1])
    # a = 1 is the other model itself.
    one = int(np.flatnonzero(np.isclose(ls.x, 1.0))[0])
    other_loss = float(F.cross_entropy(other(x), y).detach())
    assert math.isclose(ls.values["loss"][one], other_loss, rel_tol=1e-10)
    assert ls.settings["method"] == method and ls.num_evaluated == 9


@pytest.mark.parametrize("method", METHODS)
def test_center_equals_objective_loss_exactly(method):
    for model, _, _, batches in (mlp_setup(dtype=torch.float32), cnn_setup()):
        obj = Objective(model, F.cross_entropy, batches)
        d1, d2 = random_direction(obj, seed=0), random_direction(obj, seed=1)
        ls = plane(obj, d1, d2, span=(-0.4, 1.0), num_points=(6, 5), method=method)
        i, j = ls.center_index
        assert ls.x[i] == 0.0 and ls.y[j] == 0.0
        assert ls.values["loss"][i, j] == obj.loss()
        assert ls.center["loss"] == obj.loss()
        assert ls.values["accuracy"][i, j] == obj.evaluate()["accuracy"]


@pytest.mark.parametrize("setup", [mlp_setup, cnn_setup])
def test_plane_equals_brute_force_and_vmap_agrees_with_serial(setup):
    model, x, y, batches = setup()
    model.train()  # the landscape must use eval mode (running statistics) all the same
    snap = ModelSnapshot.take(model)
    obj = Objective(model, F.cross_entropy, batches)
    d1, d2 = random_direction(obj, seed=0), random_direction(obj, seed=1)
    out = {
        m: plane(obj, d1, d2, span=(-1, 1), num_points=(5, 7), method=m, chunk_size=4)
        for m in METHODS
    }
    snap.assert_unchanged(model)
    theta = obj.theta
    pts = [theta + a * d1.vector + b * d2.vector for a in out["serial"].x for b in out["serial"].y]
    ref = brute_force(model, x, y, pts).reshape(5, 7, 2)
    for m, ls in out.items():
        np.testing.assert_allclose(
            ls.values["loss"], ref[..., 0], rtol=1e-10, atol=1e-12, err_msg=m
        )
        np.testing.assert_array_equal(ls.values["accuracy"], ref[..., 1])
    np.testing.assert_allclose(
        out["vmap"].values["loss"], out["serial"].values["loss"], rtol=1e-13, atol=1e-14
    )
    assert out["serial"].cosine == pytest.approx(
        float(d1.vector @ d2.vector / (d1.vector.norm() * d2.vector.norm())), rel=1e-12
    )


def test_float32_vmap_and_serial_agree():
    model, _, _, batches = cnn_setup(dtype=torch.float32)
    obj = Objective(model, F.cross_entropy, batches)
    d1, d2 = random_direction(obj, seed=0), random_direction(obj, seed=1)
    a = plane(obj, d1, d2, num_points=(4, 5), method="serial")
    b = plane(obj, d1, d2, num_points=(4, 5), method="vmap")
    np.testing.assert_allclose(a.values["loss"], b.values["loss"], rtol=2e-6)


def test_directions_are_used_as_given_not_orthogonalized():
    model, x, y, batches = mlp_setup()
    obj = Objective(model, F.cross_entropy, batches)
    d1 = random_direction(obj, seed=0)
    d2 = d1.vector + 0.1 * random_direction(obj, seed=1).vector  # nearly parallel
    ls = plane(obj, d1, d2, num_points=(3, 3))
    assert ls.cosine > 0.9
    theta = obj.theta
    ref = brute_force(model, x, y, [theta + d1.vector + d2])
    assert math.isclose(ls.values["loss"][-1, -1], ref[0, 0], rel_tol=1e-10)


def test_sum_reduction_and_regression_task():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(17, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(17, 2, generator=gen, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    loss = nn.MSELoss(reduction="sum")
    obj = Objective(model, loss, uneven_batches(x, y, [9, 8]))
    d = random_direction(obj, seed=2)
    for method in METHODS:
        ls = line(obj, d, num_points=5, method=method)
        assert ls.metrics == ["loss"]
        ref = brute_force(model, x, y, [obj.theta + a * d.vector for a in ls.x], loss=loss)
        np.testing.assert_allclose(ls.values["loss"], ref[:, 0], rtol=1e-10)
    with pytest.raises(ValueError, match="classification"):
        line(obj, d, num_points=3, metrics=["loss", "accuracy"])


def test_metrics_selection_and_counts():
    model, _, _, batches = mlp_setup()
    obj = Objective(model, F.cross_entropy, batches)
    d = random_direction(obj, seed=0)
    ls = line(obj, d, num_points=7, metrics=["loss"])
    assert ls.metrics == ["loss"]
    assert obj.counts["loss"] == 7  # the centre via Objective.evaluate, six more points
    with pytest.raises(ValueError, match="unknown metrics"):
        line(obj, d, num_points=3, metrics=["top5"])


def test_auto_is_serial_on_cpu_and_falls_back_from_vmap(monkeypatch):
    model, _, _, batches = mlp_setup()

    def loss_with_item(out, y):  # .item() cannot run under vmap
        loss = F.cross_entropy(out, y)
        assert math.isfinite(loss.item())
        return loss

    obj = Objective(model, loss_with_item, batches)
    d = random_direction(obj, seed=0)
    assert line(obj, d, num_points=5).settings["method"] == "serial"
    with pytest.raises(RuntimeError):
        line(obj, d, num_points=5, method="vmap")  # asked for explicitly: no silent fallback
    monkeypatch.setattr(runner, "preferred_method", lambda objective: "vmap")
    with pytest.warns(RuntimeWarning, match="falling back"):
        ls = line(obj, d, num_points=5)
    assert ls.settings["method"] == "serial" and "vmap_error" in ls.settings
    ref = line(Objective(model, loss_with_item, batches), d, num_points=5, method="serial")
    np.testing.assert_array_equal(ls.values["loss"], ref.values["loss"])
    # A vmappable loss runs batched under "auto" when vmap is preferred.
    obj2 = Objective(model, F.cross_entropy, batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert line(obj2, d, num_points=5).settings["method"] == "vmap"


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("method", METHODS)
def test_model_unchanged_when_interrupted(exc, method):
    model, _, _, batches = cnn_setup()
    model.train()
    snap = ModelSnapshot.take(model)
    calls = {"n": 0}

    def flaky(out, y):
        calls["n"] += 1
        if calls["n"] > 6:
            raise exc("interrupted")
        return F.cross_entropy(out, y)

    obj = Objective(model, flaky, batches)
    d1, d2 = random_direction(obj, seed=0), random_direction(obj, seed=1)
    with pytest.raises(exc):
        plane(obj, d1, d2, num_points=(4, 4), method=method, chunk_size=2)
    snap.assert_unchanged(model)


def test_eval_mode_false_uses_batch_statistics_serially():
    model, x, y, _ = cnn_setup()
    model.train()
    snap = ModelSnapshot.take(model)
    obj = Objective(model, F.cross_entropy, (x, y), eval_mode=False)
    d = random_direction(obj, seed=0)
    ls = line(obj, d, num_points=5)
    snap.assert_unchanged(model)
    for a, value in zip(ls.x, ls.values["loss"], strict=True):
        assert math.isclose(value, obj.loss(at=obj.theta + a * d.vector), rel_tol=1e-12)


def test_bad_arguments():
    model, _, _, batches = mlp_setup()
    obj = Objective(model, F.cross_entropy, batches)
    d = random_direction(obj, seed=0)
    with pytest.raises(ValueError, match="method"):
        line(obj, d, method="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        line(obj, d, chunk_size=0)
    with pytest.raises(ValueError, match="contain 0"):
        line(obj, d, span=(0.5, 1.0))
    with pytest.raises(ValueError, match="shape"):
        plane(obj, d, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="trajectory"):
        plane(obj, d, d, num_points=(3, 3), trajectory=np.zeros((4, 1)))
    with pytest.raises(TypeError, match="Objective"):
        line(model, d)


def test_progress_bar_and_callback(capsys):
    model, _, _, batches = mlp_setup()
    obj = Objective(model, F.cross_entropy, batches)
    d = random_direction(obj, seed=0)
    seen = []
    ls = line(obj, d, num_points=9, chunk_size=3, progress=True, callback=lambda *a: seen.append(a))
    assert "landscape" in capsys.readouterr().err  # the tqdm bar
    assert seen == [(4, 9), (7, 9), (9, 9)]
    np.testing.assert_array_equal(ls.values["loss"], line(obj, d, num_points=9).values["loss"])


def top2(outputs, targets):
    """Fraction of samples whose target is among the two largest outputs (a batch mean)."""
    return (outputs.topk(2, dim=-1).indices == targets[:, None]).any(-1).double().mean()


@pytest.mark.parametrize("method", METHODS)
def test_custom_metric_equals_brute_force(method):
    model, x, y, batches = mlp_setup()
    obj = Objective(model, F.cross_entropy, batches)
    d1, d2 = random_direction(obj, seed=0), random_direction(obj, seed=1)
    ls = plane(obj, d1, d2, num_points=(4, 3), metrics=[top2], method=method, chunk_size=5)
    assert ls.metrics == ["loss", "top2"] and ls.settings["metrics"] == ["loss", "top2"]
    theta = obj.theta
    pts = [theta + a * d1.vector + b * d2.vector for a in ls.x for b in ls.y]
    ref = brute_force(model, x, y, pts, loss=top2).reshape(*ls.shape, 2)
    # top2 is a per-batch mean: weighted by batch size it is the mean over all samples.
    np.testing.assert_allclose(ls.values["top2"], ref[..., 0], rtol=1e-12, atol=1e-14)
    losses = brute_force(model, x, y, pts)[:, 0].reshape(ls.shape)
    np.testing.assert_allclose(ls.values["loss"], losses, rtol=1e-10, atol=1e-12)
    named = line(obj, d1, num_points=5, metrics={"ce": F.cross_entropy, "acc2": top2})
    assert named.metrics == ["loss", "ce", "acc2"]
    np.testing.assert_array_equal(named.values["ce"], named.values["loss"])


def test_far_points_keep_non_finite_values_and_a_non_finite_centre_raises():
    model, _, _, batches = mlp_setup(dtype=torch.float32)
    obj = Objective(model, F.cross_entropy, batches)
    d = random_direction(obj, seed=0, normalization=None)
    ls = line(obj, d, span=(-1e38, 1e38), num_points=5)
    loss = ls.values["loss"]
    assert np.isfinite(loss[ls.center_index]) and not np.isfinite(loss).all()
    with torch.no_grad():
        model[0].bias[0] = math.nan
    broken = Objective(model, F.cross_entropy, batches, check_determinism=False)
    with pytest.raises(NonFiniteLossError, match="centre"):
        line(broken, d, num_points=3)


def test_the_objective_is_only_read(monkeypatch):
    model, _, _, batches = mlp_setup()
    obj = Objective(model, F.cross_entropy, batches)
    d = random_direction(obj, seed=0)
    obj.loss()  # past the first-use check
    state = {k: v for k, v in vars(obj).items() if k != "counts"}
    for method in METHODS:
        line(obj, d, num_points=5, method=method)
    assert {k: v for k, v in vars(obj).items() if k != "counts"}.keys() == state.keys()
    assert all(vars(obj)[k] is v for k, v in state.items())
