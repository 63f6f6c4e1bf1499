"""The ``flatlens`` command end to end: every subcommand through ``python -m flatlens`` in a
subprocess on small settings, plus its error paths (one line on stderr, exit code 2)."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch

from flatlens.cli._main import main
from flatlens.core._io import load_checkpoint
from flatlens.report._diagnose import PARTS
from flatlens.train import load_training_checkpoint
from flatlens.zoo import mlp

TIMEOUT = 300


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m flatlens ARGS`` with one torch thread (the test machine is shared)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("FLATLENS_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "flatlens", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def ok_json(proc: subprocess.CompletedProcess) -> dict:
    """The JSON a successful ``--json`` run printed: stdout must hold nothing else."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``main`` in-process; argparse's own exits count as return codes."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"flatlens {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """One epoch of SGD on digits through the CLI; shared by the tests that need weights."""
    out = tmp_path_factory.mktemp("train")
    proc = run_cli("train", "--epochs", "1", "--out", "run", "--json", "--quiet", cwd=out)
    return {"result": ok_json(proc), "dir": out / "run", "model": out / "run" / "model.pt"}


# ---------------------------------------------------------------------- subcommands
def test_train_writes_weights_metrics_and_a_resumable_checkpoint(trained):
    result, run = trained["result"], trained["dir"]
    assert result["kind"] == "TrainResult"
    assert [row["epoch"] for row in result["history"]] == [1]
    final = result["final"]
    assert final["gap_loss"] == pytest.approx(final["test_loss"] - final["train_loss"])
    assert 0 <= final["test_acc"] <= 1
    assert result["settings"]["config"]["model"] == "mlp"
    for name in ("model.pt", "metrics.json", "checkpoints/checkpoint.pt"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["history"] == result["history"]
    state = load_checkpoint(run / "model.pt")
    payload = load_training_checkpoint(run / "checkpoints" / "checkpoint.pt")
    assert payload["epoch"] == 1
    assert state.keys() == payload["model"].keys()
    assert all(torch.equal(state[k], payload["model"][k]) for k in state)
    mlp(in_features=64, num_classes=10).load_state_dict(state)  # the zoo architecture


def test_diagnose_quick_then_resume_reuses_every_part(trained, tmp_path):
    ckpt = str(trained["model"])
    args = ["diagnose", "--model", "mlp", "--checkpoint", ckpt, "--quick", "--out", "d"]
    first = run_cli(*args, "--json", cwd=tmp_path)
    report = ok_json(first)
    assert "lanczos" in first.stderr  # progress bars by default, on stderr only

    out = tmp_path / "d"
    assert report["reused_parts"] == []
    assert report["computed_parts"] == list(PARTS)
    eig = report["spectrum"]["eigenvalues"]
    assert len(eig) == 3 and eig == sorted(eig, reverse=True)
    assert report["summary"]["λ_max"] == eig[0]
    assert report["summary"]["trace"] == report["trace"]["value"]
    perf = report["performance"]
    assert perf["train_accuracy"] == pytest.approx(trained["result"]["final"]["train_acc"])
    assert perf["gap_loss"] == pytest.approx(perf["test_loss"] - perf["train_loss"])
    rows = report["sharpness"]["bound"]["rows"]
    assert [r["rho"] for r in rows] == [0.01, 0.02, 0.05]
    assert all(r["holds"] == (r["r0"] <= r["r1"]) for r in rows)
    for name in ("landscape_1d", "landscape_2d"):
        land = report["landscape"][name]
        assert land["loss_min"] <= land["loss_center"] <= land["loss_max"]
        assert (out / land["path"]).is_file()
    for name in ("report.json", "report.html", "figures/spectrum.png", "figures/density.png"):
        assert (out / name).is_file(), name
    for name in ("bound.png", "landscape_1d.png", "landscape_2d.png"):
        assert (out / "figures" / name).is_file(), name
    stored = json.loads((out / "report.json").read_text())
    assert stored == {k: v for k, v in report.items() if k != "files"}
    assert "Loss landscape" in (out / "report.html").read_text()
    parts = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "parts").iterdir()}
    assert sorted(parts) == sorted(f"{p}.json" for p in PARTS)

    second = run_cli(*args, "--resume", "--quiet", "--json", cwd=tmp_path)
    again = ok_json(second)
    assert "it/s" not in second.stderr and "lanczos" not in second.stderr  # --quiet
    assert again["reused_parts"] == list(PARTS)
    assert again["computed_parts"] == []
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "parts").iterdir()}
    assert after == parts  # nothing was rewritten
    for key in ("performance", "spectrum", "trace", "density", "sharpness", "summary"):
        assert again[key] == report[key]


def test_compare_two_optimizers_two_seeds(tmp_path):
    proc = run_cli(
        "compare", "--epochs", "1", "--optimizers", "sgd,sam", "--seeds", "0,1",
        "--measure-steps", "2", "--measure-samples", "64", "--out", "c", "--quiet", "--json",
        cwd=tmp_path,
    )  # fmt: skip
    study = ok_json(proc)
    assert [(r["optimizer"], r["seed"]) for r in study["runs"]] == [
        ("sgd", 0),
        ("sgd", 1),
        ("sam", 0),
        ("sam", 1),
    ]
    assert [s["optimizer"] for s in study["summary"]] == ["sgd", "sam"]
    assert set(study["kendall"]) == {"lambda_max", "trace", "r0", "r1"}
    for measure, gaps in study["kendall"].items():
        assert all(r[measure] is not None for r in study["runs"])
        assert gaps["gap_loss"]["n"] == 4
    for name in ("study.json", "flatness_vs_gap.png", "report.html"):
        assert (tmp_path / "c" / name).is_file(), name
    html = (tmp_path / "c" / "report.html").read_text()
    assert "Kendall" in html and "data:image/png;base64," in html


def test_bound_two_radii(trained, tmp_path):
    proc = run_cli(
        "bound", "--model", "mlp", "--checkpoint", str(trained["model"]),
        "--measure-rho", "0.05,0.01", "--steps", "3", "--samples", "128", "--out", "b", "--json",
        "--quiet", cwd=tmp_path,
    )  # fmt: skip
    report = ok_json(proc)
    assert report["kind"] == "BoundReport"
    rows = report["rows"]
    assert [r["rho"] for r in rows] == [0.01, 0.05]
    assert report["all_hold"] == all(r["r0"] <= r["r1"] for r in rows)
    for r in rows:
        assert r["lambda_max"] == report["lambda_max"]
        assert r["rho2_lambda"] == pytest.approx(r["rho"] ** 2 * report["lambda_max"])
    assert report["steps"] == 3
    assert json.loads((tmp_path / "b" / "bound.json").read_text())["rows"] == rows
    assert (tmp_path / "b" / "bound.png").is_file()


def test_bound_under_a_memory_budget_streams_to_the_same_answer(trained, tmp_path):
    reports = {}
    for name, extra in (("cached", []), ("streamed", ["--memory-budget", "1K"])):
        proc = run_cli(
            "bound", "--model", "mlp", "--checkpoint", str(trained["model"]),
            "--measure-rho", "0.05", "--steps", "2", "--samples", "128", "--batch-size", "64",
            "--out", name, "--json", "--quiet", *extra, cwd=tmp_path,
        )  # fmt: skip
        reports[name] = ok_json(proc)
    cached, streamed = reports["cached"], reports["streamed"]
    assert streamed["lambda_max"] == pytest.approx(cached["lambda_max"], rel=1e-4)
    assert streamed["rows"][0]["r1"] == pytest.approx(cached["rows"][0]["r1"], rel=1e-4)


def test_sizes_in_bytes():
    from flatlens.cli._argtypes import _bytes

    assert _bytes("3G") == _bytes("3GiB") == _bytes("3gb") == 3 * 2**30
    assert _bytes("500M") == 500 * 2**20 and _bytes("2e9") == 2e9 and _bytes("1.5K") == 1536
    assert _bytes(" 2 g ") == 2 * 2**30 and _bytes("100B") == 100 and _bytes("1kb") == 1024
    for bad in ("", "G", "-1G", "0", "0.5", "nan", "inf", "lots", "3X", "3I", "3BB"):
        with pytest.raises(argparse.ArgumentTypeError):
            _bytes(bad)


@pytest.mark.parametrize("dim", [1, 2])
def test_landscape_slices(trained, tmp_path, dim):
    proc = run_cli(
        "landscape", "--model", "mlp", "--checkpoint", str(trained["model"]),
        "--dim", str(dim), "--num-points", "5", "--samples", "128", "--out", "l", "--json",
        "--quiet", "--vtk", cwd=tmp_path,
    )  # fmt: skip
    summary = ok_json(proc)
    assert summary["shape"] == [5] * dim
    assert summary["loss_min"] <= summary["loss_center"] <= summary["loss_max"]
    assert summary["num_evaluated"] == 5**dim
    assert (summary["cosine_d1_d2"] is None) == (dim == 1)
    for path in summary["files"]:
        assert (tmp_path / path).is_file(), path
    stem = "line" if dim == 1 else "plane"
    assert {Path(p).name for p in summary["files"]} >= {f"{stem}.npz", f"{stem}.png", f"{stem}.vtp"}
    piece = ElementTree.parse(tmp_path / "l" / f"{stem}.vtp").getroot().find("PolyData/Piece")
    assert piece.get("NumberOfPoints") == str(5**dim)


# ---------------------------------------------------------------------- checkpoint errors
class _RunsCode:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
def test_code_running_checkpoint_is_refused_without_running(tmp_path, capsys, fmt):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    if fmt == "torch.save":
        torch.save({"model": {"0.weight": _RunsCode(marker)}}, evil)
    else:
        evil.write_bytes(pickle.dumps({"0.weight": _RunsCode(marker)}))
    argv = ["diagnose", "--model", "mlp", "--checkpoint", str(evil), "--out", str(tmp_path / "x")]
    code, out, err = call(argv, capsys)
    assert (code, out) == (2, "")
    line = one_error_line(err, "diagnose")
    assert "refused" in line and "arbitrary code" in line
    assert not marker.exists()
    assert not (tmp_path / "x").exists()


def test_truncated_and_missing_checkpoints(trained, tmp_path, capsys):
    data = trained["model"].read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    code, out, err = call(["bound", "--model", "mlp", "--checkpoint", str(cut)], capsys)
    assert (code, out) == (2, "")
    assert "truncated or corrupt" in one_error_line(err, "bound")
    missing = tmp_path / "nope.pt"
    code, out, err = call(["landscape", "--model", "mlp", "--checkpoint", str(missing)], capsys)
    assert (code, out) == (2, "")
    assert f"{missing} does not exist" in one_error_line(err, "landscape")


def test_architecture_mismatch_lists_missing_and_unexpected_keys(trained, tmp_path, capsys):
    ckpt = str(trained["model"])
    code, _, err = call(["diagnose", "--model", "cnn", "--checkpoint", ckpt, "--out", "x"], capsys)
    assert code == 2
    line = one_error_line(err, "diagnose")
    assert "does not fit the model" in line
    assert "missing keys [0.weight, 1.running_mean" in line
    assert "unexpected keys [3.bias, 5.weight, 5.bias]" in line
    code, _, err = call(
        ["bound", "--model", "mlp", "--model-kwargs", '{"hidden": 8}', "--checkpoint", ckpt],
        capsys,
    )
    assert code == 2
    assert "1.weight (64, 64) vs (8, 64)" in one_error_line(err, "bound")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--data", "mnist"], "unknown data set 'mnist'"),
        (["--data", "cifar10"], "needs a folder"),
        (["--data", "cifar100:/no/such/folder"], "does not exist"),
        (["--model", "nope"], "unknown model 'nope'"),
        (["--model", "no_such_module:factory"], "cannot import model factory"),
        (["--model-kwargs", "{bad"], "--model-kwargs is not valid JSON"),
        (["--model-kwargs", "[1]"], "--model-kwargs must be a JSON object"),
        (["--model-kwargs", '{"hiddn": 3}'], "unexpected keyword argument 'hiddn'"),
        (["--measure-rho", "abc"], "argument --measure-rho"),
        (["--measure-rho=-0.1"], "argument --measure-rho"),
        (["--measure-rho", "0.1,0"], "argument --measure-rho"),
        (["--k", "0"], "argument --k"),
        (["--samples", "-3"], "argument --samples"),
        (["--batch-size", "0"], "argument --batch-size"),
        (["--memory-budget", "lots"], "argument --memory-budget"),
        (["--memory-budget", "0"], "argument --memory-budget"),
        (["--device", "cuda:99"], "--device cuda:99 is not available"),
    ],
)
def test_bad_options_give_one_line_and_exit_2(trained, tmp_path, capsys, options, message):
    argv = ["diagnose", "--model", "mlp", "--checkpoint", str(trained["model"])]
    argv += ["--out", str(tmp_path / "x"), *options]
    code, out, err = call(argv, capsys)
    assert (code, out) == (2, "")
    assert message in one_error_line(err, "diagnose")
    assert not (tmp_path / "x").exists()


def test_non_finite_training_loss_exits_1_in_one_line(tmp_path, capsys):
    argv = ["train", "--epochs", "1", "--lr", "1e12", "--out", str(tmp_path), "--quiet"]
    code, out, err = call(argv, capsys)
    assert (code, out) == (1, "")
    assert "training loss became" in one_error_line(err, "train")


@pytest.mark.parametrize("command", ["bound", "diagnose"])
def test_nan_weights_exit_1_in_one_line(tmp_path, capsys, command):
    nan = {k: torch.full_like(v, float("nan")) for k, v in mlp().state_dict().items()}
    torch.save(nan, tmp_path / "nan.pt")
    argv = [command, "--model", "mlp", "--checkpoint", str(tmp_path / "nan.pt")]
    argv += ["--samples", "64", "--out", str(tmp_path / "out"), "--quiet"]
    code, out, err = call(argv, capsys)
    assert (code, out) == (1, "")
    assert "nan" in one_error_line(err, command).lower()  # the non-finite loss or weights


def test_a_non_finite_loss_exits_1_even_if_it_were_a_value_error(monkeypatch, capsys):
    import flatlens.cli._commands
    from flatlens.core import NonFiniteLossError

    class Both(NonFiniteLossError, ValueError):
        pass

    def diverged(args):
        raise Both("the loss is inf")

    monkeypatch.setattr(flatlens.cli._commands, "cmd_bound", diverged)
    code, out, err = call(["bound", "--model", "mlp", "--checkpoint", "x.pt"], capsys)
    assert (code, out) == (1, "")
    assert "the loss is inf" in one_error_line(err, "bound")


def test_version(capsys):
    code, out, _ = call(["--version"], capsys)
    assert code == 0 and out.startswith("flatlens ")


# ---------------------------------------------------------------------- factory models
_FACTORY = """
from torch import nn

