"""Fault injection: every subcommand that reads a checkpoint or a landscape store answers a
bad file (random bytes, a truncated file, text, an empty file, a zip torch did not write, a
valid file of the wrong kind) with exit code 2 and one line on stderr, never a traceback.

So do odd paths in those places (a named pipe, a device, a ``/proc`` file, a folder, a
broken or looping link, a name too long), numbers no dtype or torch can hold in any option
(exit 2 at parse time), and names with markup (``$...$``, backslashes) in every bad path and
spec: each case ends in exit code 1 or 2 with one line, never a traceback or a hang.
"""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_util import one_error_line, run, run_cli
from hypothesis import given
from hypothesis import strategies as st

from flatlens.landscape._storage import read
from flatlens.zoo import mlp


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _npz(arrays: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.frombuffer(v, dtype=np.uint8) for k, v in arrays.items()})
    return buffer.getvalue()


_MEMBERS = ["data.pkl", "archive/data.pkl", "archive/version", "archive/data/0", "meta.npy"]

BAD_FILES = st.one_of(
    st.binary(max_size=2048).map(lambda b: ("random", b)),
    st.just(("empty", b"")),
    st.text(max_size=300).map(lambda t: ("text", t.encode())),
    st.dictionaries(st.sampled_from(_MEMBERS), st.binary(max_size=200), min_size=1, max_size=3).map(
        lambda d: ("zip", _zip(d))
    ),
    st.dictionaries(st.sampled_from(["meta", "coord_0", "done", "x"]), st.binary(max_size=64)).map(
        lambda d: ("npz", _npz(d))
    ),
    st.floats(0, 1, exclude_max=True).map(lambda f: ("truncated", f)),
    st.sampled_from([[1, 2, 3], {"model": "weights"}, {"format": "flatlens.train/1"}]).map(
        lambda obj: ("torch", obj)
    ),
)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    """A valid weights file, training checkpoint and landscape store (the truncation
    sources), all for the digits MLP."""
    root = tmp_path_factory.mktemp("good")
    torch.manual_seed(0)
    torch.save(mlp().state_dict(), root / "model.pt")
    code, _, err = run(["train", "--epochs", "1", "--out", str(root / "run"), "--quiet"])
    assert code == 0, err
    argv = ["landscape", "--model", "mlp", "--checkpoint", str(root / "model.pt"), "--dim", "1"]
    code, _, err = run([*argv, "--num-points", "3", "--samples", "16", "--out", str(root / "l")])
    assert code == 0, err
    return {
        "weights": root / "model.pt",
        "training": root / "run" / "checkpoints" / "checkpoint.pt",
        "store": root / "l" / "line.npz",
    }


def _content(kind: str, value, source: Path) -> bytes:
    if kind == "truncated":
        data = source.read_bytes()
        return data[: int(value * len(data))]
    if kind == "torch":
        buffer = io.BytesIO()
        torch.save(value, buffer)
        return buffer.getvalue()
    return value


# (command, what is bad, the valid file it stands for)
CONSUMERS = [
    ("diagnose", "checkpoint", "weights"),
    ("bound", "checkpoint", "weights"),
    ("landscape", "checkpoint", "weights"),
    ("train", "training checkpoint", "training"),
    ("landscape", "store", "store"),
    ("diagnose", "store", "store"),
]


def _argv(command: str, role: str, bad: Path, out: Path, good: dict[str, Path]) -> list[str]:
    """The command line that makes ``command`` read ``bad`` as its ``role``."""
    checkpoint = bad if role == "checkpoint" else good["weights"]
    model = ["--model", "mlp", "--checkpoint", str(checkpoint)]
    common = ["--out", str(out), "--quiet"]
    if command == "train":
        (out / "checkpoints").mkdir(parents=True)
        bad.replace(out / "checkpoints" / "checkpoint.pt")
        return ["train", "--epochs", "1", "--resume", *common]
    resume = []
    if role == "store":
        out.mkdir(parents=True)
        bad.replace(out / ("line.npz" if command == "landscape" else "landscape_1d.npz"))
        resume = ["--resume"]
    if command == "diagnose":
        return ["diagnose", *model, "--quick", *resume, *common]
    if command == "bound":
        return ["bound", *model, "--steps", "1", "--samples", "16", *common]
    return [
        "landscape",
        *model,
        "--dim",
        "1",
        "--num-points",
        "3",
        "--samples",
        "16",
        *resume,
        *common,
    ]


