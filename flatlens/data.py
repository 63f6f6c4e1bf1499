"""Data sets: scikit-learn's bundled digits, CIFAR-10/100 from a local folder, your own
``torch.utils.data`` data sets, synthetic sets.

Nothing is ever downloaded. Two forms: a :class:`Dataset` holds in-memory tensors
``(x_train, y_train, x_test, y_test)`` (the fast path for small data; :func:`batches` cuts
a tensor pair into batches), and :class:`Streams` reads ``torch.utils.data`` data sets
every epoch (:func:`stream_cifar`, :func:`stream_imagefolder`, :func:`stream_datasets`), so
augmentation (:class:`Augmentation`) is fresh each epoch and data of any size trains.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flatlens._augment import AUGMENTATIONS, Augmentation
from flatlens._readers import stream_cifar, stream_datasets, stream_imagefolder
from flatlens._streams import Streams
from flatlens.core._renames import renamed

__all__ = [
    "AUGMENTATIONS",
    "Augmentation",
    "Dataset",
    "Streams",
    "batches",
    "digest",
    "from_datasets",
    "load_cifar",
    "load_digits",
    "model_inputs",
    "stream_cifar",
    "stream_datasets",
    "stream_imagefolder",
    "synthetic_classification",
    "with_normalization",
]


@dataclass
class Dataset:
    """A train/test split held in memory.

    Attributes:
        x_train, y_train, x_test, y_test: Tensors (inputs float32, labels int64).
        num_classes: Number of classes.
        name: A short name for reports.
        mean, std: The per-channel constants the inputs were normalized with, (x − mean) /
            std, or None (not normalized); augmentation pads with their black, −mean/std.
        input_names: ``None``: the model is called as ``model(x)``. Otherwise the inputs
            are keyword inputs stacked along dimension 1 (tokenized text: ``x`` of shape
            (examples, columns, tokens)) and the model is called as
            ``model(**{name: x[:, i] for i, name in enumerate(input_names)})``
            (see :func:`model_inputs`).
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    name: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_names: tuple[str, ...] | None = None

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


def model_inputs(x: Tensor, input_names: tuple[str, ...] | None) -> Any:
    """What the model is called with for inputs ``x``: ``x`` itself, or for keyword inputs
    stacked along dimension 1 the mapping ``{name: x[:, i]}`` (see :class:`Dataset`)."""
    if input_names is None:
        return x
    return {name: x[:, i] for i, name in enumerate(input_names)}


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
    except Exception as err:  # every failure of the reader: one line
        text = " ".join(str(err).split()) or "(no message)"
        raise ValueError(
            f"{path} is not a CIFAR python batch file ({type(err).__name__}: {text})"
        ) from err
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{path} holds labels outside 0..{num_classes - 1} "
            f"({int(labels.min())}..{int(labels.max())}): is it CIFAR-{num_classes}?"
        )


