"""flatlens.data: the digits split, CIFAR from a local folder (never downloaded), synthetic
sets and batching."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from flatlens.data import (
    batches,
    digest,
    from_datasets,
    load_cifar,
    load_digits,
    synthetic_classification,
)


# ------------------------------------------------------------------ digits
def test_digits_split_is_deterministic_and_complete():
    a, b = load_digits(), load_digits()
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert len(a.y_train) + len(a.y_test) == 1797
    assert len(a.y_test) == round(1797 * 0.25)
    assert a.num_classes == 10 and a.input_shape == (64,)
    assert 0.0 <= float(a.x_train.min()) and float(a.x_train.max()) <= 1.0
    other = load_digits(seed=1)
    assert not torch.equal(other.y_test, a.y_test)
    # Every sample lands in exactly one part.
    rows = {tuple(r.tolist()) for r in torch.cat([a.x_train, a.x_test])}
    from sklearn.datasets import load_digits as sk_digits

    assert rows == {tuple((r / 16.0).tolist()) for r in torch.tensor(sk_digits().data)}


def test_digits_images():
    data = load_digits(image=True)
    assert data.input_shape == (1, 8, 8)
    flat = load_digits()
    assert torch.equal(data.x_train.reshape(len(data.y_train), -1), flat.x_train)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_digits_bad_fraction(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=fraction)


# ------------------------------------------------------------------ CIFAR
def _write_batch(path, n, rng, label_key, protocol=4):
    data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).tolist()
    with open(path, "wb") as fh:
        pickle.dump({"data": data, label_key: labels, "batch_label": "x"}, fh, protocol=protocol)
    return data, labels


def fake_cifar10(root, protocol=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    parts = [
        _write_batch(folder / f"data_batch_{i}", 4, rng, "labels", protocol) for i in range(1, 6)
    ]
    test = _write_batch(folder / "test_batch", 3, rng, "labels", protocol)
    return folder, parts, test


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_from_a_local_folder(tmp_path, protocol):
    folder, parts, test = fake_cifar10(tmp_path, protocol)
    for root in (tmp_path, folder):  # the parent or the folder itself
        data = load_cifar(root)
        assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (3, 3, 32, 32)
        assert data.y_train.tolist() == [y for _, labels in parts for y in labels]
        assert data.y_test.tolist() == test[1]
        raw = torch.from_numpy(np.concatenate([d for d, _ in parts])).float().reshape(-1, 3, 32, 32)
        raw = raw / 255
        mean = raw.mean(dim=(0, 2, 3), keepdim=True)
        std = raw.std(dim=(0, 2, 3), keepdim=True)
        assert torch.allclose(data.x_train, (raw - mean) / std, atol=1e-6)
        assert data.x_train.mean(dim=(0, 2, 3)).abs().max() < 1e-5
        assert data.num_classes == 10 and data.name == "cifar10"


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    _, labels = _write_batch(folder / "train", 5, rng, "fine_labels")
    _write_batch(folder / "test", 2, rng, "fine_labels")
    data = load_cifar(tmp_path, num_classes=100)
    assert data.y_train.tolist() == labels and data.num_classes == 100


def test_cifar_missing_folder_or_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_cifar(tmp_path / "nowhere")
    folder, _, _ = fake_cifar10(tmp_path)
    os.remove(folder / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar(tmp_path)
    with pytest.raises(ValueError, match="num_classes"):
        load_cifar(tmp_path, num_classes=20)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "content",
    [b"garbage", pickle.dumps({"labels": [1, 2]}), pickle.dumps(_Evil())],
    ids=["garbage", "no-data", "code"],
)
def test_cifar_malformed_file_is_a_clear_error(tmp_path, content):
    folder, _, _ = fake_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(content)
    with pytest.raises(ValueError, match="not a CIFAR python batch file"):
        load_cifar(tmp_path)


def test_cifar_label_count_mismatch(tmp_path):
    folder, _, _ = fake_cifar10(tmp_path)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({"data": np.zeros((3, 3072), np.uint8), "labels": [0, 1]}, fh)
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        load_cifar(tmp_path)


_RANDOM = np.random.default_rng(0).bytes(360)


@pytest.mark.parametrize(
    "content",
    [b"", _RANDOM[:300], b"PK\x03\x04" + _RANDOM[300:], b"x" * 50],
    ids=["empty", "random", "zip", "text"],
)
def test_every_unreadable_cifar_batch_is_one_value_error(tmp_path, content):
    folder, _, _ = fake_cifar10(tmp_path)
    (folder / "data_batch_2").write_bytes(content)
    with pytest.raises(ValueError, match="data_batch_2 is not a CIFAR python batch file") as info:
        load_cifar(tmp_path)
    assert "\n" not in str(info.value)


def test_cifar_labels_out_of_range_are_refused(tmp_path):
    folder, _, _ = fake_cifar10(tmp_path)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 57]}, fh)
    with pytest.raises(ValueError, match=r"labels outside 0\.\.9 \(0\.\.57\): is it CIFAR-10"):
        load_cifar(tmp_path)


# ------------------------------------------------------------------ your own data sets
def _pairs(n: int, seed: int = 0) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 3, generator=gen)
    return torch.utils.data.TensorDataset(x, torch.arange(n) % 4)


def test_from_datasets_takes_a_train_test_pair_as_it_is():
    train, test = _pairs(10), _pairs(6, seed=1)
    data = from_datasets((train, test), name="mine")
    assert torch.equal(data.x_train, train.tensors[0]) and torch.equal(data.y_test, test.tensors[1])
    assert data.input_shape == (2, 3) and data.num_classes == 4 and data.name == "mine"
    assert data.y_train.dtype == torch.int64


def test_from_datasets_splits_one_data_set_like_digits():
    data = from_datasets(_pairs(20), name="one")
    assert (len(data.y_train), len(data.y_test)) == (15, 5)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    x = _pairs(20).tensors[0][perm]
    assert torch.equal(data.x_test, x[:5]) and torch.equal(data.x_train, x[5:])


def test_from_datasets_reads_plain_python_examples_and_float_targets():
    examples = [(np.full(3, i, dtype=np.float32), float(i) / 2) for i in range(8)]
    data = from_datasets((examples[:6], examples[6:]), name="regression")
    assert data.x_train.shape == (6, 3) and data.y_train.dtype == torch.float32
    assert data.num_classes == 1  # one output per example
    assert data.y_test.tolist() == [3.0, 3.5]


class _Failing(torch.utils.data.Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        if i == 2:
            raise OSError("file vanished")
        return torch.zeros(2), 0


@pytest.mark.parametrize(
    ("datasets", "error", "match"),
    [
        (3, TypeError, "the training set is a int, not a data set"),
        ([], ValueError, "the training set is empty"),
        ([torch.zeros(2)], TypeError, "example 0 of the training set is a Tensor, not an"),
        ([(torch.zeros(2), 0), (torch.zeros(3), 1)], ValueError, "differ in shape"),
        ([(torch.zeros(2), -1), (torch.zeros(2), 1)], ValueError, "labels must be >= 0"),
        ([("a", 0), ("b", 1)], TypeError, "example 0 of the training set holds"),
        (_Failing(), ValueError, "reading the training set raised OSError: file vanished"),
        ([(torch.zeros(2), 0)], ValueError, "at least 2 examples"),
    ],
)
def test_from_datasets_errors(datasets, error, match):
    with pytest.raises(error, match=match):
        from_datasets(datasets, name="bad")


def test_digest_sees_labels_inputs_and_names():
    data = synthetic_classification(num_train=20, num_test=10)
    same = synthetic_classification(num_train=20, num_test=10)
    assert digest(data) == digest(same) and len(digest(data)) == 16
    same.y_train[0] = (same.y_train[0] + 1) % 3
    assert digest(data) != digest(same)
    data.name = "other"
    assert digest(data) != digest(synthetic_classification(num_train=20, num_test=10))


# ------------------------------------------------------------------ synthetic, batches
def test_synthetic_is_seeded():
    a = synthetic_classification(50, num_features=4, num_classes=3, seed=5, dtype=torch.float64)
    b = synthetic_classification(50, num_features=4, num_classes=3, seed=5, dtype=torch.float64)
    c = synthetic_classification(50, num_features=4, num_classes=3, seed=6, dtype=torch.float64)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    assert a.x_train.dtype == torch.float64 and a.input_shape == (4,)
    assert len(a.y_test) == 128 and set(a.y_train.tolist()) <= {0, 1, 2}


def test_batches_cover_the_data_once_in_order_or_shuffled():
    x = torch.arange(10.0).reshape(10, 1)
    y = torch.arange(10)
    plain = batches(x, y, 4)
    assert [len(b[1]) for b in plain] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in plain]), y)
    assert [len(b[1]) for b in batches(x, y, 4, drop_last=True)] == [4, 4]

    shuffled = batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(1))
    order = torch.cat([b[1] for b in shuffled])
    assert sorted(order.tolist()) == list(range(10)) and not torch.equal(order, y)
    assert torch.equal(torch.cat([b[0] for b in shuffled]).reshape(-1), order.double().float())
    again = batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.cat([b[1] for b in again]), order)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"batch_size": 2, "shuffle": True}, "Generator"),
    ],
)
def test_batches_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        batches(torch.zeros(4, 1), torch.zeros(4), **kwargs)
    with pytest.raises(ValueError, match="samples"):
        batches(torch.zeros(4, 1), torch.zeros(3), 2)


# ------------------------------------------------------------------ read every epoch
def test_stream_cifar_reads_what_load_cifar_holds_one_example_at_a_time(tmp_path):
    from flatlens.data import stream_cifar, with_normalization

    _, parts, _ = fake_cifar10(tmp_path)
    memory = load_cifar(tmp_path)
    streams = stream_cifar(tmp_path)
    assert (streams.size("train"), streams.size("test"), streams.num_classes) == (20, 3, 10)
    assert streams.mean == pytest.approx(memory.mean, abs=1e-6)
    assert streams.std == pytest.approx(memory.std, abs=1e-6)
    for i in (0, 7, 19):
        x, y = streams.train[i]
        assert torch.allclose(x, memory.x_train[i], atol=1e-5) and y == memory.y_train[i]
    constants = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    fixed = with_normalization(streams, *constants)
    raw = torch.from_numpy(parts[0][0][1].reshape(3, 32, 32)).float() / 255
    mean, std = (torch.tensor(c)[:, None, None] for c in constants)
    assert torch.allclose(fixed.train[1][0], (raw - mean) / std, atol=1e-6)
    in_memory = with_normalization(memory, *constants)
    assert torch.allclose(in_memory.x_train[1], (raw - mean) / std, atol=1e-5)
    assert in_memory.mean == constants[0] and fixed.std == constants[1]
    assert streams.digest() == stream_cifar(tmp_path).digest() != fixed.digest()


def test_streams_of_your_own_data_sets_need_flatlens_readers_to_renormalize():
    from torch.utils.data import TensorDataset

    from flatlens.data import Streams, with_normalization

    x, y = torch.rand(6, 3, 4, 4), torch.arange(6) % 2
    streams = Streams(TensorDataset(x, y), TensorDataset(x, y))
    assert streams.num_classes == 2 and streams.input_shape == (3, 4, 4)
    with pytest.raises(ValueError, match="normalize it in your data set"):
        with_normalization(streams, (0.5,) * 3, (0.2,) * 3)