@pytest.mark.parametrize(("command", "role", "source"), CONSUMERS)
@given(bad=BAD_FILES)
def test_a_bad_file_is_exit_2_and_one_line(good, command, role, source, bad):
    kind, value = bad
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bad.pt"
        path.write_bytes(_content(kind, value, good[source]))
        argv = _argv(command, role, path, Path(tmp) / "out", good)
        code, out, err = run(argv)
    assert (code, out) == (2, ""), (kind, err)
    line = one_error_line(err, command)
    assert "weights_only=False" not in line and "weights_only` set to `False" not in line


@pytest.mark.parametrize(
    ("command", "role", "kind"),
    [
        ("diagnose", "checkpoint", "empty"),
        ("bound", "checkpoint", "text"),
        ("landscape", "store", "truncated"),
        ("train", "training checkpoint", "zip"),
    ],
)
def test_a_bad_file_gives_one_line_in_a_real_process(good, tmp_path, command, role, kind):
    """The same through ``python -m flatlens``: no warning or traceback reaches stderr."""
    source = {"checkpoint": "weights", "store": "store"}.get(role, "training")
    value = {
        "empty": b"",
        "text": b"hello, not a checkpoint\n",
        "truncated": 0.5,
        "zip": _zip({"archive/data.pkl": b"\x80\x02}q\x00."}),
    }[kind]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(_content(kind, value, good[source]))
    argv = _argv(command, role, bad, tmp_path / "out", good)
    proc = run_cli(*argv, cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
    one_error_line(proc.stderr, command)


@given(bad=BAD_FILES)
def test_the_store_reader_turns_every_failure_into_one_value_error(good, bad):
    kind, value = bad
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "line.npz"
        path.write_bytes(_content(kind, value, good["store"]))
        with pytest.raises(ValueError, match=r"line\.npz") as info:
            read(path)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------- odd paths
ODD_PATHS = [
    "fifo",
    "/dev/zero",
    "/dev/null",
    "/proc/self/status",
    "folder",
    "dangling",
    "loop",
    "too long",
]


def _odd(kind: str, where: Path) -> Path:
    """Make ``where`` the odd path ``kind`` (a link to a system file), or return the odd
    path itself where it cannot be made at ``where`` (a name too long)."""
    where.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(where)
    elif kind == "folder":
        where.mkdir()
    elif kind == "dangling":
        os.symlink(where.parent / "nowhere.pt", where)
    elif kind == "loop":
        os.symlink(where, where)
    elif kind == "too long":
        return where.parent / ("x" * 300 + ".pt")
    else:
        os.symlink(kind, where)
    return where


@pytest.mark.parametrize(("command", "role", "source"), CONSUMERS)
@given(kind=st.sampled_from(ODD_PATHS))
def test_an_odd_path_is_exit_2_and_one_line(good, command, role, source, kind):
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp), Path(tmp) / "out"
        if role == "checkpoint":
            argv = _argv(command, role, _odd(kind, root / "odd.pt"), out, good)
        else:
            if kind == "too long":
                return  # the file's name is fixed: checkpoint.pt or line.npz
            name = {"train": "checkpoints/checkpoint.pt", "landscape": "line.npz"}.get(
                command, "landscape_1d.npz"
            )
            placeholder = root / "placeholder"
            placeholder.write_bytes(b"")
            argv = _argv(command, role, placeholder, out, good)  # moves it into place
            (out / name).unlink()
            _odd(kind, out / name)
        code, stdout, err = run(argv)
    assert (code, stdout) == (2, ""), (kind, err)
    line = one_error_line(err, command)
    if kind in ("fifo", "/dev/zero", "/dev/null", "folder", "dangling"):
        assert "does not exist" not in line and "empty file" not in line, line


