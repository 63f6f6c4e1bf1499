"""flatlens' own readers of image data for :class:`~flatlens._streams.Streams`: CIFAR's python
batches and image folders decoded per example, and the data sets a factory returns."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, Subset

from flatlens._streams import Streams

__all__ = ["STATS_SAMPLES", "stream_cifar", "stream_datasets", "stream_imagefolder"]

STATS_SAMPLES = 10_000
"""Images whose pixels give the normalization statistics of an image folder (all of them
when there are fewer)."""


def _normalizer(mean: Sequence[float] | None, std: Sequence[float] | None):
    if mean is None or std is None:
        return None
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return m, s


class _Images(torch.utils.data.Dataset):
    """Images held as uint8 ``(N, C, H, W)`` (CIFAR's python batches), decoded per example
    as torchvision's ``ToTensor`` + ``Normalize`` do: ``(x / 255 − mean) / std``."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, mean, std) -> None:
        self.pixels, self.targets = pixels, labels
        self.mean, self.std = mean, std
        self._norm = _normalizer(mean, std)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = torch.from_numpy(np.ascontiguousarray(self.pixels[i])).to(torch.float32).div(255)
        if self._norm is not None:
            x = x.sub_(self._norm[0]).div_(self._norm[1])
        return x, int(self.targets[i])

    def renormalized(self, mean, std) -> _Images:
        return _Images(self.pixels, self.targets, mean, std)

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.pixels.tobytes())
        h.update(np.asarray(self.targets, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


class _ImageFiles(torch.utils.data.Dataset):
    """Image files ``(path, class)`` decoded per example to RGB ``(x / 255 − mean) / std``."""

    def __init__(self, samples: list[tuple[str, int]], mean, std) -> None:
        self.samples = samples
        self.targets = [c for _, c in samples]
        self.mean, self.std = mean, std
        self._norm = _normalizer(mean, std)

    def __len__(self) -> int:
        return len(self.samples)

    def raw(self, i: int) -> Tensor:
        from PIL import Image

        with Image.open(self.samples[i][0]) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div(255)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = self.raw(i)
        if self._norm is not None:
            x = x.sub_(self._norm[0]).div_(self._norm[1])
        return x, self.samples[i][1]

    def renormalized(self, mean, std) -> _ImageFiles:
        out = _ImageFiles(self.samples, mean, std)
        if hasattr(self, "classes"):
            out.classes = self.classes
        return out

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for path, c in self.samples:
            stat = Path(path).stat()
            h.update(f"{Path(path).name}|{c}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def _pixel_stats(images: Callable[[int], Tensor], indices: Sequence[int]) -> tuple:
    """Per-channel mean and (unbiased) standard deviation of the pixels of some images in
    [0, 1], float64 sums; images of different shapes are refused."""
    total = squares = None
    count, shape = 0, None
    for i in indices:
        x = images(i).to(torch.float64)
        if shape is None:
            shape = tuple(x.shape)
        elif tuple(x.shape) != shape:
            raise ValueError(
                f"the inputs of the training set differ in shape: example {indices[0]} is "
                f"{shape}, example {i} is {tuple(x.shape)}; every example must have the same "
                "shape (resize the images to one size)"
            )
        flat = x.reshape(x.shape[0], -1)
        total = flat.sum(1) if total is None else total + flat.sum(1)
        squares = (flat**2).sum(1) if squares is None else squares + (flat**2).sum(1)
        count += flat.shape[1]
    mean = total / count
    var = (squares - count * mean**2) / max(count - 1, 1)
    std = var.clamp_min(1e-24).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def _uint8_stats(pixels: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and unbiased standard deviation of uint8 images ``(N, C, H, W)``
    scaled to [0, 1], exactly (float64) from each channel's histogram of 256 values."""
    levels = np.arange(256, dtype=np.float64) / 255
    means, stds = [], []
    for c in range(pixels.shape[1]):
        counts = np.bincount(pixels[:, c].reshape(-1), minlength=256).astype(np.float64)
        n = counts.sum()
        mean = float(counts @ levels / n)
        var = float(counts @ (levels - mean) ** 2 / max(n - 1, 1))
        means.append(mean)
        stds.append(var**0.5)
    return tuple(means), tuple(stds)


def stream_cifar(
    root: str | Path,
    *,
    num_classes: int = 10,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Streams:
    """CIFAR-10 or CIFAR-100 from the python batch files in ``root``, read per example.

    The pixels stay uint8 in memory (150 MB for CIFAR-10's training set, as torchvision's
    ``CIFAR10`` keeps them); each example is converted and normalized when it is read,
    ``(x / 255 − mean) / std`` per channel, with ``mean`` and ``std`` the training set's
    (every pixel, float64 sums) unless given.

    Raises:
        FileNotFoundError, ValueError: as :func:`flatlens.data.load_cifar`.
    """
    from flatlens.data import _cifar_arrays

    (xs, ys), (xt, yt) = _cifar_arrays(Path(root), num_classes)
    if mean is None or std is None:
        mean, std = _uint8_stats(xs)
    train = _Images(xs, ys, mean, std)
    test = _Images(xt, yt, mean, std)
    return Streams(
        train, test, num_classes=num_classes, name=f"cifar{num_classes}", mean=mean, std=std
    )


def stream_imagefolder(
    root: str | Path,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    test_fraction: float = 0.25,
) -> Streams:
    """Images in ``root/CLASS/`` (or ``root/train/CLASS/`` and ``root/test/CLASS/``),
    decoded per example to RGB and normalized per channel.

    The statistics come from up to :data:`STATS_SAMPLES` training images (a fixed seeded
    choice; all of them when there are fewer) unless ``mean`` and ``std`` are given. One
    folder is split like :func:`flatlens.data.load_digits`: a fixed permutation, the first
    ``test_fraction`` held out. Needs torchvision (for the folder layout) and Pillow.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: no classes or images, other classes in train and test, images of
            different sizes, or torchvision that cannot be imported.
    """
    from flatlens._compat import import_torchvision

    folder = str(root)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    try:
        tv = import_torchvision()
    except ImportError as err:
        raise ValueError(str(err)) from err
    split = (root / "train").is_dir() and (root / "test").is_dir()
    try:
        if split:
            found = [tv.datasets.ImageFolder(str(root / s)) for s in ("train", "test")]
            if found[0].classes != found[1].classes:
                raise ValueError(
                    f"{root}/train and {root}/test hold different classes "
                    f"({found[0].classes} vs {found[1].classes})"
                )
            train_samples, test_samples = found[0].samples, found[1].samples
            classes = found[0].classes
        else:
            whole = tv.datasets.ImageFolder(str(root))
            perm = torch.randperm(len(whole.samples), generator=torch.Generator().manual_seed(0))
            n_test = min(max(1, round(len(perm) * test_fraction)), len(perm) - 1)
            ordered = [whole.samples[int(i)] for i in perm]
            train_samples, test_samples = ordered[n_test:], ordered[:n_test]
            classes = whole.classes
    except ValueError:
        raise
    except Exception as err:  # torchvision's reader: no classes, no images, ...
        text = " ".join(str(err).split())
        raise ValueError(f"image folder {root}: {type(err).__name__}: {text}") from err
    train = _ImageFiles([(str(p), c) for p, c in train_samples], None, None)
    if mean is None or std is None:
        n = len(train)
        chosen: Sequence[int] = range(n)
        if n > STATS_SAMPLES:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
            chosen = sorted(order[:STATS_SAMPLES].tolist())
        try:
            mean, std = _pixel_stats(train.raw, list(chosen))
        except ValueError as err:
            raise ValueError(f"image folder {root}: {err}") from err
    train = _ImageFiles(train.samples, mean, std)
    test = _ImageFiles([(str(p), c) for p, c in test_samples], mean, std)
    train.classes = test.classes = list(classes)
    out = Streams(
        train, test, num_classes=len(classes), name=f"imagefolder:{folder}", mean=mean, std=std
    )
    try:
        out.check()
    except ValueError as err:
        raise ValueError(f"image folder {root}: {err} (resize the images to one size)") from err
    return out


def stream_datasets(
    datasets: Any, *, name: str, test_fraction: float = 0.25, seed: int = 0
) -> Streams:
    """:class:`Streams` over what a data factory returns: a :class:`Streams` (as it is), a
    ``(train, test)`` pair of data sets, or one map-style data set split like
    :func:`flatlens.data.from_datasets` (a fixed permutation from ``seed``, the first
    ``test_fraction`` held out).

    Raises:
        TypeError: something that is not a data set.
        ValueError: one data set with fewer than two examples.
    """
    from flatlens.data import _is_pair

    if isinstance(datasets, Streams):
        return datasets
    if _is_pair(datasets):
        train, test = (_Listed(list(p)) if isinstance(p, list | tuple) else p for p in datasets)
        return Streams(train, test, name=name)
    if isinstance(datasets, IterableDataset) or not isinstance(datasets, torch.utils.data.Dataset):
        if isinstance(datasets, list | tuple) and datasets and isinstance(datasets[0], tuple):
            datasets = _Listed(datasets)
        else:
            raise TypeError(
                f"a data factory must return a torch.utils.data Dataset, a (train, test) pair "
                f"of them or flatlens.data.Streams, not {type(datasets).__name__}"
            )
    n = len(datasets)
    if n < 2:
        raise ValueError("one data set needs at least 2 examples to split into train/test")
    Streams(datasets, datasets, num_classes=1).check()  # its first examples agree, unsplit
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = min(max(1, round(n * test_fraction)), n - 1)
    return Streams(Subset(datasets, perm[n_test:]), Subset(datasets, perm[:n_test]), name=name)


class _Listed(torch.utils.data.Dataset):
    """A list of examples as a map-style data set."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]
