"""``flatlens train`` as researchers train: a published recipe on a CIFAR-10 folder end to end,
``--print-config``, options over the recipe, logs, TensorBoard and the measures' costs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from cli_util import one_error_line, run, run_cli

from flatlens.train import RECIPES

PER_FILE = 32


def cifar10_folder(root: Path) -> Path:
    """A CIFAR-10 python folder with 32 random images in each of its six batch files."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        data = rng.integers(0, 256, size=(PER_FILE, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=PER_FILE).tolist()
        with (folder / name).open("wb") as fh:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, fh)
    return root


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    return cifar10_folder(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="module")
def gam_run(cifar, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gam") / "run"
    proc = run_cli(
        "train", "--recipe", "gam-cifar10-resnet18", "--data", f"cifar10:{cifar}",
        "--epochs", "1", "--model-kwargs", '{"width": 4}', "--threads", "1",
        "--critical-every-steps", "1", "--measure-samples", "16", "--out", str(out),
        "--quiet", cwd=out.parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_the_gam_recipe_trains_end_to_end_on_a_cifar10_folder(gam_run):
    metrics = json.loads((gam_run / "metrics.json").read_text())
    config = metrics["settings"]["config"]
    recipe = RECIPES["gam-cifar10-resnet18"].settings
    overridden = {"epochs": 1, "model_kwargs": {"width": 4}}
    for name, value in recipe.items():
        expected = overridden.get(name, value)
        got = config[name]
        assert (list(got) if isinstance(got, tuple) else got) == (
            list(expected) if isinstance(expected, tuple) else expected
        ), name
    assert config["recipe"] == "gam-cifar10-resnet18"
    assert (
        metrics["settings"]["data"] == "cifar10" and metrics["settings"]["data_path"] == "streams"
    )
    assert metrics["settings"]["augment_implementation"].startswith(
        ("torchvision.transforms.v2", "tensor")
    )
    assert "official=True" in metrics["settings"]["optimizer"]
    final = metrics["final"]
    assert final["epoch"] == 1 and final["step"] == 2  # 160 images, batch 128
    assert final["lambda_c"] is not None
    costs = metrics["costs"]
    assert costs["measures"]["lambda_c"]["count"] == 2 and costs["overhead"] > 0
    lines = [json.loads(x) for x in (gam_run / "log.jsonl").read_text().splitlines()]
    assert [x["event"] for x in lines].count("step") == 2
    assert {"model.pt", "metrics.json", "log.jsonl", "checkpoints"} <= {
        p.name for p in gam_run.iterdir()
    }


def test_print_config_resolves_recipe_and_options_and_writes_nothing(tmp_path):
    code, out, err = run(
        ["train", "--recipe", "asam-cifar10-wrn16-8", "--epochs", "3", "--lr", "0.05",
         "--print-config", "--out", str(tmp_path / "o")]
    )  # fmt: skip
    assert code == 0, err
    shown = json.loads(out)
    assert shown["config"]["epochs"] == 3 and shown["config"]["lr"] == 0.05
    assert shown["config"]["sam_rho"] == 2.0 and shown["config"]["sam_adaptive"] is True
    assert shown["config"]["model_kwargs"] == {"layout": "davda54", "dropout": 0.0}
    assert shown["overridden"] == ["epochs", "lr"]
    assert "example/train.py:27" in shown["sources"]["sam_rho"]
    assert shown["published_data"] == "cifar10"
    assert not (tmp_path / "o").exists()


def test_options_without_a_recipe_reach_the_config(tmp_path):
    argv = [
        "train", "--print-config", "--momentum", "0.8", "--weight-decay", "0", "--nesterov",
        "--label-smoothing", "0.2", "--warmup-epochs", "2", "--scheduler", "step",
        "--milestones", "0.4,0.7", "--lr-decay", "0.5", "--augment", "crop-flip-cutout",
        "--augment-on", "workers", "--num-workers", "2", "--amp", "bf16",
        "--measure-budget", "none", "--critical-every-steps", "5", "--measure-every-steps",
        "10", "--sam-adaptive", "--data-mean", "0.5", "--data-std", "0.25",
    ]  # fmt: skip
    code, out, err = run(argv)
    assert code == 0, err
    c = json.loads(out)["config"]
    assert (c["momentum"], c["weight_decay"], c["nesterov"], c["label_smoothing"]) == (
        0.8, 0.0, True, 0.2
    )  # fmt: skip
    assert (c["scheduler"], c["milestones"], c["lr_decay"], c["warmup_epochs"]) == (
        "step", [0.4, 0.7], 0.5, 2
    )  # fmt: skip
    assert (c["augment"], c["augment_on"], c["num_workers"], c["amp"]) == (
        "crop-flip-cutout", "workers", 2, "bf16"
    )  # fmt: skip
    assert c["measure_budget"] is None and c["critical_every_steps"] == 5
    assert c["sam_adaptive"] is True and c["data_mean"] == [0.5] and c["data_std"] == [0.25]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--milestones", "0.5,1.5"], "fractions of the epochs in (0, 1)"),
        (["--label-smoothing", "1"], "expected a number in [0, 1)"),
        (["--recipe", "sgd-cifar10"], "invalid choice: 'sgd-cifar10'"),
        (["--data-mean", "0.5"], "data_mean and data_std go together"),
        (["--nesterov", "--momentum", "0"], "nesterov needs SGD with momentum"),
        (["--measure-budget", "-1"], "expected a finite number > 0"),
    ],
)
def test_bad_training_options_are_one_line(tmp_path, argv, message):
    code, _, err = run(["train", *argv, "--out", str(tmp_path / "o")])
    assert code == 2
    assert message in one_error_line(err, "train")


def test_tensorboard_and_logs_on_digits(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    code, _, err = run(
        ["train", "--epochs", "1", "--batch-size", "256", "--tensorboard", "--log-every", "2",
         "--augment", "crop-flip", "--model", "cnn", "--out", str(out), "--quiet"]
    )  # fmt: skip
    assert code == 0, err
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    lines = (out / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["event"] for x in lines] == ["step"] * 3 + ["epoch"]  # 6 steps
