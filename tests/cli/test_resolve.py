"""Model, data and weight resolution behind the command line (flatlens.cli._resolve)."""

from __future__ import annotations

import pytest
import torch
from helpers import ModelSnapshot
from torch import nn

from flatlens import zoo
from flatlens.cli._resolve import (
    build_model,
    check_state_dict,
    load_data,
    load_weights,
    match_dtype,
)
from flatlens.core._io import CheckpointError
from flatlens.data import synthetic_classification


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def test_load_digits_as_images():
    data = load_data("digits")
    assert data.name == "digits" and data.num_classes == 10
    assert data.input_shape == (1, 8, 8)
    assert len(data.x_train) + len(data.x_test) == 1797


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("mnist", ValueError, "unknown data set 'mnist'"),
        ("digits:/tmp", ValueError, "takes no folder"),
        ("cifar10", ValueError, "needs a folder"),
        ("cifar100:/no/such/folder", FileNotFoundError, "does not exist"),
    ],
)
def test_load_data_errors(spec, error, message):
    with pytest.raises(error, match=message):
        load_data(spec)


def test_zoo_models_are_sized_from_the_data():
    data = synthetic_classification(num_train=16, num_features=12, num_classes=5, num_test=4)
    model = build_model("mlp", data)
    layers = _linears(model)
    assert layers[0].in_features == 12 and layers[-1].out_features == 5
    wide = build_model("mlp", data, hidden=7, num_classes=3)  # explicit values win
    assert _linears(wide)[0].out_features == 7 and _linears(wide)[-1].out_features == 3
    digits = load_data("digits")
    conv = build_model("flatlens.zoo:cnn", digits, channels=4)
    assert next(m for m in conv.modules() if isinstance(m, nn.Conv2d)).in_channels == 1
    assert _linears(conv)[-1].out_features == 10


def test_resnet_gets_only_the_arguments_it_takes():
    data = synthetic_classification(num_train=8, num_features=4, num_classes=7, num_test=4)
    model = build_model("resnet18", data, width=4)
    assert _linears(model)[-1].out_features == 7


@pytest.mark.parametrize(
    ("spec", "kwargs", "error", "message"),
    [
        ("vgg", {}, ValueError, "unknown model 'vgg'"),
        ("no_such_module_xyz:net", {}, ValueError, "cannot import model factory"),
        ("flatlens.zoo:nothing", {}, ValueError, "cannot import model factory"),
        ("flatlens.zoo:", {}, ValueError, "package.module:factory"),
        (":mlp", {}, ValueError, "package.module:factory"),
        ("flatlens.zoo:MODELS", {}, ValueError, "is not callable"),
        ("mlp", {"widht": 3}, ValueError, "unexpected keyword argument 'widht'"),
        ("builtins:dict", {}, TypeError, "returned dict, not a Module"),
    ],
)
def test_build_model_errors(spec, kwargs, error, message):
    with pytest.raises(error, match=message):
        build_model(spec, None, **kwargs)


def test_load_weights_plain_and_wrapped(tmp_path):
    source = zoo.mlp(in_features=6, hidden=5, num_classes=3)
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    torch.save({"model": source.state_dict(), "epoch": 4}, tmp_path / "wrapped.pt")
    for name in ("plain.pt", "wrapped.pt"):
        target = zoo.mlp(in_features=6, hidden=5, num_classes=3)
        assert load_weights(target, tmp_path / name) is target
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), (name, key)


def test_load_weights_takes_the_checkpoint_precision(tmp_path):
    source = zoo.mlp(in_features=6, hidden=5, num_classes=3).double()
    with torch.no_grad():
        source[1].weight.add_(1e-12)  # a difference float32 cannot hold
    torch.save(source.state_dict(), tmp_path / "f64.pt")
    target = load_weights(zoo.mlp(in_features=6, hidden=5, num_classes=3), tmp_path / "f64.pt")
    assert all(p.dtype == torch.float64 for p in target.parameters())
    assert torch.equal(target[1].weight, source[1].weight)
    data = synthetic_classification(num_train=8, num_features=6, num_classes=3, num_test=4)
    cast = match_dtype(data, target)
    assert cast.x_train.dtype == cast.x_test.dtype == torch.float64
    assert torch.equal(cast.x_train, data.x_train.double())
    assert cast.y_train is data.y_train
    assert match_dtype(cast, target) is cast


def test_mismatched_checkpoint_is_refused_and_the_model_untouched(tmp_path):
    torch.save(zoo.cnn(in_channels=1, channels=4).state_dict(), tmp_path / "cnn.pt")
    target = zoo.mlp(in_features=64, hidden=4, num_classes=10)
    before = ModelSnapshot.take(target)
    with pytest.raises(CheckpointError) as info:
        load_weights(target, tmp_path / "cnn.pt")
    before.assert_unchanged(target)
    message = str(info.value)
    assert "\n" not in message
    expected = target.state_dict().keys()
    stored = zoo.cnn(in_channels=1, channels=4).state_dict().keys()
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    assert f"missing keys [{', '.join(missing)}]" in message
    assert f"unexpected keys [{', '.join(unexpected[:8])}] and {len(unexpected) - 8} more" in (
        message
    )
    assert "1.weight (4,) vs (4, 64)" in message  # BatchNorm weight where a Linear sits


def test_check_state_dict_lists_every_kind_of_problem():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    state = dict(model.state_dict())
    check_state_dict(model, state)  # exact fit: no error
    state["0.weight"] = torch.zeros(5, 3)
    del state["1.bias"]
    state["extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing keys \[1\.bias\]") as info:
        check_state_dict(model, state, "x.pt")
    assert "unexpected keys [extra]" in str(info.value)
    assert "0.weight (5, 3) vs (2, 3)" in str(info.value)
    assert str(info.value).startswith("checkpoint x.pt does not fit the model")