def _cifar_arrays(
    root: Path, num_classes: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The uint8 images ``(N, 3, 32, 32)`` and int64 labels of CIFAR's train and test
    batch files in ``root`` (or its ``cifar-10-batches-py`` / ``cifar-100-python``)."""
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
    for f, labels in zip([*train_files, *test_files], [*ys, yt], strict=True):
        _check_labels(labels, num_classes, f)
    return (np.concatenate(xs), np.concatenate(ys)), (xt, yt)


def load_cifar(root: str | Path, *, num_classes: int = 10) -> Dataset:
    """CIFAR-10 or CIFAR-100 from a local folder in the original python format, in memory.

    ``root`` is the extracted ``cifar-10-batches-py`` (``data_batch_1..5``, ``test_batch``)
    or ``cifar-100-python`` (``train``, ``test``) folder, or a folder containing it. Inputs
    are normalized per channel with the training set's mean and standard deviation (kept
    in ``mean`` and ``std``). :func:`stream_cifar` reads the same files per example.

    Raises:
        FileNotFoundError: if the folder or a batch file is missing (nothing is downloaded).
        ValueError: if a file is malformed.
    """
    (xs, ys), (xt, yt) = _cifar_arrays(Path(root), num_classes)
    x_train = torch.from_numpy(xs).float() / 255
    x_test = torch.from_numpy(xt).float() / 255
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True)
    return Dataset(
        (x_train - mean) / std,
        torch.from_numpy(ys),
        (x_test - mean) / std,
        torch.from_numpy(yt),
        num_classes,
        f"cifar{num_classes}",
        tuple(mean.reshape(-1).tolist()),
        tuple(std.reshape(-1).tolist()),
    )


def with_normalization(
    data: Dataset | Streams, mean: Sequence[float], std: Sequence[float]
) -> Dataset | Streams:
    """``data`` with its inputs normalized per channel as ``(x − mean) / std`` of the raw
    inputs, instead of the normalization it carries (``data.mean``, ``data.std``).

    A :class:`Dataset` is converted in memory (first undoing its own normalization, when
    it has one); a :class:`Streams` read by :func:`stream_cifar` or
    :func:`stream_imagefolder` normalizes each example with the new constants when read.

    Raises:
        ValueError: constants that do not fit the channels, or a :class:`Streams` over data
            sets flatlens did not make (normalize those yourself).
    """
    mean = tuple(float(v) for v in mean)
    std = tuple(float(v) for v in std)
    if len(mean) != len(std) or min(std) <= 0:
        raise ValueError("mean and std need one value per channel, std > 0")
    if data.mean == mean and data.std == std:
        return data
    if isinstance(data, Streams):
        return data.renormalized(mean, std)
    channels = data.x_train.shape[1] if data.x_train.dim() > 1 else 0
    if channels != len(mean):
        raise ValueError(
            f"{len(mean)} normalization constants for inputs of shape {data.input_shape}: "
            "one per channel (dimension 1) is needed"
        )
    shape = (1, len(mean)) + (1,) * (data.x_train.dim() - 2)

    def convert(x: Tensor) -> Tensor:
        if data.mean is not None and data.std is not None:
            x = x * torch.tensor(data.std).reshape(shape) + torch.tensor(data.mean).reshape(shape)
        return ((x - torch.tensor(mean).reshape(shape)) / torch.tensor(std).reshape(shape)).to(
            data.x_train.dtype
        )

    return dataclasses.replace(
        data, x_train=convert(data.x_train), x_test=convert(data.x_test), mean=mean, std=std
    )


@renamed(n="num_train", dim="num_features", test_n="num_test")
def synthetic_classification(
    num_train: int = 256,
    num_features: int = 10,
    num_classes: int = 3,
    *,
    num_test: int = 128,
    noise: float = 0.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Gaussian clusters around random class means: a small, fast classification task.

    x = mu_y + noise * N(0, I) with class means mu_c ~ 2 N(0, I) in ``num_features``
    dimensions and labels y uniform over ``num_classes``.
    """
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, num_features, generator=gen, dtype=torch.float64) * 2

    def draw(count: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, num_classes, (count,), generator=gen)
        x = means[y] + noise * torch.randn(count, num_features, generator=gen, dtype=torch.float64)
        return x.to(dtype), y

    x_train, y_train = draw(num_train)
    x_test, y_test = draw(num_test)
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


def digest(data: Dataset | Streams) -> str:
    """A cheap fingerprint of a data set: its name, sizes, all labels and the first inputs
    (for :class:`Streams`, :meth:`Streams.digest`).

    Two data sets with the same digest are, for every practical purpose, the same; it is
    what resumed training runs and diagnoses compare (16 hex digits).
    """
    if isinstance(data, Streams):
        return data.digest()
    h = hashlib.sha256(f"{data.name}|{data.num_classes}".encode())
    if data.input_names is not None:
        h.update(f"|{','.join(data.input_names)}".encode())
    for t in (data.y_train, data.y_test, data.x_train[:256], data.x_test[:256]):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).numpy().tobytes())
    h.update(f"{len(data.x_train)},{len(data.x_test)}".encode())
    return h.hexdigest()[:16]


def _as_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, bool | int | np.integer):
        return torch.tensor(int(value), dtype=torch.int64)
    if isinstance(value, float | np.floating):
        return torch.tensor(float(value), dtype=torch.float32)
    array = np.asarray(value)
    if array.dtype == object:
        raise TypeError(f"a {type(value).__name__} that is not numbers")
    return torch.from_numpy(array.copy())


def _stack(values: list[Tensor], what: str, split: str) -> Tensor:
    first = tuple(values[0].shape)
    for i, v in enumerate(values):
        if tuple(v.shape) != first:
            raise ValueError(
                f"the {what} of the {split} set differ in shape: example 0 is {first}, "
                f"example {i} is {tuple(v.shape)}; every example must have the same shape"
            )
    return torch.stack(values)


