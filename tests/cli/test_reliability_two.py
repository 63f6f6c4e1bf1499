"""Issue 23, reliability round two: every row of its table is a test here (the optimizer
rows 7, 8, 9 and 14 are in ``tests/optim/test_optim_reliability.py``, the lock's takeover
race in ``test_out_lock.py``).

1 one writer per output folder; 2 names drawn as text; 3 the user's exceptions are theirs;
4-6 and 13 values refused at parse time, thread counts capped; 10 a radius below the
dtype's resolution noted; 11 SIGTERM and SIGHUP end like Ctrl-C; 12 odd paths named.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from cli_util import one_error_line, run

from flatlens.cli._lock import LOCK_NAME, OutLock
from flatlens.zoo import mlp

_NETS = textwrap.dedent(
    r"""
    import builtins

    import torch
    from torch import nn

    class Flaky(nn.Module):
        def __init__(self, in_features, num_classes, kind="RuntimeError", at=30):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))
            self.calls, self.kind, self.at = 0, kind, at

        def forward(self, x):
            self.calls += 1
            if self.calls == self.at:
                raise getattr(builtins, self.kind)(f"flaky forward at call {self.at}")
            return self.net(x)

    def flaky(in_features, num_classes, kind="RuntimeError", at=30):
        return Flaky(in_features, num_classes, kind, at)

    CALLS = [0]

    def flaky_loss(output, target):
        CALLS[0] += 1
        if CALLS[0] == 12:
            raise ZeroDivisionError("the loss divided by zero")
        return nn.functional.cross_entropy(output, target)

    def markup(in_features, num_classes):
        net = nn.Sequential()
        net.add_module("flat", nn.Flatten())
        net.add_module("$\\notacommand{x}^$", nn.Linear(in_features, 16))
        net.add_module("act", nn.Tanh())
        net.add_module("out", nn.Linear(16, num_classes))
        return net
    """
)


@pytest.fixture
def nets(tmp_path, monkeypatch) -> Path:
    (tmp_path / "nets_rel2.py").write_text(_NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("nets_rel2", None)
    yield tmp_path
    sys.modules.pop("nets_rel2", None)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("w") / "model.pt"
    torch.manual_seed(0)
    torch.save(mlp().state_dict(), path)
    return path


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("FLATLENS_DEBUG", None)
    return env


def _popen(*argv: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flatlens", *argv],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.02)


def _temporary_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if p.is_file() and p.name != LOCK_NAME]


def _last_line(err: str) -> str:
    return err.replace("\r", "\n").strip().splitlines()[-1]


# ---------------------------------------------------------------------- 1 one writer
def test_1_two_trainings_started_together_into_one_folder_one_is_refused(tmp_path):
    """The issue's reproduction, two real processes: before, both exited 0 and the first to
    finish was silently replaced; now exactly one writes, the other exits 2."""
    a = _popen("train", "--lr", "0.05", "--epochs", "1", "--out", "X", "--quiet", cwd=tmp_path)
    b = _popen("train", "--lr", "0.07", "--epochs", "1", "--out", "X", "--quiet", cwd=tmp_path)
    done = {lr: (p.wait(timeout=300), p.communicate()) for lr, p in ((0.05, a), (0.07, b))}
    codes = sorted(code for code, _ in done.values())
    assert codes == [0, 2], done
    winner = next(lr for lr, (code, _) in done.items() if code == 0)
    loser = next(out for code, out in done.values() if code == 2)
    line = one_error_line(loser[1], "train")
    assert "is being written by flatlens train (process" in line or "already holds" in line
    metrics = json.loads((tmp_path / "X" / "metrics.json").read_text())
    assert metrics["settings"]["config"]["lr"] == winner  # the run that wrote is the one kept
    assert not (tmp_path / "X" / LOCK_NAME).exists()
    assert _temporary_files(tmp_path / "X") == []


def test_1_a_second_writer_is_refused_naming_the_running_process(tmp_path):
    """A second ``train`` (plain, --resume, --overwrite) and a ``diagnose`` into the folder
    of a running training stop at once, naming its process; the running one is untouched
    and SIGTERM then ends it like Ctrl-C, releasing the folder."""
    first = _popen("train", "--epochs", "500", "--out", "X", cwd=tmp_path)
    _wait_for(tmp_path / "X" / "checkpoints" / "checkpoint.pt", first)
    try:
        for extra in ([], ["--resume"], ["--overwrite"]):
            code, out, err = run(["train", "--epochs", "1", "--out", str(tmp_path / "X"), *extra])
            line = one_error_line(err, "train")
            assert (code, out) == (2, ""), line
            assert f"is being written by flatlens train (process {first.pid} on " in line
        assert (tmp_path / "X" / "checkpoints" / "checkpoint.pt").exists()  # not overwritten
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 143
    assert (
        _last_line(err) == "flatlens train: interrupted by SIGTERM; rerun with --resume to continue"
    )
    assert not (tmp_path / "X" / LOCK_NAME).exists()
    code, _, err = run(["train", "--epochs", "1", "--out", str(tmp_path / "X"), "--overwrite"])
    assert code == 0, err


_COMMANDS = {
    "train": ["--epochs", "1"],
    "compare": ["--epochs", "1", "--optimizers", "sgd", "--seeds", "0"],
    "diagnose": ["--quick"],
    "bound": ["--steps", "1", "--samples", "16"],
    "landscape": ["--dim", "1", "--num-points", "3", "--samples", "16"],
    "demo": ["--quick"],
}


_RESUMABLE = ("train", "diagnose", "landscape")  # the commands whose parser has --resume


@pytest.mark.parametrize(
    ("command", "mode"),
    [
        (command, mode)
        for command in _COMMANDS
        for mode in ("", "--resume", "--overwrite")
        if mode != "--resume" or command in _RESUMABLE
    ],
)
def test_1_every_command_takes_the_lock_with_and_without_resume_or_overwrite(
    weights, tmp_path, command, mode
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the other writer's")
    model = ["--model", "mlp", "--checkpoint", str(weights)]
    argv = [command, *(model if command in ("diagnose", "bound", "landscape") else [])]
    argv += [*_COMMANDS[command], "--out", str(out), "--quiet", *([mode] if mode else [])]
    with OutLock(out, "diagnose") as held:  # another writer (this process) holds the folder
        code, stdout, err = run(argv)
        assert (out / LOCK_NAME).exists() and held.held
    line = one_error_line(err, command)
    assert (code, stdout) == (2, ""), line
    assert f"is being written by flatlens diagnose (process {os.getpid()} on " in line
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]  # nothing written or removed


def test_1_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    pid = int(dead.stdout)
    out = tmp_path / "out"
    out.mkdir()
    stale = {
        "pid": pid,
        "host": socket.gethostname(),
        "started": "yesterday",
        "command": "train",
        "token": "0123456789abcdef",
    }
    (out / LOCK_NAME).write_text(json.dumps(stale))
    code, _, err = run(["train", "--epochs", "1", "--out", str(out), "--quiet"])
    assert code == 0, err
    assert not (out / LOCK_NAME).exists()


def test_1_a_lock_of_another_host_is_never_taken_over_and_says_how_to_remove_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lock = {
        "pid": 1,
        "host": "another-host.example",
        "started": "2026-01-01 00:00:00",
        "command": "train",
        "token": "0123456789abcdef",
    }
    (out / LOCK_NAME).write_text(json.dumps(lock))
    code, _, err = run(["train", "--epochs", "1", "--out", str(out), "--quiet"])
    line = one_error_line(err, "train")
    assert code == 2
    assert "process 1 on another-host.example" in line and "another host" in line
    assert f"delete {out / LOCK_NAME}" in line
    assert json.loads((out / LOCK_NAME).read_text()) == lock  # left alone


# ---------------------------------------------------------------------- 2 names as text
def test_2_a_module_named_with_markup_is_drawn_literally_by_blocks_and_resume(nets, tmp_path):
    torch.manual_seed(0)
    import nets_rel2

    torch.save(nets_rel2.markup(64, 10).state_dict(), tmp_path / "m.pt")
    argv = ["diagnose", "--model", "nets_rel2:markup", "--checkpoint", str(tmp_path / "m.pt")]
    argv += ["--quick", "--blocks", "layers", "--plane-points", "0", "--out", str(tmp_path / "d")]
    code, _, err = run([*argv, "--quiet"])
    assert code == 0, err
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    names = [b["name"] for b in report["block_spectra"]["blocks"]]
    assert "$\\notacommand{x}^$" in names
    assert (tmp_path / "d" / "figures" / "block_spectra.png").stat().st_size > 0
    code, _, err = run([*argv, "--quiet", "--resume"])
    assert code == 0, err
    assert (
        "block_spectra" in json.loads((tmp_path / "d" / "report.json").read_text())["reused_parts"]
    )


# ---------------------------------------------------------------------- 3 their exceptions
@pytest.mark.parametrize("kind", ["RuntimeError", "ValueError", "KeyError"])
def test_3_an_exception_of_the_users_model_during_training_is_theirs(nets, tmp_path, kind):
    argv = ["train", "--model", "nets_rel2:flaky", "--model-kwargs", json.dumps({"kind": kind})]
    argv += ["--optimizer", "sam", "--epochs", "2", "--out", str(tmp_path / "o"), "--quiet"]
    code, out, err = run(argv)
    line = one_error_line(err, "train")
    assert (code, out) == (2, ""), line
    assert f"the model 'nets_rel2:flaky' raised {kind}: " in line
    assert "flaky forward at call 30" in line and "nets_rel2.py:" in line and "in forward" in line


def test_3_an_exception_of_the_users_loss_is_theirs(nets, tmp_path):
    argv = ["train", "--loss", "nets_rel2:flaky_loss", "--epochs", "1"]
    code, _, err = run([*argv, "--out", str(tmp_path / "o"), "--quiet"])
    line = one_error_line(err, "train")
    assert code == 2
    assert "the loss 'nets_rel2:flaky_loss' raised ZeroDivisionError: the loss divided" in line


def test_3_an_exception_of_the_users_model_while_measuring_is_theirs(nets, tmp_path):
    import nets_rel2

    torch.save(nets_rel2.flaky(64, 10).state_dict(), tmp_path / "f.pt")
    kwargs = json.dumps({"at": 8, "kind": "IndexError"})
    argv = ["bound", "--model", "nets_rel2:flaky", "--model-kwargs", kwargs]
    argv += ["--checkpoint", str(tmp_path / "f.pt"), "--steps", "2", "--samples", "16"]
    code, _, err = run([*argv, "--out", str(tmp_path / "b"), "--quiet"])
    line = one_error_line(err, "bound")
    assert code == 2 and "the model 'nets_rel2:flaky' raised IndexError" in line


# ---------------------------------------------------------------------- 4, 5, 13 parse time
@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["bound", "--measure-rho", "1e-300"], ["--measure-rho", "underflows", "float64"]),
        (["diagnose", "--measure-rho", "0.01,1e200"], ["--measure-rho", "overflows"]),
        (["bound", "--measure-rho", "1e-30", "--dtype", "float32"], ["underflows", "float32"]),
        (["train", "--lr", "1e308"], ["--lr", "float32", "3.4e+38"]),
        (["compare", "--lr", "1e39"], ["--lr", "float32"]),
        (["train", "--sam-rho", "1e-20"], ["--sam-rho", "float32"]),
        (["train", "--gam-rho", "1e20"], ["--gam-rho", "overflows"]),
        (["train", "--measure-rho", "1e-160", "--dtype", "float64"], ["--measure-rho"]),
        (["train", "--seed", "99999999999999999999999"], ["argument --seed", "2**63 - 1"]),
        (["compare", "--seeds", "0,99999999999999999999999"], ["argument --seeds"]),
        (["train", "--epochs", "1" + "0" * 30], ["argument --epochs", "2**63 - 1"]),
    ],
)
def test_4_5_13_values_the_dtype_or_torch_cannot_hold_are_refused_at_parse_time(
    weights, tmp_path, argv, words
):
    command = argv[0]
    model = ["--model", "mlp", "--checkpoint", str(weights / "missing.pt")]
    if command in ("bound", "diagnose"):  # refused before the (missing) checkpoint is read
        argv = [*argv, *model]
    code, out, err = run([*argv, "--out", str(tmp_path / "o")])
    line = one_error_line(err, command)
    assert (code, out) == (2, ""), line
    assert all(w in line for w in words), line
    assert not (tmp_path / "o").exists()


def test_4_check_bound_refuses_a_radius_whose_square_underflows():
    from flatlens import Objective
    from flatlens.measures import check_bound

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    objective = Objective(
        net, torch.nn.functional.cross_entropy, [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
    )
    with pytest.raises(ValueError, match="square of the radius 1e-300"):
        check_bound(objective, [1e-300, 0.01])


def test_5_a_learning_rate_float64_holds_but_the_run_cannot_use_fails_in_one_line(tmp_path):
    argv = ["train", "--lr", "1e308", "--dtype", "float64", "--epochs", "1", "--scheduler"]
    code, out, err = run([*argv, "none", "--out", str(tmp_path / "o"), "--quiet"])
    line = one_error_line(err, "train")
    assert (code, out) == (1, ""), line
    assert "non-finite" in line or "became" in line


# ---------------------------------------------------------------------- 6 threads
def test_6_a_thread_count_beyond_the_machine_is_capped_with_a_note(tmp_path):
    before = torch.get_num_threads()
    code, _, err = run(["train", "--threads", "100000", "--epochs", "1", "--out", str(tmp_path)])
    assert code == 0, err
    assert "flatlens train: --threads 100000 is more than the" in err and "; using " in err
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------------- 10 resolution
def test_10_a_radius_below_the_dtypes_resolution_is_noted(weights, tmp_path):
    argv = ["diagnose", "--model", "mlp", "--checkpoint", str(weights), "--quick"]
    code, _, err = run([*argv, "--measure-rho", "1e-8", "--out", str(tmp_path / "d"), "--quiet"])
    assert code == 0, err
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    (row,) = report["sharpness"]["bound"]["rows"]
    assert row["notes"] and "below the resolution of float32" in row["notes"][0]
    assert any("below the resolution of float32" in n for n in report["notes"])
    assert "below the resolution of float32" in (tmp_path / "d" / "report.html").read_text()
    argv = ["bound", "--model", "mlp", "--checkpoint", str(weights), "--steps", "1"]
    code, out, err = run(
        [
            *argv,
            "--samples",
            "16",
            "--measure-rho",
            "1e-8,0.05",
            "--json",
            "--out",
            str(tmp_path / "b"),
        ]
    )
    assert code == 0, err
    payload = json.loads(out)
    assert [bool(r["notes"]) for r in payload["rows"]] == [True, False]  # 0.05 is resolved
    assert len(payload["notes"]) == 1 and "rho = 1e-08" in payload["notes"][0]


# ---------------------------------------------------------------------- 11 signals
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGHUP, 129)])  # SIGTERM: in test_1 above
def test_11_sigterm_and_sighup_end_like_ctrl_c_and_leave_no_temporary_file(tmp_path, sig, code):
    proc = _popen("train", "--epochs", "500", "--out", "o", cwd=tmp_path)
    _wait_for(tmp_path / "o" / "checkpoints" / "checkpoint.pt", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code
    assert "Traceback" not in err
    name = signal.Signals(sig).name
    assert (
        _last_line(err) == f"flatlens train: interrupted by {name}; rerun with --resume to continue"
    )
    assert _temporary_files(tmp_path / "o") == []
    assert not (tmp_path / "o" / LOCK_NAME).exists()


def test_11_a_signal_during_a_checkpoint_write_removes_its_temporary_file(tmp_path, monkeypatch):
    """SIGTERM arriving while the checkpoint is being written (the handler raises there)."""
    from flatlens.cli._errors import Terminated

    real = os.fsync

    def interrupted(fd):
        if "checkpoint.pt" in os.readlink(f"/proc/self/fd/{fd}"):
            raise Terminated(signal.SIGTERM)
        return real(fd)

    monkeypatch.setattr(os, "fsync", interrupted)
    code, out, err = run(["train", "--epochs", "1", "--out", str(tmp_path)])
    assert (code, out) == (143, "")
    assert err.strip().endswith("interrupted by SIGTERM; rerun with --resume to continue")
    assert _temporary_files(tmp_path) == []


@pytest.mark.parametrize("mode", ["--overwrite", "--resume"])
def test_11_overwrite_and_resume_remove_the_leftovers_of_a_crash(tmp_path, mode):
    out = tmp_path / "o"
    assert run(["train", "--epochs", "1", "--out", str(out), "--quiet"])[0] == 0
    left = [
        out / "checkpoints" / ".checkpoint.pt.d1ohb3dr.tmp",
        out / "checkpoints" / ".checkpoint.json.k2_9abcd.tmp",
        out / ".model.pt.x1y2z3w4.tmp",
        out / ".flatlens-probe-abcd1234",
    ]
    kept = [out / "notes.txt", out / ".my.tmp", out / "checkpoints" / "x.pt.d1ohb3dr.tmp"]
    for path in [*left, *kept]:
        path.write_bytes(b"left by a crash")
    code, _, err = run(["train", "--epochs", "1", "--out", str(out), mode])
    assert code == 0, err
    assert f"removed {len(left)} temporary files an interrupted run left in {out}" in err
    assert [p for p in left if p.exists()] == []
    assert all(p.read_bytes() == b"left by a crash" for p in kept)


# ---------------------------------------------------------------------- 12 odd paths
@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "fifo.pt"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize(
    ("which", "reason"),
    [
        ("fifo", "is a named pipe (FIFO), not a file"),
        ("/dev/zero", "is a character device, not a file"),
        ("/proc/self/status", "not a file torch.save wrote"),
        ("loop", "cannot be examined"),
        ("dangling", "is a broken symbolic link"),
    ],
)
def test_12_odd_checkpoint_paths_get_the_right_reason(fifo, tmp_path, which, reason):
    path = {"fifo": str(fifo)}.get(which, which)
    if which == "loop":
        os.symlink(tmp_path / "loop", tmp_path / "loop")
        path = str(tmp_path / "loop")
    if which == "dangling":
        os.symlink(tmp_path / "nowhere.pt", tmp_path / "dangling.pt")
        path = str(tmp_path / "dangling.pt")
    code, _, err = run(
        ["bound", "--model", "mlp", "--checkpoint", path, "--out", str(tmp_path / "b")]
    )
    line = one_error_line(err, "bound")
    assert code == 2 and reason in line, line
    assert "does not exist" not in line and "is an empty file" not in line


def test_12_a_fifo_training_checkpoint_on_resume_is_named_not_missing(tmp_path):
    out = tmp_path / "o"
    assert run(["train", "--epochs", "1", "--out", str(out), "--quiet"])[0] == 0
    last = out / "checkpoints" / "checkpoint.pt"
    last.unlink()
    os.mkfifo(last)
    code, _, err = run(["train", "--epochs", "2", "--resume", "--out", str(out), "--quiet"])
    line = one_error_line(err, "train")
    assert code == 2 and f"{last} is a named pipe (FIFO), not a file" in line
    assert "finds no" not in line


def test_12_a_fifo_landscape_store_on_resume_is_refused_without_blocking(weights, tmp_path):
    out = tmp_path / "l"
    out.mkdir()
    os.mkfifo(out / "line.npz")
    argv = ["landscape", "--model", "mlp", "--checkpoint", str(weights), "--dim", "1"]
    code, _, err = run([*argv, "--num-points", "3", "--resume", "--out", str(out), "--quiet"])
    line = one_error_line(err, "landscape")
    assert code == 2 and "is a named pipe (FIFO), not a file" in line


@pytest.mark.parametrize(
    ("out", "kind"), [("/dev/null", "a character device"), ("fifo", "a named pipe")]
)
def test_12_an_out_that_is_not_a_folder_is_named(fifo, tmp_path, out, kind):
    target = str(fifo) if out == "fifo" else out
    code, _, err = run(["train", "--epochs", "1", "--out", target])
    line = one_error_line(err, "train")
    assert code == 2 and f"--out {target} is {kind}" in line and "not a folder" in line


# ---------------------------------------------------------------------- 13 disk full
def test_13_a_full_disk_names_the_file(tmp_path, monkeypatch):
    real = os.fsync

    def full(fd):
        if "checkpoint.pt" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", full)
    code, out, err = run(["train", "--epochs", "1", "--out", str(tmp_path / "o"), "--quiet"])
    line = one_error_line(err, "train")
    assert (code, out) == (1, "")
    assert f"{tmp_path / 'o' / 'checkpoints' / 'checkpoint.pt'}: No space left on device" in line
    assert _temporary_files(tmp_path / "o") == []
