"""``flatlens train --resume`` never lies: a resumed run is the checkpoint's run or refused.

Every setting that changes the result is compared with the checkpoint's, and each
difference is named. A larger ``--epochs`` continues exactly as the longer run would have
run from the start when there is no schedule, and is refused with the cosine schedule
(whose learning rate at every epoch depends on the total); ``metrics.json`` records what
actually ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_util import one_error_line, run

from flatlens.core._io import load_checkpoint

BASE = ["--epochs", "2", "--batch-size", "256", "--quiet"]


def _train(out: Path, *extra: str) -> tuple[int, str]:
    code, _, err = run(["train", *BASE, "--out", str(out), *extra])
    return code, err


def _history(out: Path) -> list[dict]:
    rows = json.loads((out / "metrics.json").read_text())["history"]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_checkpoint(a / "model.pt"), load_checkpoint(b / "model.pt")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "sgd"
    assert _train(out)[0] == 0
    return out


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["--lr", "0.5"], "--lr 0.05 (checkpoint) != 0.5 (now)"),
        (["--optimizer", "sam"], "--optimizer 'sgd' (checkpoint) != 'sam' (now)"),
        (["--optimizer", "adamw"], "--optimizer 'sgd' (checkpoint) != 'adamw' (now)"),
        (["--batch-size", "64"], "--batch-size 256 (checkpoint) != 64 (now)"),
        (["--seed", "3"], "--seed 0 (checkpoint) != 3 (now)"),
        (["--scheduler", "none"], "--scheduler 'cosine' (checkpoint) != 'none' (now)"),
        (["--dtype", "float64"], "--dtype 'float32' (checkpoint) != 'float64' (now)"),
        (["--loss", "mse"], "--loss 'cross_entropy' (checkpoint) != 'mse' (now)"),
        (["--model-kwargs", '{"depth": 2}'], "--model-kwargs {} (checkpoint) != {'depth': 2}"),
        (["--measure-every", "1"], "--measure-every 0 (checkpoint) != 1 (now)"),
        (["--augment", "crop-flip"], "--augment 'none' (checkpoint) != 'crop-flip' (now)"),
        (["--amp", "bf16"], "--amp 'none' (checkpoint) != 'bf16' (now)"),
        (["--label-smoothing", "0.1"], "--label-smoothing 0.0 (checkpoint) != 0.1 (now)"),
        (["--momentum", "0.5"], "--momentum 0.9 (checkpoint) != 0.5 (now)"),
        (["--weight-decay", "0"], "--weight-decay 0.0005 (checkpoint) != 0.0 (now)"),
        (["--nesterov"], "--nesterov False (checkpoint) != True (now)"),
        (["--warmup-epochs", "1"], "--warmup-epochs 0 (checkpoint) != 1 (now)"),
        (["--measure-budget", "none"], "--measure-budget 40.0 (checkpoint) != None (now)"),
        (["--critical-every-steps", "2"], "--critical-every-steps 0 (checkpoint) != 2 (now)"),
        (["--data-mean", "0.5", "--data-std", "0.2"], "--data-mean None (checkpoint) != [0.5]"),
        (["--epochs", "4"], "--epochs 2 (checkpoint) != 4 (now); a cosine schedule spans"),
        (["--epochs", "1"], "--epochs '2 completed' (checkpoint) != 1 (now)"),
    ],
)
def test_a_changed_setting_is_refused_and_named(sgd_run, change, named):
    before = (sgd_run / "metrics.json").read_bytes()
    code, err = _train(sgd_run, "--resume", *change)
    assert code == 2
    line = one_error_line(err, "train")
    assert named in line, line
    assert "Pass the checkpoint's settings to continue it" in line
    assert (sgd_run / "metrics.json").read_bytes() == before


def test_several_changes_are_all_named(sgd_run):
    code, err = _train(
        sgd_run, "--resume", "--lr", "0.1", "--sam-rho", "0.2", "--measure-rho", "0.1",
        "--optimizer", "sam",
    )  # fmt: skip
    line = one_error_line(err, "train")
    assert code == 2
    for option in ("--optimizer", "--lr", "--sam-rho", "--measure-rho"):
        assert f"{option} " in line


def test_other_data_are_refused(sgd_run, tmp_path, monkeypatch):
    (tmp_path / "otherdata.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def make():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return TensorDataset(torch.rand(40, 1, 8, 8, generator=g), torch.arange(40) % 10)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code, err = _train(sgd_run, "--resume", "--data", "otherdata:make")
    assert code == 2 and "--data 'digits' (checkpoint) != 'otherdata:make'" in err


def test_the_same_settings_resume_and_a_finished_run_stays_the_same(sgd_run):
    before = _history(sgd_run)
    code, err = _train(sgd_run, "--resume")
    assert code == 0, err
    assert _history(sgd_run) == before


def test_without_a_schedule_more_epochs_continue_exactly_as_the_longer_run(tmp_path):
    short, straight = tmp_path / "short", tmp_path / "straight"
    assert _train(short, "--scheduler", "none")[0] == 0
    code, err = _train(short, "--scheduler", "none", "--epochs", "4", "--resume")
    assert code == 0, err
    assert _train(straight, "--scheduler", "none", "--epochs", "4")[0] == 0
    assert _history(short) == _history(straight)
    assert [r["epoch"] for r in _history(short)] == [1, 2, 3, 4]
    assert _same_weights(short, straight)
    recorded = json.loads((short / "metrics.json").read_text())["settings"]["config"]
    assert recorded["epochs"] == 4 and recorded["scheduler"] == "none"  # what ran


def test_an_interrupted_cosine_run_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    """Kill-and-resume through the command: Ctrl-C after the first of 3 epochs, then
    ``--resume`` with the same settings gives the uninterrupted run bit for bit."""
    from flatlens.train._trainer import Trainer

    real = Trainer.train_epoch
    calls = []

    def dies_in_the_second_epoch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    cut, straight = tmp_path / "cut", tmp_path / "straight"
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_epoch", dies_in_the_second_epoch)
        code, _, err = run(["train", *BASE, "--epochs", "3", "--out", str(cut)])
    assert code == 130 and "--resume" in err
    assert not (cut / "model.pt").exists() and (cut / "checkpoints" / "checkpoint.pt").is_file()
    code, err = _train(cut, "--epochs", "3")  # without --resume: refused, not restarted
    assert code == 2 and "--resume to continue it" in err
    assert _train(cut, "--epochs", "3", "--resume")[0] == 0
    assert _train(straight, "--epochs", "3")[0] == 0
    assert _history(cut) == _history(straight)
    lrs = [r["lr"] for r in _history(cut)]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] == 0.05  # one cosine, never restarted
    assert _same_weights(cut, straight)


def test_resume_without_a_checkpoint_beside_other_outputs_is_refused(tmp_path):
    out = tmp_path / "run"
    assert _train(out)[0] == 0
    for f in (out / "checkpoints").iterdir():
        f.unlink()
    code, err = _train(out, "--resume")
    assert code == 2 and "finds no checkpoints/checkpoint.pt" in one_error_line(err, "train")
    code, err = _train(tmp_path / "new", "--resume")  # nothing there yet: a new run
    assert code == 0, err
