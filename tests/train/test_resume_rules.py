"""flatlens.train.train(resume=True) resumes only the checkpoint's own run; losses by name;
untrainable models and ill-fitting checkpoints are clear errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from flatlens.core._io import CheckpointError
from flatlens.data import synthetic_classification
from flatlens.train import TrainConfig, Trainer, train
from flatlens.train._losses import LOSSES, MSELoss, build_loss
from flatlens.train._resume import resume_conflicts
from flatlens.train._trainer import CHECKPOINT_NAME

DATA = synthetic_classification(64, num_features=5, num_classes=3, num_test=32, seed=2)


def _config(tmp_path, **kw) -> TrainConfig:
    base = {"model_kwargs": {"hidden": 6}, "epochs": 2, "batch_size": 32}
    return TrainConfig(checkpoint_dir=str(tmp_path), **{**base, **kw})


def _rows(result):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in result.history]


def test_every_result_setting_is_compared(tmp_path):
    config = _config(tmp_path)
    train(config, DATA)
    payload = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert resume_conflicts(config, DATA, payload, "c.pt") == []
    changed = dataclasses.replace(config, lr=0.5, optimizer="sam", momentum=0.5, device="cpu")
    names = [name for name, _, _ in resume_conflicts(changed, DATA, payload, "c.pt")]
    assert names == ["optimizer", "lr", "momentum"]  # the device may change
    other = synthetic_classification(64, num_features=5, num_classes=3, num_test=32, seed=3)
    assert [n for n, _, _ in resume_conflicts(config, other, payload, "c.pt")] == ["data"]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"lr": 0.5}, "lr 0.05 (checkpoint) != 0.5 (now)"),
        ({"optimizer": "adamw"}, "optimizer 'sgd' (checkpoint) != 'adamw' (now)"),
        ({"loss": "mse"}, "loss 'cross_entropy' (checkpoint) != 'mse' (now)"),
        ({"epochs": 4}, "epochs 2 (checkpoint) != 4 (now)"),
    ],
)
def test_train_refuses_to_resume_another_run(tmp_path, change, named):
    config = _config(tmp_path)
    train(config, DATA)
    with pytest.raises(CheckpointError, match="cannot resume") as info:
        train(dataclasses.replace(config, **change), DATA)
    assert named in str(info.value)


def test_without_a_schedule_a_longer_run_continues_exactly(tmp_path):
    config = _config(tmp_path / "a", scheduler="none")
    train(config, DATA)
    longer = train(dataclasses.replace(config, epochs=4), DATA)
    straight = train(dataclasses.replace(config, epochs=4, checkpoint_dir=None), DATA)
    assert _rows(longer) == _rows(straight)
    assert longer.settings["config"]["epochs"] == 4
    for a, b in zip(longer.model.parameters(), straight.model.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="'4 completed'"):
        train(dataclasses.replace(config, epochs=3), DATA)


def test_a_checkpoint_without_run_settings_is_not_resumed(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), DATA)
    trainer.save_checkpoint(tmp_path / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match="records no run settings"):
        train(_config(tmp_path), DATA)


def test_a_state_that_does_not_fit_the_trainer_is_a_checkpoint_error(tmp_path):
    def make(optimizer: str) -> Trainer:
        torch.manual_seed(0)
        model = nn.Linear(5, 3)
        opt = (
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            if optimizer == "sgd"
            else torch.optim.AdamW(model.parameters())
        )
        return Trainer(model, opt, DATA)

    first = make("sgd")
    first.fit(1)
    first.save_checkpoint(tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="does not fit this trainer"):
        make("adamw").load_checkpoint(tmp_path / "c.pt")


def test_a_model_without_trainable_parameters_is_refused():
    model = nn.Linear(5, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), DATA)


# ------------------------------------------------------------------ losses
def test_losses_by_name_class_and_callable(tmp_path, monkeypatch):
    (tmp_path / "my_losses.py").write_text(
        "import torch\n"
        "def twice(outputs, targets):\n"
        "    return 2 * torch.nn.functional.cross_entropy(outputs, targets)\n"
        "class Smooth(torch.nn.CrossEntropyLoss):\n"
        "    def __init__(self):\n        super().__init__(label_smoothing=0.2)\n"
        "class NeedsArgs(torch.nn.Module):\n"
        "    def __init__(self, scale):\n        super().__init__()\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert set(LOSSES) == {"cross_entropy", "smooth_cross_entropy", "mse"}
    assert isinstance(build_loss("cross_entropy"), nn.CrossEntropyLoss)
    assert isinstance(build_loss("mse"), MSELoss)
    assert build_loss("my_losses:twice").__name__ == "twice"
    assert build_loss("my_losses:Smooth").label_smoothing == 0.2
    for spec, match in (
        ("my_losses:NeedsArgs", "cannot be built without arguments"),
        ("my_losses:NOT_CALLABLE", "is a int, not a callable"),
        ("my_losses:nothing", "has no attribute 'nothing'"),
        ("huber", "unknown loss 'huber'"),
    ):
        with pytest.raises(ValueError, match=match):
            build_loss(spec)
    with pytest.raises(ValueError, match="unknown loss"):
        TrainConfig(loss="l1")


def test_mse_takes_class_labels_as_one_hot_and_float_targets_as_they_are():
    outputs = torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([2, 1])
    expected = ((outputs - torch.eye(3)[labels]) ** 2).mean()
    assert torch.equal(MSELoss()(outputs, labels), expected)
    column = torch.tensor([[1.0], [2.0]])
    assert MSELoss()(column, torch.tensor([1.0, 4.0])) == pytest.approx(2.0)  # no broadcast
    assert MSELoss.reduction == "mean"


def test_train_uses_the_configured_loss():
    config = TrainConfig(model_kwargs={"hidden": 6}, epochs=1, batch_size=32, loss="mse")
    result = train(config, DATA)
    model = result.model.eval()
    with torch.no_grad():
        expected = MSELoss()(model(DATA.x_train), DATA.y_train).item()
    assert result.final["train_loss"] == pytest.approx(expected, rel=1e-5)
    assert result.settings["config"]["loss"] == "mse"
