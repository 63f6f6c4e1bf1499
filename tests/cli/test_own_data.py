"""Your own data and loss from the command line: ``--data package.module:factory``,
``--data imagefolder:DIR`` and ``--loss cross_entropy|mse|package.module:callable``, for
every subcommand that takes ``--data``."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_util import one_error_line, run, run_cli
from torch import nn

from flatlens.core._io import load_checkpoint
from flatlens.train._losses import MSELoss
from flatlens.zoo import mlp

_MODULE = textwrap.dedent(
    """
    import torch
    from torch.utils.data import Dataset, TensorDataset

    def _blobs(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 6, generator=g)
        return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()

    def pair():
        x, y = _blobs(160, 0)
        return TensorDataset(x[:120], y[:120]), TensorDataset(x[120:], y[120:])

    class Listed(Dataset):
        def __init__(self):
            self.x, self.y = _blobs(60, 1)

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.x[i].numpy(), int(self.y[i])

    def single():
        return Listed()

    def twice_ce(outputs, targets):
        return 2 * torch.nn.functional.cross_entropy(outputs, targets)

    class Smooth(torch.nn.CrossEntropyLoss):
        def __init__(self):
            super().__init__(label_smoothing=0.1)

    def broken():
        return [(torch.zeros(6), 0), (torch.zeros(5), 1)]
    """
)


@pytest.fixture
def mine(tmp_path, monkeypatch) -> Path:
    (tmp_path / "mydata.py").write_text(_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)  # relative --out folders land here
    return tmp_path


def _data(tmp_path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        import mydata
    finally:
        sys.path.remove(str(tmp_path))
    train, test = mydata.pair()
    return (*train.tensors, *test.tensors)


def test_diagnose_quick_with_a_data_factory_end_to_end(mine, tmp_path):
    """Train in-process, then ``python -m flatlens diagnose --quick`` with PYTHONPATH."""
    code, _, err = run(["train", "--data", "mydata:pair", "--epochs", "2", "--out", "run"])
    assert code == 0, err
    proc = run_cli(
        "diagnose", "--model", "mlp", "--data", "mydata:pair", "--checkpoint", "run/model.pt",
        "--quick", "--out", "diag", "--json", "--quiet",
        cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["data"] == "mydata:pair" and report["loss"] == "cross_entropy"
    x_train, y_train, x_test, y_test = _data(tmp_path)
    model = mlp(in_features=6, num_classes=3)
    model.load_state_dict(load_checkpoint(tmp_path / "run" / "model.pt"))
    with torch.no_grad():
        train_loss = nn.functional.cross_entropy(model(x_train), y_train).item()
        test_acc = (model(x_test).argmax(1) == y_test).double().mean().item()
    assert report["performance"]["train_loss"] == pytest.approx(train_loss, rel=1e-5)
    assert report["performance"]["test_accuracy"] == pytest.approx(test_acc)
    assert report["model"]["num_params"] == sum(p.numel() for p in model.parameters())


def test_mse_and_a_callable_loss_are_what_diagnose_measures(mine, tmp_path):
    argv = ["train", "--data", "mydata:pair", "--epochs", "1", "--loss", "mse"]
    code, _, err = run([*argv, "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 0, err
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert recorded["settings"]["config"]["loss"] == "mse"
    x_train, y_train, _, _ = _data(tmp_path)
    model = mlp(in_features=6, num_classes=3)
    model.load_state_dict(load_checkpoint(tmp_path / "run" / "model.pt"))
    with torch.no_grad():
        outputs = model(x_train)
        mse = ((outputs - nn.functional.one_hot(y_train, 3).float()) ** 2).mean().item()
        ce = nn.functional.cross_entropy(outputs, y_train).item()
    assert MSELoss()(outputs, y_train).item() == pytest.approx(mse)
    for loss, expected in (("mse", mse), ("mydata:twice_ce", 2 * ce), ("cross_entropy", ce)):
        argv = ["--model", "mlp", "--data", "mydata:pair", "--loss", loss, "--samples", "all"]
        argv += ["--checkpoint", str(tmp_path / "run" / "model.pt"), "--json", "--quiet"]
        name = loss.replace(":", "_")
        code, out, err = run(["bound", *argv, "--steps", "1", "--out", str(tmp_path / name)])
        assert code == 0, err
        assert json.loads(out)["loss"] == loss
        landscape = ["landscape", *argv, "--dim", "1", "--num-points", "3"]
        code, out, err = run([*landscape, "--out", str(tmp_path / f"l-{name}")])
        assert code == 0, err
        assert json.loads(out)["loss_center"] == pytest.approx(expected, rel=1e-5), loss


def test_a_loss_class_is_built_and_diagnose_reuses_parts_only_for_the_same_loss(mine, tmp_path):
    torch.manual_seed(0)
    torch.save(mlp(in_features=6, num_classes=3).state_dict(), tmp_path / "w.pt")
    argv = ["diagnose", "--model", "mlp", "--data", "mydata:pair", "--checkpoint"]
    argv += [str(tmp_path / "w.pt"), "--quick", "--out", str(tmp_path / "d"), "--json", "--quiet"]
    code, out, err = run([*argv, "--loss", "mydata:Smooth"])
    assert code == 0, err
    first = json.loads(out)
    code, out, err = run([*argv, "--loss", "mydata:Smooth", "--resume"])
    assert code == 0 and json.loads(out)["computed_parts"] == []
    code, out, err = run([*argv, "--loss", "cross_entropy", "--resume"])
    again = json.loads(out)
    assert code == 0 and again["reused_parts"] == []  # another loss: nothing reused
    assert again["performance"]["train_loss"] != first["performance"]["train_loss"]
    assert first["loss"] == "mydata:Smooth" and again["loss"] == "cross_entropy"


@pytest.mark.parametrize("command", ["train", "compare", "diagnose", "bound", "landscape"])
def test_every_command_that_takes_data_takes_a_factory(mine, tmp_path, command):
    torch.manual_seed(0)
    torch.save(mlp(in_features=6, num_classes=3).state_dict(), tmp_path / "w.pt")
    weights = ["--model", "mlp", "--checkpoint", str(tmp_path / "w.pt")]
    study = ["--optimizers", "sgd", "--seeds", "0", "--measure-steps", "1"]
    argv = {
        "train": ["--epochs", "1"],
        "compare": ["--epochs", "1", *study, "--measure-samples", "16"],
        "diagnose": [*weights, "--quick"],
        "bound": [*weights, "--steps", "1"],
        "landscape": [*weights, "--dim", "1", "--num-points", "3"],
    }[command]
    code, _, err = run([command, *argv, "--data", "mydata:single", "--out", "o", "--quiet"])
    assert code == 0, err


def test_one_data_set_is_split_like_digits(mine):
    from flatlens.cli._resolve import load_data

    data = load_data("mydata:single")
    assert (len(data.y_train), len(data.y_test)) == (45, 15)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.num_classes == 3 and data.name == "mydata:single"
    assert load_data("mydata:single").x_train.equal(data.x_train)  # a fixed split


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mydata:broken", "the inputs of the training set differ in shape"),
        ("mydata:nothing", "module 'mydata' has no attribute 'nothing'"),
        ("mydata:", "unknown data set 'mydata:'"),
    ],
)
def test_bad_data_factories_are_exit_2(mine, tmp_path, spec, message):
    code, _, err = run(["train", "--data", spec, "--out", str(tmp_path / "o")])
    assert code == 2 and message in one_error_line(err, "train")


def test_a_loss_that_does_not_fit_is_exit_2(mine, tmp_path):
    argv = ["train", "--data", "mydata:pair", "--out", str(tmp_path / "o")]
    code, _, err = run([*argv, "--loss", "torch.nn:MSELoss"])  # logits (N, 3) vs labels (N,)
    line = one_error_line(err, "train")
    assert code == 2 and "loss 'torch.nn:MSELoss' fails on the data 'mydata:pair'" in line
    code, _, err = run([*argv, "--loss", "huber"])
    assert code == 2 and "unknown loss 'huber'" in one_error_line(err, "train")


# ---------------------------------------------------------------------- imagefolder
def _images(root: Path, classes=("cat", "dog"), n: int = 6, size=(8, 8)) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = (rng.random((*size, 3)) * 255).astype("uint8")
            Image.fromarray(pixels).save(root / c / f"{i}.png")


def test_imagefolder_trains_and_diagnoses(tmp_path):
    pytest.importorskip("PIL")
    _images(tmp_path / "imgs" / "train")
    _images(tmp_path / "imgs" / "test", n=3)
    data = ["--data", f"imagefolder:{tmp_path / 'imgs'}", "--model", "cnn"]
    argv = ["train", *data, "--epochs", "1", "--batch-size", "4", "--quiet"]
    code, _, err = run([*argv, "--out", str(tmp_path / "run")])
    assert code == 0, err
    argv = ["diagnose", *data, "--checkpoint", str(tmp_path / "run" / "model.pt"), "--quick"]
    code, out, err = run([*argv, "--out", str(tmp_path / "d"), "--json", "--quiet"])
    assert code == 0, err
    report = json.loads(out)
    assert report["data"].startswith("imagefolder:")
    from flatlens.cli._resolve import load_data

    loaded = load_data(f"imagefolder:{tmp_path / 'imgs'}")
    assert loaded.input_shape == (3, 8, 8) and loaded.num_classes == 2
    assert (len(loaded.y_train), len(loaded.y_test)) == (12, 6)
    means = loaded.x_train.mean(dim=(0, 2, 3))
    assert torch.allclose(means, torch.zeros(3), atol=1e-5)  # normalized per channel


def test_imagefolder_errors_are_one_line(tmp_path):
    pytest.importorskip("PIL")
    _images(tmp_path / "mixed", n=2)
    _images(tmp_path / "mixed", classes=("owl",), n=1, size=(5, 5))
    (tmp_path / "empty").mkdir()
    for folder, message in (
        ("mixed", "resize the images to one size"),
        ("empty", "Couldn't find any class folder"),
        ("missing", "does not exist"),
    ):
        argv = ["train", "--data", f"imagefolder:{tmp_path / folder}", "--out", str(tmp_path)]
        code, _, err = run(argv)
        assert code == 2 and message in one_error_line(err, "train"), err


def test_the_torchvision_shim_skips_only_missing_operators(monkeypatch):
    import torch.library

    from flatlens import _compat as _torchvision

    tv = _torchvision.import_torchvision()
    assert hasattr(tv.datasets, "ImageFolder") and hasattr(tv.transforms, "ToTensor")
    original = torch.library.register_fake

    def failing(op, func=None, /, *args, **kwargs):
        message = "operator x::y does not exist" if "missing" in op else "another failure"

        def decorate(fn):
            raise RuntimeError(message)

        return decorate if func is None else decorate(func)

    monkeypatch.setattr(torch.library, "register_fake", failing)
    with _torchvision._tolerant_register_fake() as skipped:

        def kernel(x):
            return x

        assert torch.library.register_fake("x::missing")(kernel) is kernel
        assert torch.library.register_fake("x::missing", kernel) is kernel
        with pytest.raises(RuntimeError, match="another failure"):
            torch.library.register_fake("x::present")(kernel)
    assert skipped == ["x::missing", "x::missing"]
    assert torch.library.register_fake is failing  # restored
    monkeypatch.setattr(torch.library, "register_fake", original)
