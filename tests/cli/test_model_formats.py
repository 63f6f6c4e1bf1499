"""Checkpoints and models as they come: ``.safetensors``, Lightning ``.ckpt``, Hugging Face
folders with tokenized data, timm and torchvision architectures by name. Each route gives the
same numbers as the equivalent ``torch.save`` route, and a bad spec is one line, exit 2."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from cli_util import one_error_line, run, run_cli
from helpers import import_model_library

from flatlens.core import causal_lm_loss
from flatlens.zoo import cnn

BOUND = ["--measure-rho", "0.01", "--steps", "2", "--samples", "48", "--quiet", "--json"]


def _bound_flags():
    """The bound command's radius flag (``--rho`` before the vocabulary rename)."""
    from flatlens.cli._parser import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["bound"]
    names = {o for a in sub._actions for o in a.option_strings}
    rho = "--measure-rho" if "--measure-rho" in names else "--rho"
    return [rho, *BOUND[1:]]


def _bound(tmp_path, name, *args):
    code, out, err = run(["bound", *args, *_bound_flags(), "--out", str(tmp_path / name)])
    assert code == 0, err
    payload = json.loads(out)
    return [(row["r0"], row["r1"], row["rho2_lambda"]) for row in payload["rows"]], err


@pytest.fixture(scope="module")
def cnn_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cnn")
    torch.manual_seed(0)
    model = cnn(1, 4, 10)
    state = model.state_dict()
    torch.save(state, folder / "model.pt")
    return folder, state


# ---------------------------------------------------------------------- safetensors
def test_safetensors_equals_torch_save(tmp_path, cnn_files):
    safetensors = pytest.importorskip("safetensors.torch")
    folder, state = cnn_files
    safetensors.save_file(state, folder / "model.safetensors")
    common = ["--model", "cnn", "--model-kwargs", '{"channels": 4}']
    pt, _ = _bound(tmp_path, "pt", *common, "--checkpoint", str(folder / "model.pt"))
    st, _ = _bound(tmp_path, "st", *common, "--checkpoint", str(folder / "model.safetensors"))
    assert st == pt


def test_safetensors_is_read_without_pickle(tmp_path, monkeypatch, cnn_files):
    """A .safetensors file never reaches torch.load (the pickle reader)."""
    safetensors = pytest.importorskip("safetensors.torch")
    folder, state = cnn_files
    safetensors.save_file(state, folder / "weights.safetensors")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called on a .safetensors file")

    monkeypatch.setattr(torch, "load", refuse)
    from flatlens.core import load_checkpoint

    loaded = load_checkpoint(folder / "weights.safetensors")
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_corrupt_safetensors_is_one_line(tmp_path):
    pytest.importorskip("safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    code, _, err = run(["bound", "--model", "cnn", "--checkpoint", str(bad), "--quiet"])
    assert code == 2
    assert "truncated or corrupt" in one_error_line(err, "bound")


# ---------------------------------------------------------------------- Lightning .ckpt
def _lightning_ckpt(path, state, prefix="net."):
    torch.save(
        {
            "epoch": 1,
            "global_step": 8,
            "pytorch-lightning_version": "2.6.6",
            "state_dict": {prefix + k: v for k, v in state.items()},
            "optimizer_states": [],
            "hyper_parameters": {"lr": 0.1},
        },
        path,
    )


def test_lightning_ckpt_finds_its_prefix(tmp_path, cnn_files):
    folder, state = cnn_files
    _lightning_ckpt(folder / "model.ckpt", state)
    common = ["--model", "cnn", "--model-kwargs", '{"channels": 4}']
    pt, _ = _bound(tmp_path, "pt", *common, "--checkpoint", str(folder / "model.pt"))
    ck, _ = _bound(tmp_path, "ck", *common, "--checkpoint", str(folder / "model.ckpt"))
    assert ck == pt


def test_real_lightning_checkpoint(tmp_path):
    """A .ckpt the Lightning Trainer wrote (hyper-parameters, loops, optimizer state)."""
    pl = import_model_library("lightning").pytorch

    class Module(pl.LightningModule):
        def __init__(self, channels=4):
            super().__init__()
            self.save_hyperparameters()
            torch.manual_seed(0)
            self.net = cnn(1, channels, 10)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)))
    module = Module()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    torch.save(module.net.state_dict(), tmp_path / "net.pt")
    common = ["--model", "cnn", "--model-kwargs", '{"channels": 4}']
    ck, _ = _bound(tmp_path, "ck", *common, "--checkpoint", str(tmp_path / "run.ckpt"))
    pt, _ = _bound(tmp_path, "pt", *common, "--checkpoint", str(tmp_path / "net.pt"))
    assert ck == pt