# ---------------------------------------------------------------------- huge numbers
_TOO_BIG_INT = st.integers(2**63, 10**40).map(str)
_FLOAT32_RADIUS = st.one_of(st.floats(1e-300, 1e-20), st.floats(1.9e19, 1e300)).map(repr)
_FLOAT64_RADIUS = st.one_of(st.floats(1e-320, 1e-155), st.floats(1.4e154, 1e308)).map(repr)
_INT_OPTIONS = {
    "train": ["--seed", "--epochs", "--batch-size", "--measure-samples", "--measure-every"],
    "compare": ["--seed", "--epochs", "--trace-probes", "--measure-steps"],
    "diagnose": ["--seed", "--k", "--samples", "--steps", "--restarts", "--line-points"],
    "bound": ["--seed", "--steps", "--restarts", "--samples", "--batch-size"],
    "landscape": ["--seed", "--num-points", "--samples", "--threads"],
    "demo": ["--seed", "--threads"],
}
HUGE = st.one_of(
    st.sampled_from(list(_INT_OPTIONS)).flatmap(
        lambda c: st.tuples(st.just(c), st.sampled_from(_INT_OPTIONS[c]), _TOO_BIG_INT)
    ),
    st.tuples(st.just("compare"), st.just("--seeds"), _TOO_BIG_INT.map(lambda v: f"0,{v}")),
    st.tuples(
        st.sampled_from(["train", "compare"]),
        st.sampled_from(["--sam-rho", "--gam-rho", "--gam-perturb-rho", "--measure-rho"]),
        _FLOAT32_RADIUS,
    ),
    st.tuples(
        st.sampled_from(["train", "compare"]), st.just("--lr"), st.floats(3.5e38, 1e308).map(repr)
    ),
    st.tuples(st.sampled_from(["diagnose", "bound"]), st.just("--measure-rho"), _FLOAT64_RADIUS),
    st.just(("train", "--lr", "1e999")),
)


@given(case=HUGE)
def test_a_number_no_dtype_or_torch_holds_is_refused_at_parse_time(good, case):
    command, option, value = case
    model = ["--model", "mlp", "--checkpoint", str(good["weights"])]
    argv = [command, *(model if command in ("diagnose", "bound", "landscape") else [])]
    with tempfile.TemporaryDirectory() as tmp:
        code, stdout, err = run([*argv, option, value, "--out", str(Path(tmp) / "o")])
        assert not (Path(tmp) / "o").exists()  # refused before anything was written
    assert (code, stdout) == (2, ""), (case, err)
    line = one_error_line(err, command)
    assert f"argument {option}" in line, line


# ---------------------------------------------------------------------- names with markup
MARKUP = st.text(alphabet="$\\^{}_%#&<>x", min_size=1, max_size=16)


@given(name=MARKUP, bad=BAD_FILES, command=st.sampled_from(["bound", "landscape", "diagnose"]))
def test_a_bad_file_with_a_markup_name_is_exit_2_and_one_line(good, name, bad, command):
    kind, value = bad
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.pt"
        path.write_bytes(_content(kind, value, good["weights"]))
        argv = _argv(command, "checkpoint", path, Path(tmp) / f"out {name}", good)
        if command == "diagnose":
            argv += ["--title", name]
        code, stdout, err = run(argv)
    assert (code, stdout) == (2, ""), (kind, err)
    assert str(path) in one_error_line(err, command)


@given(name=MARKUP, role=st.sampled_from(["--model", "--data", "--loss"]))
def test_a_spec_with_a_markup_name_is_exit_2_and_one_line(name, role):
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["train", "--epochs", "1", role, f"no_such_{abs(hash(name))}:{name}"]
        code, stdout, err = run([*argv, "--out", str(Path(tmp) / "o"), "--quiet"])
    assert (code, stdout) == (2, ""), err
    one_error_line(err, "train")
