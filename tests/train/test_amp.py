"""Mixed precision: bf16 trains the digits CNN to float32's accuracy; fp16 with a GradScaler
(plain optimizers and SAM/GAM) where the device supports it; measures stay in float32."""

from __future__ import annotations

import pytest
import torch

from flatlens.data import load_digits
from flatlens.train import TrainConfig, Trainer, build_model, build_optimizer, train


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    return load_digits(image=True)


def _fp16_supported() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.ones(2, 2) @ torch.ones(2, 2)
        torch.amp.GradScaler("cpu")
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


def test_bf16_reaches_the_float32_test_accuracy_on_digits(digits):
    common = {"model": "cnn", "epochs": 6, "batch_size": 64, "lr": 0.05, "seed": 1}
    full = train(TrainConfig(**common), digits)
    mixed = train(TrainConfig(**common, amp="bf16"), digits)
    assert abs(mixed.final["test_acc"] - full.final["test_acc"]) <= 0.02
    assert mixed.final["test_acc"] > 0.9
    assert mixed.settings["amp"] == "bf16"
    assert all(p.dtype == torch.float32 for p in mixed.model.parameters())
    # the runs differ (autocast really ran in bf16)
    a, b = full.model.state_dict(), mixed.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not _fp16_supported(), reason="no float16 autocast on this device")
@pytest.mark.parametrize("optimizer", ["sgd", "gam"])
def test_fp16_trains_with_a_grad_scaler_and_checkpoints_it(digits, optimizer, tmp_path):
    import dataclasses

    small = dataclasses.replace(digits, x_train=digits.x_train[:384], y_train=digits.y_train[:384])
    config = TrainConfig(
        model="cnn", epochs=2, batch_size=64, lr=0.05, amp="fp16", optimizer=optimizer,
        measure_every=2, measures=("lambda_max",), measure_samples=64,
        checkpoint_dir=str(tmp_path),
    )  # fmt: skip
    result = train(config, small)
    running = [row["train_loss_running"] for row in result.history]
    assert running[1] < running[0]
    assert result.final["lambda_max"] is not None  # measured in float32
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert payload["extra"]["scaler"]["scale"] > 0
    model = build_model(config, small)
    trainer = Trainer(model, build_optimizer(config, model), small, amp="fp16")
    assert trainer.stepper.scaler is not None
    if optimizer != "sgd":  # SAM and GAM unscale every pass themselves
        assert trainer.optimizer.grad_scaler is trainer.stepper.scaler


def test_amp_needs_float32_parameters(digits):
    config = TrainConfig(model="cnn", dtype="float64")
    model = build_model(config, digits)
    with pytest.raises(ValueError, match="float32"):
        Trainer(model, build_optimizer(config, model), digits, amp="bf16")
