"""Objective.evaluate_points and its evaluators against Objective.loss / evaluate and loops."""

from __future__ import annotations

import copy
import math
import warnings

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
from flatlens.core import _points
from flatlens.core._points import MetricSet, SerialEvaluator, VmapEvaluator, resolve_metrics

METHODS = ["serial", "vmap"]


def mlp_objective(dtype=torch.float64, **kwargs):
    x, y = classification_data(23, dtype=dtype)
    return Objective(
        tiny_mlp(dtype=dtype), F.cross_entropy, uneven_batches(x, y, [10, 8, 5]), **kwargs
    )


def cnn_objective(dtype=torch.float64, **kwargs):
    x, y = image_data(13, dtype=dtype)
    return Objective(bn_cnn(dtype=dtype), F.cross_entropy, uneven_batches(x, y, [6, 7]), **kwargs)


def points_around(obj, count=4, scale=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    steps = torch.randn(count, obj.num_params, generator=gen, dtype=torch.float64)
    return obj.theta + scale * steps.to(obj.dtype)


def top2(outputs, targets):
    """Fraction of samples whose target is among the two largest outputs (a batch mean)."""
    return (outputs.topk(2, dim=-1).indices == targets[:, None]).any(-1).double().mean()


def margin_sum(outputs, targets):
    """Sum over the batch of the target logit minus the largest other logit."""
    target = outputs.gather(1, targets[:, None]).squeeze(1)
    others = outputs.scatter(1, targets[:, None], -math.inf).amax(-1)
    return (target - others).sum()


margin_sum.reduction = "sum"


def brute_force(model, batches, points, fn):
    """fn(outputs, targets) over all samples at once, with the weights written into a copy."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    out = []
    for flat in points:
        ref = copy.deepcopy(model).eval()
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat, ref.parameters())
            out.append(float(fn(ref(x), y)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("make", [lambda: mlp_objective(torch.float32), cnn_objective])
def test_serial_loss_and_accuracy_are_the_objectives_bit_for_bit(make):
    obj = make()
    pts = points_around(obj)
    out = obj.evaluate_points(pts, ["accuracy"], method="serial", chunk_size=3)
    assert list(out) == ["loss", "accuracy"]
    for k, p in enumerate(pts):
        assert float(out["loss"][k]) == obj.loss(at=p)
        assert float(out["accuracy"][k]) == obj.evaluate(at=p)["accuracy"]


def test_evaluators_with_and_without_the_private_copy_agree_bit_for_bit():
    for obj in (mlp_objective(torch.float32), cnn_objective()):
        pts = points_around(obj, 3)
        metrics = resolve_metrics(["accuracy", top2])
        results = []
        for use_copy in (True, False):
            ev = SerialEvaluator(obj, metrics, use_copy=use_copy)
            assert ev.uses_copy == use_copy
            results.append(ev(pts))
        assert torch.equal(results[0].totals, results[1].totals)
        assert (
            results[0].count == results[1].count == len(torch.cat([y for _, y, _ in obj.batches()]))
        )
        vmapped = VmapEvaluator(obj, metrics)(pts)
        torch.testing.assert_close(vmapped.totals, results[0].totals, rtol=1e-6, atol=0)


def test_vmap_agrees_with_serial_with_batchnorm_and_uneven_batches():
    obj = cnn_objective()
    model = obj.model
    model.train()  # evaluation must use eval mode (running statistics) all the same
    snap = ModelSnapshot.take(model)
    pts = points_around(obj, 5, scale=0.1)
    a = obj.evaluate_points(pts, ["accuracy"], method="vmap", chunk_size=2)
    b = obj.evaluate_points(pts, ["accuracy"], method="serial")
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-13, atol=0)
    assert torch.equal(a["accuracy"], b["accuracy"])
    snap.assert_unchanged(model)


@pytest.mark.parametrize("method", METHODS)
def test_custom_metrics_equal_a_brute_force_loop(method):
    obj = mlp_objective()
    pts = points_around(obj)
    out = obj.evaluate_points(pts, [top2, margin_sum], method=method, chunk_size=3)
    assert list(out) == ["loss", "top2", "margin_sum"]
    # A per-batch mean weighted by batch size is the mean over all samples; a summed
    # metric (reduction = "sum") adds up over the batches.
    torch.testing.assert_close(out["top2"], brute_force(obj.model, obj._data, pts, top2))
    torch.testing.assert_close(
        out["margin_sum"], brute_force(obj.model, obj._data, pts, margin_sum), rtol=1e-12, atol=0
    )
    # The loss passed as a metric is the loss, bit for bit.
    again = obj.evaluate_points(pts, {"ce": F.cross_entropy}, method=method, chunk_size=3)
    assert torch.equal(again["ce"], again["loss"]) and torch.equal(again["loss"], out["loss"])


def test_chunking_does_not_change_serial_values_and_counts_each_point():
    obj = mlp_objective()
    pts = points_around(obj, 7)
    before = obj.counts["loss"]
    whole = obj.evaluate_points(pts, method="serial", chunk_size=7)
    parts = obj.evaluate_points(pts, method="serial", chunk_size=2)
    assert torch.equal(whole["loss"], parts["loss"])
    assert obj.counts["loss"] - before == 14
    empty = obj.evaluate_points(pts[:0])
    assert empty["loss"].shape == (0,)


def test_default_metrics_follow_the_task():
    obj = mlp_objective()
    pts = points_around(obj, 2)
    assert list(obj.evaluate_points(pts)) == ["loss"]
    assert list(obj.evaluate_points(pts, None)) == ["loss", "accuracy"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(9, 2, generator=gen, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(4, 2)).double()
    reg = Objective(model, nn.MSELoss(reduction="sum"), uneven_batches(x, y, [5, 4]))
    rp = points_around(reg, 2)
    assert list(reg.evaluate_points(rp, None)) == ["loss"]
    for method in METHODS:
        with pytest.raises(ValueError, match="classification"):
            reg.evaluate_points(rp, ["accuracy"], method=method)
    out = reg.evaluate_points(rp, method="serial")
    assert [float(v) for v in out["loss"]] == [reg.loss(at=p) for p in rp]


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_points_keep_their_values(method):
    obj = mlp_objective()
    pts = points_around(obj, 3)
    pts[1, 0] = math.nan
    pts[2, -1] = math.inf  # a bias of the last layer
    out = obj.evaluate_points(pts, ["accuracy"], method=method)
    assert math.isfinite(out["loss"][0]) and math.isnan(out["loss"][1])
    assert not math.isfinite(out["loss"][2])
    assert float(out["loss"][0]) == pytest.approx(obj.loss(at=pts[0]), rel=1e-12)


def test_the_kept_copy_follows_changes_of_the_model():
    obj = cnn_objective()
    pts = points_around(obj, 2, scale=0.05)
    first = obj.evaluate_points(pts, method="serial")
    with torch.no_grad():
        obj.model[1].running_mean.add_(0.5)  # a buffer, not a parameter of the space
    second = obj.evaluate_points(pts, method="serial")
    assert not torch.equal(first["loss"], second["loss"])
    assert [float(v) for v in second["loss"]] == [obj.loss(at=p) for p in pts]


def test_train_mode_objective_evaluates_through_forward():
    obj = cnn_objective(eval_mode=False)
    assert not SerialEvaluator(obj, MetricSet()).uses_copy
    pts = points_around(obj, 2, scale=0.05)
    out = obj.evaluate_points(pts, method="serial")
    assert [float(v) for v in out["loss"]] == [obj.loss(at=p) for p in pts]


def test_auto_falls_back_from_vmap_with_a_warning(monkeypatch):
    def loss_with_item(out, y):  # .item() cannot run under vmap
        loss = F.cross_entropy(out, y)
        assert math.isfinite(loss.item())
        return loss

    x, y = classification_data(23)
    obj = Objective(tiny_mlp(), loss_with_item, uneven_batches(x, y, [10, 13]))
    pts = points_around(obj, 3)
    with pytest.raises(RuntimeError):
        obj.evaluate_points(pts, method="vmap")
    monkeypatch.setattr(_points, "preferred_method", lambda objective: "vmap")
    with pytest.warns(RuntimeWarning, match="falling back"):
        out = obj.evaluate_points(pts)
    assert torch.equal(out["loss"], obj.evaluate_points(pts, method="serial")["loss"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        mlp_objective().evaluate_points(pts, method="auto")


def test_metric_names_and_bad_arguments():
    obj = mlp_objective()
    pts = points_around(obj, 2)
    assert resolve_metrics(None).accuracy == "auto"
    assert resolve_metrics("accuracy").accuracy == "yes"
    assert [m.name for m in resolve_metrics({"a": top2, "b": margin_sum}).custom] == ["a", "b"]
    assert [m.mean for m in resolve_metrics([top2, margin_sum]).custom] == [True, False]
    for bad, match in [
        (["top5"], "unknown metrics"),
        ([lambda o, t: o.sum()], "cannot name"),
        ([nn.MSELoss()], "cannot name"),
        ({"loss": top2}, "other than the built-ins"),
        ([top2, top2], "share a name"),
        ({"x": nn.CrossEntropyLoss(reduction="none")}, "reduction"),
    ]:
        with pytest.raises(ValueError, match=match):
            obj.evaluate_points(pts, bad)
    with pytest.raises(TypeError, match="callable"):
        obj.evaluate_points(pts, {"x": 3})
    for kwargs, match in [
        ({"points": obj.theta}, "points"),
        ({"points": pts[:, :-1]}, "one flat parameter vector per row"),
        ({"points": pts, "method": "fast"}, "method"),
        ({"points": pts, "chunk_size": 0}, "chunk_size"),
    ]:
        with pytest.raises(ValueError, match=match):
            obj.evaluate_points(**kwargs)
    with pytest.raises(ValueError, match="scalar"):
        obj.evaluate_points(pts, {"rows": lambda o, t: o.sum(-1)})


def test_objective_attributes_are_not_written():
    obj = mlp_objective()
    state = {k: v for k, v in vars(obj).items() if k not in ("counts", "_checked", "num_samples")}
    obj.evaluate_points(points_around(obj), ["accuracy"], method="serial")
    obj.evaluate_points(points_around(obj), ["accuracy"], method="vmap")
    after = {k: v for k, v in vars(obj).items() if k in state}
    assert after.keys() == state.keys() and all(after[k] is state[k] for k in state)