def tiny(in_features, num_classes, width=4):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.Tanh(),
                         nn.Linear(width, num_classes))

def not_a_model():
    return 3
"""


def test_train_accepts_a_factory_and_matches_the_zoo_path(tmp_path, capsys, monkeypatch):
    (tmp_path / "tinynets.py").write_text(_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    common = ["train", "--epochs", "1", "--quiet", "--seed", "3"]

    # The same zoo network by name and as package.module:factory: identical weights.
    assert call([*common, "--model", "mlp", "--out", str(tmp_path / "zoo")], capsys)[0] == 0
    assert (
        call([*common, "--model", "flatlens.zoo:mlp", "--out", str(tmp_path / "f")], capsys)[0] == 0
    )
    a, b = (
        load_checkpoint(tmp_path / "zoo" / "model.pt"),
        load_checkpoint(tmp_path / "f" / "model.pt"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    out = tmp_path / "tiny"
    argv = [
        *common,
        "--model",
        "tinynets:tiny",
        "--model-kwargs",
        '{"width": 3}',
        "--scheduler",
        "none",  # without a schedule a run can be extended (see tests/cli/test_resume.py)
        "--out",
        str(out),
    ]
    assert call(argv, capsys)[0] == 0
    state = load_checkpoint(out / "model.pt")
    assert state["1.weight"].shape == (3, 64)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["config"]["model"] == "tinynets:tiny"
    assert metrics["settings"]["config"]["model_kwargs"] == {"width": 3}

    # --resume continues to epoch 2 from the checkpoint; another width is refused.
    code, _, _ = call([*argv[:2], "2", *argv[3:], "--resume"], capsys)
    assert code == 0
    assert [r["epoch"] for r in json.loads((out / "metrics.json").read_text())["history"]] == [1, 2]
    wider = [a if a != '{"width": 3}' else '{"width": 5}' for a in argv]
    code, _, err = call([*wider[:2], "3", *wider[3:], "--resume"], capsys)
    assert code == 2 and "shape mismatches" in one_error_line(err, "train")

    code, _, err = call([*common, "--model", "tinynets:not_a_model", "--out", str(out)], capsys)
    assert code == 2 and "returned int, not a Module" in one_error_line(err, "train")


def test_compare_trains_a_factory_model_like_train_does(tmp_path, capsys, monkeypatch):
    (tmp_path / "tinynets.py").write_text(_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    common = ["--model", "tinynets:tiny", "--model-kwargs", '{"width": 3}', "--epochs", "1"]
    common += ["--measure-steps", "2", "--measure-samples", "32", "--quiet"]
    argv = ["compare", *common, "--optimizers", "sgd", "--seeds", "0,4", "--json"]
    code, out, err = call([*argv, "--out", str(tmp_path / "c")], capsys)
    assert code == 0, err
    study = json.loads(out)
    assert [(r["optimizer"], r["seed"]) for r in study["runs"]] == [("sgd", 0), ("sgd", 4)]
    # compare and train build, seed and train the model on one path: the same run.
    code, out, err = call(["train", *common, "--seed", "4", "--out", str(tmp_path / "t")], capsys)
    assert code == 0, err
    final = json.loads((tmp_path / "t" / "metrics.json").read_text())["final"]
    for key in ("train_loss", "test_loss", "test_acc", "gap_loss"):
        assert study["runs"][1][key] == final[key], key

    code, _, err = call(["compare", "--model", "tinynets:nothing", "--out", str(tmp_path)], capsys)
    assert code == 2 and "cannot import model factory" in one_error_line(err, "compare")
    code, _, err = call(["compare", "--model", "vit", "--out", str(tmp_path)], capsys)
    assert code == 2 and "unknown model 'vit'" in one_error_line(err, "compare")


def test_interrupt_exits_130_and_threads_are_restored(trained, monkeypatch, capsys):
    import flatlens.cli._commands

    seen = []

    def interrupted(args):
        seen.append(torch.get_num_threads())
        raise KeyboardInterrupt

    monkeypatch.setattr(flatlens.cli._commands, "cmd_diagnose", interrupted)
    before = torch.get_num_threads()
    want = min(3, len(os.sched_getaffinity(0)))  # more than the CPUs is capped, with a note
    argv = ["diagnose", "--model", "mlp", "--checkpoint", str(trained["model"])]
    code, out, err = call([*argv, "--threads", str(want)], capsys)
    assert (code, out, seen) == (130, "", [want])
    assert err.strip() == "flatlens diagnose: interrupted; rerun with --resume to continue"
    assert torch.get_num_threads() == before
