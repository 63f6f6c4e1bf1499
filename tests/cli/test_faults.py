"""Fault injection: every subcommand that reads a checkpoint or a landscape store answers a
bad file (random bytes, a truncated file, text, an empty file, a zip torch did not write, a
valid file of the wrong kind) with exit code 2 and one line on stderr, never a traceback."""

from __future__ import annotations

import io
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
