"""Data read from ``torch.utils.data`` data sets every epoch, instead of held in memory.

A :class:`Streams` holds a training and a test set (map-style or iterable data sets, or
``DataLoader`` s) and what the trainer needs to know about them: the number of classes, an
unaugmented view of the training set (for evaluation and the fixed measurement subset) and
the per-channel normalization the inputs carry. :func:`~flatlens.data.stream_cifar` and
:func:`~flatlens.data.stream_imagefolder` (in ``flatlens._readers``) read image files this
way: examples are decoded and normalized one at a time (in the ``DataLoader`` workers), so
augmentation is drawn fresh each epoch and the data never has to fit in memory as float
tensors.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, Subset

__all__ = ["Streams"]


class Streams:
    """Training and test data read from data sets every epoch.

    Args:
        train: The training set: a map-style or iterable ``torch.utils.data`` data set of
            ``(input, target)`` examples, or a ``DataLoader`` (used as it is: its batch size,
            sampler and workers). The trainer batches, shuffles and augments a data set
            itself (see :class:`~flatlens.train.Trainer`); random transforms of your own in
            it are drawn fresh each epoch too.
        test: The test set, read without augmentation.
        num_classes: Number of classes (the model's outputs). Default: from the data set's
            ``classes`` or ``targets``, else 1 + the largest label of one pass over
            ``train_eval``.
        name: A short name for reports and resume checks.
        train_eval: The training set without augmentation, for the per-epoch evaluation
            and the fixed measurement subset (default: ``train``, or a ``DataLoader``'s
            data set). Pass it when ``train`` applies random transforms of its own.
        mean, std: The per-channel constants the inputs were normalized with (None: not
            normalized); the augmentation pads with their black, −mean/std.

    Raises:
        TypeError: ``train`` or ``test`` is not a data set or a ``DataLoader``.
    """

    def __init__(
        self,
        train: Any,
        test: Any,
        *,
        num_classes: int | None = None,
        name: str = "data",
        train_eval: Any = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        for split, value in (("train", train), ("test", test), ("train_eval", train_eval)):
            if value is not None and not isinstance(value, torch.utils.data.Dataset | DataLoader):
                raise TypeError(
                    f"{split} must be a torch.utils.data Dataset or DataLoader, not "
                    f"{type(value).__name__}"
                )
        if test is None:
            raise TypeError("test must be a data set: evaluation needs test data")
        self.train, self.test = train, test
        default = train.dataset if isinstance(train, DataLoader) else train
        self.train_eval = default if train_eval is None else train_eval
        self.name = name
        self.mean = None if mean is None else tuple(float(v) for v in mean)
        self.std = None if std is None else tuple(float(v) for v in std)
        self.num_classes = num_classes if num_classes is not None else self._count_classes()

    # ------------------------------------------------------------------ facts
    def _count_classes(self) -> int:
        base = _base(self.train_eval)
        classes = getattr(base, "classes", None)
        if isinstance(classes, Sequence) and classes:
            return len(classes)
        targets = getattr(base, "targets", None)
        labels: list[int] = []
        if targets is not None:
            labels = [int(t) for t in targets]
        else:
            for _, y in _examples(self.train_eval):
                if torch.is_tensor(y) and y.is_floating_point():
                    return math.prod(y.shape) or 1
                labels.append(int(y))
        if not labels:
            raise ValueError(f"the training set of {self.name!r} is empty")
        if min(labels) < 0:
            raise ValueError(f"class labels must be >= 0, found {min(labels)}")
        return max(labels) + 1

    def first(self, count: int, split: str = "train") -> tuple[Tensor, Tensor]:
        """The first ``count`` unaugmented examples of a split, stacked."""
        source = self.train_eval if split == "train" else self.test
        pairs = []
        for x, y in _examples(source):
            pairs.append((_as_tensor(x), _as_tensor(y)))
            if len(pairs) == count:
                break
        if not pairs:
            raise ValueError(f"the {split} set of {self.name!r} is empty")
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input example."""
        return tuple(self.first(1)[0].shape[1:])

    def size(self, split: str = "train") -> int | None:
        """Examples in a split (None for an iterable data set without ``len``)."""
        source = self.train if split == "train" else self.test
        try:
            return len(source.dataset if isinstance(source, DataLoader) else source)
        except TypeError:
            return None

    def measure_subset(self, measure_samples: int) -> tuple[Tensor, Tensor]:
        """The fixed measurement subset, unaugmented: the first ``measure_samples`` of one
        permutation drawn from seed 0 (map-style), or the first ``measure_samples``
        examples."""
        base, samples = self.train_eval, measure_samples
        if isinstance(base, IterableDataset) or not hasattr(base, "__getitem__"):
            return self.first(samples)
        n = len(base)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: min(samples, n)]
        pairs = [base[int(i)] for i in order]
        xs = torch.stack([_as_tensor(p[0]) for p in pairs])
        return xs, torch.stack([_as_tensor(p[1]) for p in pairs])

    def loader(self, split: str, batch_size: int, num_workers: int = 0) -> DataLoader:
        """An unshuffled, unaugmented ``DataLoader`` over ``"train"`` (``train_eval``) or
        ``"test"``, for evaluation."""
        source = self.train_eval if split == "train" else self.test
        if isinstance(source, DataLoader):
            return source
        return DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=num_workers)

    def renormalized(self, mean: Sequence[float], std: Sequence[float]) -> Streams:
        """These streams with each example normalized by ``mean`` and ``std`` instead
        (flatlens' own image readers only).

        Raises:
            ValueError: a split is not read by :func:`stream_cifar` or
                :func:`stream_imagefolder`.
        """
        parts = []
        for source in (self.train, self.test, self.train_eval):
            from flatlens._readers import _ImageFiles, _Images

            if not isinstance(source, _Images | _ImageFiles):
                raise ValueError(
                    f"{self.name!r} was not read by flatlens' CIFAR or image-folder reader, so "
                    "it cannot be renormalized here: normalize it in your data set and leave "
                    "data_mean/data_std unset"
                )
            parts.append(source.renormalized(mean, std))
        train, test, train_eval = parts
        return Streams(
            train,
            test,
            num_classes=self.num_classes,
            name=self.name,
            train_eval=train_eval if self.train_eval is not self.train else None,
            mean=mean,
            std=std,
        )

    def check(self, count: int = 256) -> None:
        """Read the first ``count`` examples of each split and raise ``ValueError`` (one
        line) when their inputs or targets differ in shape, within a split or between the
        splits, or a class label is negative; a later mismatch fails when it is batched.

        Raises:
            ValueError: as above, or any exception the data set raised while read.
        """
        shapes = {}
        for split in ("train", "test"):
            source = self.train_eval if split == "train" else self.test
            what = "training" if split == "train" else "test"
            first: tuple | None = None
            try:
                for i, example in enumerate(_examples(source)):
                    if i == count:
                        break
                    if not isinstance(example, tuple | list) or len(example) != 2:
                        raise TypeError(
                            f"example {i} of the {what} set is a {type(example).__name__}, "
                            "not an (input, target) pair"
                        )
                    x, y = (_as_tensor(v) for v in example)
                    if not y.is_floating_point() and y.numel() == 1 and int(y) < 0:
                        raise ValueError(f"class labels must be >= 0, found {int(y)}")
                    now = (tuple(x.shape), tuple(y.shape))
                    if first is None:
                        first = now
                    elif now[0] != first[0]:
                        raise ValueError(
                            f"the inputs of the {what} set differ in shape: example 0 is "
                            f"{first[0]}, example {i} is {now[0]}; every example must have "
                            "the same shape"
                        )
            except (TypeError, ValueError):
                raise
            except Exception as err:  # the user's data set failed
                text = " ".join(str(err).split()) or "(no message)"
                raise ValueError(
                    f"reading the {what} set raised {type(err).__name__}: {text}"
                ) from err
            if first is None:
                raise ValueError(f"the {what} set is empty")
            shapes[split] = first
        if shapes["train"] != shapes["test"]:
            raise ValueError(
                f"train and test examples differ in shape: inputs {shapes['train'][0]} vs "
                f"{shapes['test'][0]}, targets {shapes['train'][1]} vs {shapes['test'][1]}"
            )

    def digest(self) -> str:
        """A fingerprint: name, classes, sizes and the data (whole files for flatlens' own
        readers, else the first 64 examples of each split)."""
        h = hashlib.sha256(f"{self.name}|{self.num_classes}|{self.mean}|{self.std}".encode())
        for split in ("train", "test"):
            h.update(f"{self.size(split)}".encode())
            base = _base(self.train_eval if split == "train" else self.test)
            if hasattr(base, "fingerprint"):
                h.update(base.fingerprint().encode())
                continue
            x, y = self.first(64, split)
            for t in (x, y):
                t = t.detach().cpu().contiguous()
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).numpy().tobytes())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return (
            f"Streams({self.name!r}, train={self.size('train')}, test={self.size('test')}, "
            f"num_classes={self.num_classes})"
        )


def _base(source: Any) -> Any:
    """The data set behind a DataLoader or a Subset (for its attributes)."""
    if isinstance(source, DataLoader):
        source = source.dataset
    while isinstance(source, Subset):
        source = source.dataset
    return source


def _examples(source: Any) -> Iterator[tuple[Any, Any]]:
    """Every example of a data set, or of a DataLoader's batches one by one."""
    if isinstance(source, DataLoader):
        for x, y in source:
            yield from zip(x, y, strict=True)
    elif isinstance(source, IterableDataset) or not hasattr(source, "__len__"):
        yield from source
    else:
        for i in range(len(source)):
            yield source[i]


def _as_tensor(value: Any) -> Tensor:
    if torch.is_tensor(value):
        return value.detach()
    if isinstance(value, bool | int | np.integer):
        return torch.tensor(int(value), dtype=torch.int64)
    if isinstance(value, float | np.floating):
        return torch.tensor(float(value), dtype=torch.float32)
    return torch.from_numpy(np.asarray(value).copy())
