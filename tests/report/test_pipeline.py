"""The resumable part store behind ``diagnose --resume``."""

from __future__ import annotations

import copy
import json

import torch
from torch import nn

from flatlens.report._pipeline import PartStore, fingerprint, model_digest


class Counter:
    """A part's computation that counts its calls and returns a fresh value each time."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> dict:
        self.calls += 1
        return {"value": torch.tensor([1.5, float(self.calls)]), "nan": float("nan")}


def test_parts_are_stored_as_json_and_reused_only_when_resuming(tmp_path):
    compute = Counter()
    first = PartStore(tmp_path, "k", resume=False).run("spectrum", compute)
    assert first == {"value": [1.5, 1.0], "nan": None}
    stored = json.loads((tmp_path / "spectrum.json").read_text())
    assert stored["value"] == first

    resumed = PartStore(tmp_path, "k", resume=True)
    assert resumed.run("spectrum", compute) == first
    assert (compute.calls, resumed.reused, resumed.computed) == (1, ["spectrum"], [])

    fresh = PartStore(tmp_path, "k", resume=False)
    assert fresh.run("spectrum", compute) == {"value": [1.5, 2.0], "nan": None}
    assert (compute.calls, fresh.reused, fresh.computed) == (2, [], ["spectrum"])


def test_a_part_is_recomputed_when_its_key_or_settings_change(tmp_path):
    compute = Counter()
    PartStore(tmp_path, "weights-a", resume=False).run("p", compute, settings={"k": 3})
    for key, settings in (("weights-b", {"k": 3}), ("weights-a", {"k": 4})):
        store = PartStore(tmp_path, key, resume=True)
        store.run("p", compute, settings=settings)
        assert store.computed == ["p"]
    store = PartStore(tmp_path, "weights-a", resume=True)
    store.run("p", compute, settings={"k": 4})  # the last run stored these
    assert store.reused == ["p"] and compute.calls == 3


def test_a_part_whose_files_are_gone_or_whose_json_is_broken_is_recomputed(tmp_path):
    compute = Counter()
    grid = tmp_path / "grid.npz"
    grid.write_bytes(b"x")
    PartStore(tmp_path, "k", resume=False).run("land", compute, files=[grid])
    store = PartStore(tmp_path, "k", resume=True)
    store.run("land", compute, files=[grid])
    assert store.reused == ["land"]
    grid.unlink()
    store = PartStore(tmp_path, "k", resume=True)
    store.run("land", compute, files=[grid])
    assert store.computed == ["land"]
    (tmp_path / "land.json").write_text('{"key": ')  # cut short
    store = PartStore(tmp_path, "k", resume=True)
    store.run("land", compute)
    assert store.computed == ["land"] and compute.calls == 3
    assert json.loads((tmp_path / "land.json").read_text())["value"]["value"] == [1.5, 3.0]


def test_fingerprint_is_order_independent_and_sensitive():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert fingerprint((0.01, 0.05)) == fingerprint([0.01, 0.05])


def test_model_digest_sees_every_bit_of_parameters_and_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    digest = model_digest(model)
    assert model_digest(model) == digest
    with torch.no_grad():
        model[0].weight[0, 0] = torch.nextafter(model[0].weight[0, 0], torch.tensor(1.0))
    changed = model_digest(model)
    assert changed != digest
    model[1].running_mean += 1.0
    assert model_digest(model) != changed
    assert model_digest(copy.deepcopy(model).double()) != model_digest(model)


def test_any_unreadable_part_is_recomputed_never_reused(tmp_path):
    compute = Counter()
    PartStore(tmp_path, "k", resume=False).run("p", compute)
    for content in (b"", b"\xff\xfe\x00", b"[1, 2]", b'{"key": 3}', b"[" * 100000):
        (tmp_path / "p.json").write_bytes(content)
        store = PartStore(tmp_path, "k", resume=True)
        store.run("p", compute)
        assert store.computed == ["p"], content[:10]
    (tmp_path / "p.json").unlink()
    (tmp_path / "p.json").mkdir()  # a folder where the part's file should be
    assert PartStore(tmp_path, "k", resume=True).lookup("p") == (False, None)


def test_loss_key_tells_losses_apart_and_is_stable():
    from flatlens.report._pipeline import loss_key, loss_label

    def twice(outputs, targets):
        return 2 * nn.functional.cross_entropy(outputs, targets)

    keys = {
        loss_key(nn.CrossEntropyLoss()),
        loss_key(nn.CrossEntropyLoss(label_smoothing=0.1)),
        loss_key(nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0]))),
        loss_key(nn.MSELoss()),
        loss_key(twice),
    }
    assert len(keys) == 5
    assert loss_key(nn.CrossEntropyLoss()) == loss_key(nn.CrossEntropyLoss())
    assert loss_label(nn.MSELoss()) == "torch.nn.modules.loss.MSELoss"
    assert loss_label(twice).endswith("twice")
