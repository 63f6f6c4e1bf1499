"""Data sets: scikit-learn's bundled digits, CIFAR-10/100 from a local folder, synthetic sets.

Nothing is ever downloaded. Each loader returns in-memory tensors ``(x_train, y_train,
x_test, y_test)`` and :func:`batches` cuts a tensor pair into a list of batches.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["Dataset", "batches", "load_cifar", "load_digits", "synthetic_classification"]


@dataclass
class Dataset:
    """A train/test split held in memory.

    Attributes:
        x_train, y_train, x_test, y_test: Tensors (inputs float32, labels int64).
        num_classes: Number of classes.
        name: A short name for reports.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input example."""
        return tuple(self.x_train.shape[1:])

    def train(self) -> tuple[Tensor, Tensor]:
        """The training pair."""
        return self.x_train, self.y_train

    def test(self) -> tuple[Tensor, Tensor]:
        """The test pair."""
        return self.x_test, self.y_test


def load_digits(*, test_fraction: float = 0.25, image: bool = False, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), split deterministically.

    Pixels are scaled to [0, 1]. ``image=True`` gives shape ``(N, 1, 8, 8)`` for CNNs,
    otherwise ``(N, 64)``. The split is a fixed permutation drawn from ``seed``.
    """
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data set ships with scikit-learn: pip install 'flatlens[digits]'"
        ) from err
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = _sk_digits()
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    if image:
        x = x.reshape(-1, 1, 8, 8)
    n_test = round(len(y) * test_fraction)
    return Dataset(x[n_test:], y[n_test:], x[:n_test], y[:n_test], 10, "digits")


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batch files hold (dicts, lists, bytes, NumPy arrays)."""

    _allowed = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            # Re-pickled copies: protocol 2 from Python 3 stores bytes via _codecs.encode,
            # protocol 5 stores arrays via _frombuffer. Both only build data.
            ("_codecs", "encode"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as fh:
            entry = _CifarUnpickler(fh, encoding="latin1").load()
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except Exception as err:
        raise ValueError(f"{path} is not a CIFAR python batch file ({err})") from err
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def load_cifar(root: str | Path, *, num_classes: int = 10) -> Dataset:
    """CIFAR-10 or CIFAR-100 from a local folder in the original python format.

    ``root`` is the extracted ``cifar-10-batches-py`` (``data_batch_1..5``, ``test_batch``)
    or ``cifar-100-python`` (``train``, ``test``) folder, or a folder containing it. Inputs
    are normalized per channel with the training set's mean and standard deviation.

    Raises:
        FileNotFoundError: if the folder or a batch file is missing (nothing is downloaded).
        ValueError: if a file is malformed.
    """
    if num_classes not in (10, 100):
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
    root = Path(root).expanduser()
    sub = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    if (root / sub).is_dir():
        root = root / sub
    if not root.is_dir():
        raise FileNotFoundError(
            f"CIFAR-{num_classes} folder {root} does not exist; download and extract the "
            f"python version yourself and pass its folder (flatlens never downloads)"
        )
    if num_classes == 10:
        train_files = [root / f"data_batch_{i}" for i in range(1, 6)]
        test_files, key = [root / "test_batch"], "labels"
    else:
        train_files, test_files, key = [root / "train"], [root / "test"], "fine_labels"
    for f in train_files + test_files:
        if not f.is_file():
            raise FileNotFoundError(f"CIFAR-{num_classes}: missing file {f}")
    xs, ys = zip(*(_read_cifar_batch(f, key) for f in train_files), strict=True)
    xt, yt = _read_cifar_batch(test_files[0], key)
    x_train = torch.from_numpy(np.concatenate(xs)).float() / 255
    x_test = torch.from_numpy(xt).float() / 255
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True)
    return Dataset(
        (x_train - mean) / std,
        torch.from_numpy(np.concatenate(ys)),
        (x_test - mean) / std,
        torch.from_numpy(yt),
        num_classes,
        f"cifar{num_classes}",
    )


def synthetic_classification(
    n: int = 256,
    dim: int = 10,
    num_classes: int = 3,
    *,
    test_n: int = 128,
    noise: float = 0.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Gaussian clusters around random class means: a small, fast classification task."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64) * 2

    def draw(count: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, num_classes, (count,), generator=gen)
        x = means[y] + noise * torch.randn(count, dim, generator=gen, dtype=torch.float64)
        return x.to(dtype), y

    x_train, y_train = draw(n)
    x_test, y_test = draw(test_n)
    return Dataset(x_train, y_train, x_test, y_test, num_classes, "synthetic")


def batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> list[tuple[Tensor, Tensor]]:
    """Cut ``(x, y)`` into batches of ``batch_size``; the last one may be smaller.

    Args:
        x: Inputs, first dimension the samples.
        y: Targets with the same number of samples.
        batch_size: Samples per batch (>= 1).
        shuffle: Visit the samples in the order of ``torch.randperm(N, generator=...)``.
        generator: Source of the permutation (required with ``shuffle``, so runs repeat).
        drop_last: Leave out a last batch smaller than ``batch_size``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    n = len(y)
    if shuffle:
        if generator is None:
            raise ValueError("shuffle=True needs a torch.Generator, so the order can be replayed")
        order = torch.randperm(n, generator=generator)
        x, y = x[order], y[order]
    stop = n - n % batch_size if drop_last else n
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, stop, batch_size)]