def test_ambiguous_prefix_is_named_by_a_flag(tmp_path, cnn_files):
    folder, state = cnn_files
    both = {**{f"student.{k}": v for k, v in state.items()}}
    both.update({f"teacher.{k}": v * 2 for k, v in state.items()})
    torch.save({"state_dict": both}, folder / "two.ckpt")
    common = ["--model", "cnn", "--model-kwargs", '{"channels": 4}']
    code, _, err = run(["bound", *common, "--checkpoint", str(folder / "two.ckpt"), "--quiet"])
    assert code == 2
    line = one_error_line(err, "bound")
    assert "several prefixes" in line and "--state-prefix" in line and "teacher." in line
    pt, _ = _bound(tmp_path, "pt", *common, "--checkpoint", str(folder / "model.pt"))
    student, _ = _bound(
        tmp_path,
        "st",
        *common,
        "--checkpoint",
        str(folder / "two.ckpt"),
        "--state-prefix",
        "student",
    )
    assert student == pt


def test_ckpt_holding_objects_is_refused_with_how_to_export(tmp_path, cnn_files):
    folder, state = cnn_files
    torch.save(
        {"state_dict": state, "hyper_parameters": {"loss": torch.nn.MSELoss()}}, folder / "o.ckpt"
    )
    code, _, err = run(["bound", "--model", "cnn", "--checkpoint", str(folder / "o.ckpt")])
    assert code == 2
    line = one_error_line(err, "bound")
    assert "Lightning checkpoint" in line and "weights_only=True" in line
    assert "['state_dict']" in line and "weights.pt" in line


