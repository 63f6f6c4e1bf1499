"""flatlens.zoo: shapes, parameter counts and BatchNorm placement of the reference models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatlens import zoo


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_mlp_shapes_and_size():
    model = zoo.mlp(in_features=64, hidden=64, num_classes=10, depth=2)
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)  # flattens images
    assert count(model) == (64 * 64 + 64) + (64 * 64 + 64) + (64 * 10 + 10)
    assert count(zoo.mlp(depth=0)) == 64 * 10 + 10


def test_cnn_has_batchnorm_and_works_on_8x8_and_32x32():
    model = zoo.cnn()
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2
    assert model(torch.zeros(4, 1, 8, 8)).shape == (4, 10)
    rgb = zoo.cnn(in_channels=3, num_classes=100)
    assert rgb(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_resnet18_matches_the_cifar_resnet18():
    # 11,173,962 parameters: the CIFAR ResNet-18 (3x3 stem, no max-pool) with 10 classes.
    assert count(zoo.resnet18()) == 11_173_962
    small = zoo.resnet18(num_classes=100, width=8)
    assert small(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in small.modules()) == 20


def test_build_by_name():
    assert isinstance(zoo.build("cnn", channels=4), nn.Sequential)
    assert set(zoo.MODELS) == {"mlp", "cnn", "resnet18", "wrn16_8", "wrn28_10"}
    with pytest.raises(ValueError, match="unknown model"):
        zoo.build("vgg")


def test_build_takes_a_name_or_a_factory_spec_and_sizes_from_the_data():
    from flatlens.data import synthetic_classification

    data = synthetic_classification(num_train=16, num_features=12, num_classes=5, num_test=4)
    torch.manual_seed(0)
    by_name = zoo.build("mlp", data, hidden=7)
    torch.manual_seed(0)
    by_spec = zoo.build("flatlens.zoo:mlp", data, hidden=7)
    a, b = by_name.state_dict(), by_spec.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert by_name[1].in_features == 12 and by_name[-1].out_features == 5
    assert zoo.build("mlp", data, num_classes=3)[-1].out_features == 3  # explicit wins
    assert zoo.factory("cnn") is zoo.cnn and zoo.factory("flatlens.zoo:cnn") is zoo.cnn


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        (3, TypeError, "model must be a string"),
        ("vgg", ValueError, r"unknown model 'vgg'; use one of \['cnn', 'mlp', 'resnet18', 'wrn"),
        ("pkg:", ValueError, "must look like package.module:factory"),
        (":mlp", ValueError, "must look like package.module:factory"),
    ],
)
def test_check_spec_checks_the_form_without_importing(spec, error, match):
    with pytest.raises(error, match=match):
        zoo.check_spec(spec)
    assert zoo.check_spec("no_such_module_xyz:net") == "no_such_module_xyz:net"  # not imported
    with pytest.raises(ValueError, match="cannot import model factory"):
        zoo.build("no_such_module_xyz:net")


_MODULES = {
    "zoo_raises_at_import": "raise RuntimeError('CUDA driver missing')\n",
    "zoo_bad_syntax": "def net(:\n",
    "zoo_needs_missing": "import zoo_no_such_dependency\n",
    "zoo_ok": (
        "from torch import nn\n"
        "def net(width=2):\n    return nn.Linear(3, width)\n"
        "def raises(width=2):\n    raise KeyError('no weights')\n"
        "class Holder:\n    make = staticmethod(net)\n"
    ),
}


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    for name, text in _MODULES.items():
        (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("zoo_raises_at_import:net", ["'zoo_raises_at_import' raised RuntimeError", "driver"]),
        ("zoo_bad_syntax:net", ["raised SyntaxError at", "zoo_bad_syntax.py:1"]),
        ("zoo_needs_missing:net", ["ModuleNotFoundError", "zoo_no_such_dependency"]),
        ("zoo_not_a_module_xyz:net", ["no module named 'zoo_not_a_module_xyz'", "PYTHONPATH"]),
        ("zoo_ok:missing", ["has no attribute 'missing'"]),
    ],
)
def test_any_import_failure_is_one_value_error_naming_the_module(user_modules, spec, words):
    with pytest.raises(ValueError, match="cannot import model factory") as info:
        zoo.build(spec)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_import_object_follows_dotted_names_and_factory_errors_keep_their_type(user_modules):
    assert zoo.import_object("zoo_ok:Holder.make", "loss") is zoo.import_object("zoo_ok:net")
    with pytest.raises(ValueError, match=r"raised KeyError: 'no weights' \(arguments"):
        zoo.build("zoo_ok:raises")
    with pytest.raises(ValueError, match="does not take the arguments"):
        zoo.build("zoo_ok:net", depth=3)
    assert zoo.build("zoo_ok:net", width=4).out_features == 4


def test_the_package_root_is_lazy_and_every_public_name_resolves():
    import subprocess
    import sys

    code = (
        "import sys, flatlens; assert 'torch' not in sys.modules, 'torch loaded eagerly'; "
        "[getattr(flatlens, n) for n in flatlens.__all__]; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
