"""flatlens.train.Trainer: metrics against dense float64 references, bit-exact resume,
atomic weights_only checkpoints, and clear errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import ModelSnapshot, tanh_classifier
from torch import nn

from flatlens.core import NonFiniteLossError
from flatlens.core._io import CheckpointError
from flatlens.data import synthetic_classification
from flatlens.optim import GAM, SAM
from flatlens.train import (
    TrainConfig,
    Trainer,
    build_model,
    build_optimizer,
    build_scheduler,
    train,
)
from flatlens.train._checkpoint import load_training_checkpoint

DATA = synthetic_classification(
    96, num_features=6, num_classes=3, num_test=48, seed=1, dtype=torch.float64
)


def net(seed: int = 0, dropout: float = 0.2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3)).to(
        torch.float64
    )


def make_optimizer(name: str, model: nn.Module):
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    if name == "sam":
        return SAM(model.parameters(), base, rho=0.05, model=model)
    if name == "gam":
        return GAM(model.parameters(), base, model=model)
    return base


def trainer_for(name: str, model: nn.Module, **kw) -> Trainer:
    optimizer = make_optimizer(name, model)
    target = getattr(optimizer, "base_optimizer", optimizer)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(target, T_max=4)
    return Trainer(model, optimizer, DATA, batch_size=20, scheduler=scheduler, seed=3, **kw)


def without_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize("name", ["sgd", "sam", "gam"])
def test_resumed_run_equals_uninterrupted_run(name, tmp_path):
    straight = trainer_for(name, net())
    outside = torch.get_rng_state()
    full = straight.fit(4)
    assert torch.equal(torch.get_rng_state(), outside)  # the caller's RNG is left alone

    first = trainer_for(name, net(), checkpoint_dir=tmp_path)
    first.fit(2)
    torch.manual_seed(999)  # the resumed process may be in any global RNG state
    resumed = trainer_for(name, net(seed=7))  # different initial weights, then overwritten
    resumed.load_checkpoint(tmp_path / "checkpoint.pt")
    assert resumed.epoch == 2
    result = resumed.fit(4)

    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert without_seconds(result.history) == without_seconds(full.history)
    base = getattr(resumed.optimizer, "base_optimizer", resumed.optimizer)
    assert base.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]


def test_an_interrupted_config_run_resumes_from_its_checkpoint_dir(tmp_path, monkeypatch):
    config = TrainConfig(
        model="mlp",
        model_kwargs={"hidden": 8},
        optimizer="gam",
        epochs=3,
        batch_size=32,
        dtype="float64",
        scheduler="cosine",
    )
    straight = train(config, DATA)

    real_epoch = Trainer.train_epoch

    def interrupted(self, total_epochs=None):
        if self.epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(self, total_epochs)

    saved = dataclasses.replace(config, checkpoint_dir=str(tmp_path))
    monkeypatch.setattr(Trainer, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(saved, DATA)
    monkeypatch.setattr(Trainer, "train_epoch", real_epoch)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 2

    resumed = train(saved, DATA)
    assert without_seconds(resumed.history) == without_seconds(straight.history)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    fresh = train(saved, DATA, resume=False)  # starts over and overwrites the checkpoint
    assert without_seconds(fresh.history) == without_seconds(straight.history)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 3


# ------------------------------------------------------------------ checkpoints
def test_checkpoint_is_weights_only_atomic_and_described_in_json(tmp_path):
    trainer = trainer_for("gam", net(), checkpoint_dir=tmp_path)
    trainer.fit(2)
    path = tmp_path / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    assert payload["epoch"] == 2
    assert set(payload["rng"]) >= {"shuffle", "torch"}
    assert all(isinstance(t, torch.Tensor) for t in payload["rng"].values())
    assert payload["optimizer"]["hyperparameters"]["mode"] == "accelerated"
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    assert meta["epoch"] == 2 and meta["checkpoint"] == "checkpoint.pt"
    assert without_seconds(meta["history"]) == without_seconds(trainer.history)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "checkpoint.pt"]


def test_corrupt_or_foreign_checkpoints_are_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_training_checkpoint(bad)
    foreign = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a flatlens training checkpoint"):
        load_training_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_training_checkpoint(tmp_path / "missing.pt")


def test_loading_into_a_trainer_without_scheduler_is_an_error(tmp_path):
    trainer_for("sgd", net(), checkpoint_dir=tmp_path).fit(1)
    model = net()
    plain = Trainer(model, make_optimizer("sgd", model), DATA)
    with pytest.raises(ValueError, match="scheduler"):
        plain.load_checkpoint(tmp_path / "checkpoint.pt")


# ------------------------------------------------------------------ metrics
def test_epoch_metrics_equal_dense_evaluation():
    model = net(dropout=0.0)
    trainer = Trainer(model, make_optimizer("sgd", model), DATA, batch_size=16, eval_batch_size=7)
    row = trainer.fit(1).final
    model.eval()
    with torch.no_grad():
        out_train, out_test = model(DATA.x_train), model(DATA.x_test)
    train_loss = nn.functional.cross_entropy(out_train, DATA.y_train).item()
    test_loss = nn.functional.cross_entropy(out_test, DATA.y_test).item()
    train_acc = (out_train.argmax(1) == DATA.y_train).double().mean().item()
    test_acc = (out_test.argmax(1) == DATA.y_test).double().mean().item()
    assert row["train_loss"] == pytest.approx(train_loss, rel=1e-12)
    assert row["test_loss"] == pytest.approx(test_loss, rel=1e-12)
    assert row["train_acc"] == pytest.approx(train_acc)
    assert row["test_acc"] == pytest.approx(test_acc)
    assert row["gap_loss"] == pytest.approx(test_loss - train_loss, rel=1e-10)
    assert row["gap_acc"] == pytest.approx(train_acc - test_acc)
    assert row["lambda_max"] is None  # not measured


def _subset_hessian(trainer: Trainer) -> torch.Tensor:
    x, y = trainer.measure_subset()
    model = trainer.model.eval()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [s.numel() for s in shapes]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def risk(flat):
        values = {n: c.view(s) for n, c, s in zip(names, flat.split(sizes), shapes, strict=True)}
        out = torch.func.functional_call(model, values, (x,))
        return nn.functional.cross_entropy(out, y)

    return torch.func.hessian(risk)(theta)


def test_measures_match_the_dense_hessian_of_the_fixed_subset_and_leave_the_model_alone():
    model = net(dropout=0.0)
    n = sum(p.numel() for p in model.parameters())
    trainer = Trainer(
        model,
        make_optimizer("sgd", model),
        DATA,
        measure_every=1,
        measures=("lambda_max", "trace"),
        measure_samples=40,
        trace_probes=3 * n,  # Hutch++ sketches the whole space: the trace is exact
    )
    trainer.fit(1)
    model.train()
    snapshot = ModelSnapshot.take(model)
    values = trainer.measure()
    snapshot.assert_unchanged(model)

    hessian = _subset_hessian(trainer)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    assert values["lambda_max"] == pytest.approx(eigenvalues[-1].item(), rel=1e-3)
    assert values["trace"] == pytest.approx(torch.trace(hessian).item(), rel=1e-8)
    # the second measurement warm-starts from the first one's eigenvector: the same value
    # within the tolerance of both (1e-4 relative)
    assert trainer.history[0]["lambda_max"] == pytest.approx(values["lambda_max"], rel=1e-4)
    assert len(trainer.measure_subset()[1]) == 40


def test_r0_and_r1_come_from_the_flatness_measures():
    import flatlens.measures._flatness as flatness
    import flatlens.measures._sharpness as sharpness
    from flatlens.core._objective import Objective
    from flatlens.data import batches

    model = net(dropout=0.0)
    trainer = Trainer(
        model,
        make_optimizer("sgd", model),
        DATA,
        measure_every=1,
        measures=("r0", "r1"),
        measure_samples=32,
        measure_rho=0.1,
        measure_steps=4,
    )
    row = trainer.fit(1).final
    x, y = trainer.measure_subset()
    objective = Objective(model, nn.CrossEntropyLoss(), batches(x, y, 512))
    r0 = sharpness.zeroth_order_sharpness(objective, 0.1, steps=4, seed=0).value
    r1 = flatness.first_order_flatness(objective, 0.1, steps=4, seed=0).value
    assert row["r0"] == pytest.approx(r0, rel=1e-6)
    assert row["r1"] == pytest.approx(r1, rel=1e-6)
    assert row["r0"] <= row["r1"] * (1 + 1e-6)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"measure_every": -1}, "measure_every"),
        ({"measures": ("sharpness",)}, "unknown measures"),
        ({"measure_rho": 0.0}, "measure_rho"),
        ({"trace_probes": 2}, "trace_probes"),
    ],
)
def test_bad_trainer_settings(kwargs, match):
    model = net()
    with pytest.raises(ValueError, match=match):
        Trainer(model, make_optimizer("sgd", model), DATA, **kwargs)


def test_bad_types_and_epochs():
    model = net()
    with pytest.raises(TypeError, match="optimizer"):
        Trainer(model, "sgd", DATA)
    with pytest.raises(TypeError, match="Dataset"):
        Trainer(model, make_optimizer("sgd", model), (DATA.x_train, DATA.y_train))
    trainer = Trainer(model, make_optimizer("sgd", model), DATA)
    with pytest.raises(ValueError, match="epochs"):
        trainer.fit(-1)
    trainer.fit(1)
    with pytest.raises(ValueError, match="already completed"):
        trainer.fit(0)


def test_build_model_takes_a_factory_spec_seeded_sized_and_placed():
    config = TrainConfig(
        model="helpers:tanh_classifier", model_kwargs={"hidden": 4}, seed=5, dtype="float64"
    )
    outside = torch.get_rng_state()
    model = build_model(config, DATA)
    assert torch.equal(torch.get_rng_state(), outside)  # seeded inside fork_rng
    torch.manual_seed(5)
    by_hand = tanh_classifier(in_features=6, num_classes=3, hidden=4).to(torch.float64)
    assert model.state_dict().keys() == by_hand.state_dict().keys()
    for (name, a), b in zip(model.state_dict().items(), by_hand.state_dict().values(), strict=True):
        assert a.dtype == torch.float64 and torch.equal(a, b), name
    # A zoo name and the same zoo factory spelled package.module:factory: identical weights.
    zoo_cfg = TrainConfig(model="mlp", model_kwargs={"hidden": 7}, seed=2)
    spelled = dataclasses.replace(zoo_cfg, model="flatlens.zoo:mlp")
    a, b = build_model(zoo_cfg, DATA).state_dict(), build_model(spelled, DATA).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_runs_a_factory_model_and_records_its_spec():
    config = TrainConfig(
        model="helpers:tanh_classifier",
        model_kwargs={"hidden": 4},
        optimizer="sam",
        epochs=2,
        batch_size=32,
        dtype="float64",
        seed=1,
    )
    result = train(config, DATA)
    assert result.settings["config"]["model"] == "helpers:tanh_classifier"
    assert result.model[1].weight.shape == (4, 6)
    # The run is the Trainer's run on the same model, optimizer and scheduler.
    model = build_model(config, DATA)
    optimizer = build_optimizer(config, model)
    alone = Trainer(
        model,
        optimizer,
        DATA,
        batch_size=32,
        scheduler=build_scheduler(config, optimizer),
        seed=1,
        measure_every=config.measure_every,
    ).fit(2)
    assert without_seconds(alone.history) == without_seconds(result.history)


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("no_such_module_xyz:net", ValueError, "cannot import model factory"),
        ("helpers:not_there", ValueError, "cannot import model factory"),
        ("helpers:tanh_classifier", ValueError, "does not take the arguments"),
    ],
)
def test_factory_errors_surface_when_the_model_is_built(spec, error, match):
    config = TrainConfig(model=spec, model_kwargs={"depth": 3}, epochs=1)
    with pytest.raises(error, match=match):
        train(config, DATA)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "lion"}, "optimizer"),
        ({"model": "vit"}, r"unknown model 'vit'; use one of \['cnn', 'mlp', 'resnet18', "),
        ({"model": "helpers:"}, "must look like package.module:factory"),
        ({"model": ":tanh_classifier"}, "must look like package.module:factory"),
        ({"scheduler": "linear"}, "scheduler"),
        ({"milestones": (0.5, 2.0)}, "milestones are fractions"),
        ({"lr_decay": 0.0}, "lr_decay"),
        ({"augment": "mixup"}, "augment"),
        ({"amp": "fp8"}, "amp"),
        ({"label_smoothing": 0.1, "loss": "mse"}, "label_smoothing applies"),
        ({"nesterov": True, "momentum": 0.0}, "nesterov"),
        ({"data_mean": (0.5,)}, "data_mean and data_std go together"),
        ({"recipe": "sgd-imagenet"}, "unknown recipe"),
        ({"dtype": "float16"}, "dtype"),
        ({"lr": 0}, "lr"),
    ],
)
def test_bad_train_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_a_model_that_is_not_a_string_is_a_type_error():
    with pytest.raises(TypeError, match="model must be a string"):
        TrainConfig(model=nn.Linear(2, 2))


def test_a_non_finite_training_loss_stops_with_a_clear_error():
    broken = synthetic_classification(
        32, num_features=6, num_classes=3, seed=1, dtype=torch.float64
    )
    broken.x_train[5, 2] = float("nan")
    model = net(dropout=0.0)
    with pytest.raises(NonFiniteLossError, match="learning rate"):
        Trainer(model, make_optimizer("sam", model), broken, batch_size=8).fit(1)


def test_a_diverging_run_raises_non_finite_loss_error_and_writes_no_checkpoint(tmp_path):
    config = TrainConfig(
        model="mlp",
        model_kwargs={"hidden": 8},
        lr=1e12,
        epochs=2,
        batch_size=16,
        dtype="float64",
        scheduler="none",
        checkpoint_dir=str(tmp_path),
    )
    with pytest.raises(NonFiniteLossError, match="training loss became nan in epoch 1") as info:
        train(config, DATA)
    assert isinstance(info.value, FloatingPointError)  # what callers catching the base see
    assert not (tmp_path / "checkpoint.pt").exists()


def test_the_trainer_does_not_import_the_command_line():
    import subprocess
    import sys

    code = (
        "import sys, flatlens.train; print(sorted(m for m in sys.modules if 'flatlens.cli' in m))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