# ---------------------------------------------------------------------- Hugging Face folders
def _token_data(datasets, path, n, vocab, length, *, classes=None):
    """Padded token sequences of uneven real lengths (padding labels -100)."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (n, length), generator=gen)
    lengths = torch.randint(3, length + 1, (n,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    if classes is None:
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100)).tolist()
    else:
        labels = torch.randint(0, classes, (n,), generator=gen).tolist()
    columns = {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels}
    datasets.Dataset.from_dict(columns).save_to_disk(str(path))
    return ids, mask, labels


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    transformers = import_model_library("transformers")
    datasets = import_model_library("datasets")
    folder = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=40,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(folder / "model")
    torch.save(model.state_dict(), folder / "model.pt")
    ids, mask, labels = _token_data(datasets, folder / "data", 30, 40, 10)
    return folder, model, ids, mask, torch.tensor(labels)


def test_gpt2_folder_equals_torch_save_route(tmp_path, gpt2_folder):
    folder, *_ = gpt2_folder
    data = ["--data", f"hf:{folder / 'data'}", "--batch-size", "5"]
    hf, _ = _bound(tmp_path, "hf", "--model", f"hf:{folder / 'model'}", *data)
    pt, _ = _bound(
        tmp_path,
        "pt",
        "--model",
        f"hf:{folder / 'model'}",
        "--checkpoint",
        str(folder / "model.pt"),
        *data,
    )
    assert hf == pt


def test_gpt2_folder_is_token_weighted(tmp_path, gpt2_folder):
    """The train loss is the mean over every predicted token of the train split (24 of the
    30 examples), not the mean of per-batch means."""
    folder, model, ids, mask, labels = gpt2_folder
    flags = ["--model", f"hf:{folder / 'model'}", "--data", f"hf:{folder / 'data'}"]
    code, out, err = run(
        [
            "diagnose",
            *flags,
            "--quick",
            "--samples",
            "8",
            "--k",
            "1",
            "--batch-size",
            "5",
            "--out",
            str(tmp_path / "d"),
            "--quiet",
            "--json",
        ]
    )
    assert code == 0, err
    report = json.loads(out)
    assert (tmp_path / "d" / "report.html").is_file()
    assert report["loss"] == "causal_lm"
    assert "train_accuracy" not in report["performance"]
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids[:24], attention_mask=mask[:24]).logits.double()
    y = labels[:24]
    terms = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 40), y[:, 1:].reshape(-1), reduction="none"
    )
    expected = float(terms.sum() / (y[:, 1:] != -100).sum())
    assert report["performance"]["train_loss"] == pytest.approx(expected, rel=1e-5)
    # The per-batch mean of means differs, so the test tells them apart.
    means = [float(causal_lm_loss(logits[i : i + 5], y[i : i + 5])) for i in range(0, 24, 5)]
    assert abs(sum(means) / len(means) - expected) > 1e-4


def test_bert_classifier_folder(tmp_path):
    transformers = import_model_library("transformers")
    datasets = import_model_library("datasets")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(config)
    model.save_pretrained(tmp_path / "bert")
    torch.save(model.state_dict(), tmp_path / "bert.pt")
    _token_data(datasets, tmp_path / "data", 20, 40, 8, classes=3)
    data = ["--data", f"hf:{tmp_path / 'data'}", "--batch-size", "6"]
    hf, _ = _bound(tmp_path, "hf", "--model", f"hf:{tmp_path / 'bert'}", *data)
    pt, _ = _bound(
        tmp_path,
        "pt",
        "--model",
        f"hf:{tmp_path / 'bert'}",
        "--checkpoint",
        str(tmp_path / "bert.pt"),
        *data,
    )
    assert hf == pt
    code, out, err = run(
        [
            "diagnose",
            "--model",
            f"hf:{tmp_path / 'bert'}",
            *data,
            "--quick",
            "--samples",
            "8",
            "--k",
            "1",
            "--out",
            str(tmp_path / "d"),
            "--quiet",
            "--json",
        ]
    )
    assert code == 0, err
    performance = json.loads(out)["performance"]
    assert 0.0 <= performance["train_accuracy"] <= 1.0 and "test_accuracy" in performance


# ---------------------------------------------------------------------- timm / torchvision
def test_timm_vit_by_name_with_its_checkpoint(tmp_path):
    """``timm/NAME`` takes its class count from the checkpoint and equals the factory route
    ``timm:create_model`` (which keeps working) with the same weights."""
    timm = import_model_library("timm")
    kwargs = {
        "img_size": 8,
        "patch_size": 4,
        "in_chans": 1,
        "embed_dim": 16,
        "depth": 1,
        "num_heads": 2,
    }
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **kwargs)
    torch.save(vit.state_dict(), tmp_path / "vit.pt")
    named, _ = _bound(
        tmp_path,
        "named",
        "--model",
        "timm/vit_tiny_patch16_224",
        "--model-kwargs",
        json.dumps(kwargs),
        "--checkpoint",
        str(tmp_path / "vit.pt"),
    )
    factory, _ = _bound(
        tmp_path,
        "factory",
        "--model",
        "timm:create_model",
        "--model-kwargs",
        json.dumps({**kwargs, "model_name": "vit_tiny_patch16_224", "num_classes": 10}),
        "--checkpoint",
        str(tmp_path / "vit.pt"),
    )
    assert named == factory
    code, _, err = run(
        [
            "diagnose",
            "--model",
            "timm/vit_tiny_patch16_224",
            "--model-kwargs",
            json.dumps(kwargs),
            "--checkpoint",
            str(tmp_path / "vit.pt"),
            "--quick",
            "--samples",
            "16",
            "--k",
            "1",
            "--out",
            str(tmp_path / "d"),
            "--quiet",
        ]
    )
    assert code == 0, err


def test_class_count_comes_from_the_checkpoint():
    import_model_library("torchvision")
    from flatlens.cli._models import resolve_model
    from flatlens.data import synthetic_classification

    data = synthetic_classification(num_train=8, num_test=4, num_classes=3, num_features=12)
    tv = sys.modules["torchvision"].models.get_model("squeezenet1_1", weights=None, num_classes=7)
    state = tv.state_dict()
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / "sq.pt")
        model, _, _ = resolve_model(
            "torchvision/squeezenet1_1", Path(tmp) / "sq.pt", data, {}, loss_spec="cross_entropy"
        )
    assert model.classifier[1].out_channels == 7


# ---------------------------------------------------------------------- bad specs
@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("timm/no_such_model_xyz", "unknown timm model"),
        ("keras/resnet50", "LIBRARY/NAME"),
        ("hf:/no/such/folder", "does not exist"),
    ],
)
def test_bad_model_specs_are_one_line(tmp_path, model, message):
    if model.startswith("timm/"):
        import_model_library("timm")
    code, _, err = run(["bound", "--model", model, "--checkpoint", str(tmp_path / "x.pt")])
    assert code == 2
    assert message in one_error_line(err, "bound")


def test_bad_data_folder_is_one_line(tmp_path):
    code, _, err = run(
        ["bound", "--model", "mlp", "--checkpoint", "x.pt", "--data", f"hf:{tmp_path}"]
    )
    assert code == 2
    assert "save_to_disk" in one_error_line(err, "bound")


def test_factory_from_a_library_imports_through_the_fix(tmp_path):
    """``timm:create_model`` in a fresh process (torchvision not yet imported)."""
    import_model_library("timm")
    torch.manual_seed(0)
    proc = run_cli(
        "bound",
        "--model",
        "timm:create_model",
        "--model-kwargs",
        '{"model_name": "resnet10t", "in_chans": 1}',
        "--checkpoint",
        str(tmp_path / "m.pt"),
        "--quiet",
        cwd=tmp_path,
    )
    # The model builds (the import works); the missing checkpoint is the one-line error.
    assert proc.returncode == 2, proc.stderr
    assert "does not exist" in one_error_line(proc.stderr, "bound")


def test_digits_without_scikit_learn_is_one_line(tmp_path):
    blocker = tmp_path / "block" / "sklearn"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('scikit-learn is blocked here')\n")
    import os

    path = os.pathsep.join([str(tmp_path / "block"), os.environ.get("PYTHONPATH", "")])
    proc = run_cli(
        "bound",
        "--model",
        "mlp",
        "--checkpoint",
        "x.pt",
        cwd=tmp_path,
        env={"PYTHONPATH": path},
    )
    assert proc.returncode == 2
    assert "scikit-learn" in one_error_line(proc.stderr, "bound")
