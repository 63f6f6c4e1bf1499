"""The serial (points written in place or materialized) and vmap landscape paths agree, on an
MLP, a BatchNorm CNN and a vision transformer, and leave the model as it was."""

from __future__ import annotations

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
    import_model_library,
    tiny_mlp,
    uneven_batches,
)

from flatlens import Objective
from flatlens.core._affine import AffinePoints, WriteBuffers
from flatlens.core._metrics import resolve_metrics
from flatlens.core._points import SerialEvaluator
from flatlens.landscape import _evaluate as runner
from flatlens.landscape import grid_axis, line, plane, random_direction
from flatlens.landscape._grid import Grid, grid_points


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ndirs", [1, 2])
def test_points_written_in_place_are_the_materialized_rows_bit_for_bit(dtype, ndirs):
    gen = torch.Generator().manual_seed(0)
    n = 1000
    theta = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    dirs = tuple(torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for _ in range(ndirs))
    axes = [grid_axis((-1.3, 0.7), 7), grid_axis((-0.25, 2.0), 6)][:ndirs]
    coef = Grid(axes, ["loss"]).coef
    points = AffinePoints(theta, dirs, torch.as_tensor(coef, dtype=dtype))
    rows = points.materialize()
    assert torch.equal(_bits(rows), _bits(grid_points(theta, list(dirs), coef)))
    # Chunks share the work memory; with room for two products, the rest are computed.
    buffers = WriteBuffers(theta, product_bytes=2 * n * theta.element_size())
    out = torch.empty_like(theta)
    for start in range(0, len(points), 5):
        chunk = points[start : start + 5]
        write = chunk.writer(buffers)
        assert torch.equal(_bits(chunk.materialize()), _bits(rows[start : start + 5]))
        for k in range(len(chunk)):
            write(k, out)
            assert torch.equal(_bits(out), _bits(rows[start + k])), (start, k)
    assert len(buffers.products) == 2
    with pytest.raises(ValueError, match="coefficients"):
        AffinePoints(theta, dirs, torch.zeros(3, ndirs + 1, dtype=dtype))


# ------------------------------------------------------------------------------ models
def _mlp(dtype):
    x, y = classification_data(23, dtype=dtype)
    return tiny_mlp(dtype=dtype), uneven_batches(x, y, [10, 8, 5])


def _cnn(dtype):
    x, y = image_data(13, dtype=dtype)
    return bn_cnn(dtype=dtype), uneven_batches(x, y, [6, 7])


def _vit(dtype):
    timm = import_model_library("timm")
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=4,
        embed_dim=16,
        depth=2,
        num_heads=2,
        num_classes=3,
    ).to(dtype)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(9, 3, 16, 16, generator=gen).to(dtype)
    y = torch.randint(0, 3, (9,), generator=gen)
    return vit, uneven_batches(x, y, [5, 4])


MODELS = {"mlp": _mlp, "bn_cnn": _cnn, "vit": _vit}
RTOL = {torch.float32: 2e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(MODELS))
def test_serial_and_vmap_planes_agree_and_leave_the_model_unchanged(name, dtype):
    model, batches = MODELS[name](dtype)
    model.train()  # the landscape evaluates in eval mode (BatchNorm's running statistics)
    snap = ModelSnapshot.take(model)
    obj = Objective(model, F.cross_entropy, batches)
    d1, d2 = random_direction(obj, seed=0), random_direction(obj, seed=1)
    kwargs = {"span": (-0.5, 0.5), "num_points": (5, 4), "metrics": ["loss", "accuracy"]}
    serial = plane(obj, d1, d2, method="serial", **kwargs)
    with warnings.catch_warnings():  # timm's attention has no vmap batching rule on the CPU
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        vmapped = plane(obj, d1, d2, method="vmap", **kwargs)
    assert serial.settings["method"] == "serial" and vmapped.settings["method"] == "vmap"
    assert serial.shape == vmapped.shape == (5, 5)  # 0 added to the second axis
    np.testing.assert_allclose(vmapped.values["loss"], serial.values["loss"], rtol=RTOL[dtype])
    # A float32 argmax may flip on a near tie; no more than one sample at a point.
    acc = np.abs(vmapped.values["accuracy"] - serial.values["accuracy"])
    assert acc.max() <= (1.5 / sum(len(b[1]) for b in batches) if dtype == torch.float32 else 0)
    # The serial plane writes its points into the working copy in place (at most three
    # in-memory batches); they are the materialized grid points bit for bit, so each value
    # is the objective's own loss there.
    assert SerialEvaluator(obj, resolve_metrics("loss"))._in_place
    coef = Grid(serial.coords, ["loss"]).coef
    ref = obj.evaluate_points(grid_points(obj.theta, [d1.vector, d2.vector], coef), "accuracy")
    assert np.array_equal(serial.values["loss"].reshape(-1), ref["loss"].numpy())
    assert np.array_equal(serial.values["accuracy"].reshape(-1), ref["accuracy"].numpy())
    assert serial.center["loss"] == obj.loss()
    snap.assert_unchanged(model)


def test_many_batches_materialize_each_chunk_with_the_same_values():
    x, y = classification_data(23)
    obj = Objective(tiny_mlp(), F.cross_entropy, uneven_batches(x, y, [6, 6, 6, 5]))
    assert not SerialEvaluator(obj, resolve_metrics("loss"))._in_place
    d = random_direction(obj, seed=0)
    ls = line(obj, d, num_points=7, method="serial")
    at = [obj.theta + float(a) * d.vector for a in ls.x]
    assert [float(v) for v in ls.values["loss"]] == [obj.loss(at=p) for p in at]


def test_serial_chunks_grow_after_the_first_and_values_do_not_change(monkeypatch):
    model, batches = _mlp(torch.float32)
    obj = Objective(model, F.cross_entropy, batches)
    d1, d2 = random_direction(obj, seed=0), random_direction(obj, seed=1)
    fixed = plane(obj, d1, d2, num_points=(9, 9), chunk_size=16, method="serial")
    assert fixed.settings["chunk_size"] == 16
    seen = []
    monkeypatch.setattr(runner, "CHUNK_SECONDS", 1e6)  # every point is cheap: the cap
    grown = plane(obj, d1, d2, num_points=(9, 9), callback=lambda done, total: seen.append(done))
    assert grown.settings["method"] == "serial" and grown.settings["chunk_size"] == 256
    assert seen == [17, 81]  # the centre, 16 points, then the other 64 in one chunk
    np.testing.assert_array_equal(grown.values["loss"], fixed.values["loss"])
    np.testing.assert_array_equal(grown.values["accuracy"], fixed.values["accuracy"])