def _examples(source: Any, split: str) -> tuple[Tensor, Tensor]:
    """Every ``(input, target)`` example of ``source`` as two stacked tensors."""
    if isinstance(source, Tensor | np.ndarray | str | bytes) or not (
        hasattr(source, "__getitem__") or isinstance(source, Iterable)
    ):
        raise TypeError(f"the {split} set is a {type(source).__name__}, not a data set")
    try:
        if hasattr(source, "__len__") and hasattr(source, "__getitem__"):
            examples = [source[i] for i in range(len(source))]
        else:
            examples = list(source)
    except Exception as err:  # the user's data set failed
        text = " ".join(str(err).split()) or "(no message)"
        raise ValueError(f"reading the {split} set raised {type(err).__name__}: {text}") from err
    if not examples:
        raise ValueError(f"the {split} set is empty")
    xs, ys = [], []
    for i, example in enumerate(examples):
        if not isinstance(example, tuple | list) or len(example) != 2:
            raise TypeError(
                f"example {i} of the {split} set is a {type(example).__name__}, not an "
                "(input, target) pair"
            )
        try:
            xs.append(_as_tensor(example[0]))
            ys.append(_as_tensor(example[1]))
        except (TypeError, ValueError) as err:
            raise TypeError(f"example {i} of the {split} set holds {err}") from None
    return _stack(xs, "inputs", split), _stack(ys, "targets", split)


def _is_pair(obj: Any) -> bool:
    """Whether ``obj`` is a ``(train, test)`` tuple of data sets, not one data set."""
    if not isinstance(obj, tuple) or len(obj) != 2:
        return False
    return all(
        isinstance(part, torch.utils.data.Dataset)
        or (isinstance(part, list | tuple) and bool(part) and isinstance(part[0], tuple | list))
        for part in obj
    )


def from_datasets(
    datasets: Any,
    *,
    name: str,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> Dataset:
    """A :class:`Dataset` from ``torch.utils.data`` data sets of ``(input, target)`` examples.

    Every example is read once and stacked in memory (inputs keep their dtype; integer and
    Python ``int`` targets become int64 class labels, floating targets stay as they are).

    Args:
        datasets: One data set, or a ``(train, test)`` tuple of them. One data set is split
            like :func:`load_digits`: a fixed permutation drawn from ``seed``, the first
            ``test_fraction`` of it for testing.
        name: The data set's name in reports.
        test_fraction: Share of a single data set held out for testing.
        seed: Seed of that split.

    Returns:
        The data set; ``num_classes`` is 1 + the largest label for class labels, else the
        number of values of one target (the outputs a model needs).

    Raises:
        TypeError: something that is not a data set of ``(input, target)`` pairs.
        ValueError: an empty split, examples of different shapes, negative labels, or any
            exception the data set raised while it was read (type and message kept).
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if _is_pair(datasets):
        x_train, y_train = _examples(datasets[0], "training")
        x_test, y_test = _examples(datasets[1], "test")
    else:
        x, y = _examples(datasets, "training")
        if len(y) < 2:
            raise ValueError("one data set needs at least 2 examples to split into train/test")
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        n_test = min(max(1, round(len(y) * test_fraction)), len(y) - 1)
        x, y = x[perm], y[perm]
        x_train, y_train, x_test, y_test = x[n_test:], y[n_test:], x[:n_test], y[:n_test]
    if x_train.shape[1:] != x_test.shape[1:] or y_train.shape[1:] != y_test.shape[1:]:
        raise ValueError(
            f"train and test examples differ in shape: inputs {tuple(x_train.shape[1:])} vs "
            f"{tuple(x_test.shape[1:])}, targets {tuple(y_train.shape[1:])} vs "
            f"{tuple(y_test.shape[1:])}"
        )
    if y_train.is_floating_point() or y_test.is_floating_point():
        num_classes = math.prod(y_train.shape[1:])
    else:
        y_train, y_test = y_train.long(), y_test.long()
        low = min(int(y_train.min()), int(y_test.min()))
        if low < 0:
            raise ValueError(f"class labels must be >= 0, found {low}")
        num_classes = max(int(y_train.max()), int(y_test.max())) + 1
    return Dataset(x_train, y_train, x_test, y_test, num_classes, name)
