"""Atomic writes and safe checkpoint loading."""

from __future__ import annotations

import json
import os
import pickle
import random

import pytest
import torch
from torch import nn

from flatlens.core._io import CheckpointError, atomic_path, load_checkpoint, write_json


class _Evil:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_write_json_is_atomic_and_strict(tmp_path):
    path = tmp_path / "out" / "r.json"
    write_json(path, {"a": torch.tensor([1.0, 2.0]), "b": float("nan")})
    assert json.loads(path.read_text()) == {"a": [1.0, 2.0], "b": None}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "keep.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_plain_and_wrapped_state_dicts_load(tmp_path):
    model = nn.Linear(3, 2)
    torch.save(model.state_dict(), tmp_path / "a.pt")
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "b.pt")
    for name in ("a.pt", "b.pt"):
        state = load_checkpoint(tmp_path / name)
        assert torch.equal(state["weight"], model.weight)


def test_code_running_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"weight": _Evil(str(marker))}, fh)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save(nn.Linear(30, 20).state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")


def test_non_state_dict_is_refused(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="no state dict"):
        load_checkpoint(tmp_path / "list.pt")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is an empty file"),
        (b"hello, this is text\n", "not a file torch.save wrote"),
        (b"PK\x05\x06" + b"\x00" * 18, "not a file torch.save wrote"),  # an empty zip
        (random.Random(0).randbytes(64), "not a file torch.save wrote"),
    ],
    ids=["empty", "text", "empty-zip", "random-bytes"],
)
def test_every_reader_failure_is_one_checkpoint_error(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_a_zip_torch_did_not_write_is_a_checkpoint_error(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "foreign.pt", "w") as archive:
        archive.writestr("archive/data.pkl", b"not a pickle")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_a_folder_is_not_reported_missing(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder, not a file"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
def test_the_refusal_gives_the_reason_without_torchs_advice(tmp_path, fmt):
    path = tmp_path / "evil.pt"
    if fmt == "torch.save":
        torch.save({"weight": _Evil(str(tmp_path / "x"))}, path)
    else:
        path.write_bytes(pickle.dumps({"weight": _Evil(str(tmp_path / "x"))}))
    with pytest.raises(CheckpointError, match="refused") as info:
        load_checkpoint(path)
    message = str(info.value)
    reason = f"{os.system.__module__}.system" if fmt == "torch.save" else "a plain pickle"
    assert reason in message
    assert "weights_only" not in message and "trusted source" not in message
