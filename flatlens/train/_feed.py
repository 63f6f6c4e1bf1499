"""How the trainer reads its data: training batches each epoch, evaluation data, the fixed
measurement subset, and the random states that make a resumed run repeat exactly.

Two paths:

* an in-memory :class:`~flatlens.data.Dataset` (the fast path): each epoch shuffles the
  tensors with the trainer's generator and slices batches;
* :class:`~flatlens.data.Streams`: a ``DataLoader`` over the training set each epoch, with
  ``num_workers`` workers and a batch sampler that shuffles with the same generator (and,
  under ``torch.distributed``, gives each rank its contiguous share of every global batch,
  as the in-memory path does); a ``DataLoader`` given by the user is used as it is.

Augmentation (:class:`~flatlens.data.Augmentation`) runs either on the training device, on
each batch, from a generator of its own (``augment_on="device"``), or per example in the
``DataLoader`` workers through ``torchvision.transforms.v2`` when it imports (else the
tensor implementation), seeded per worker from a loader generator (``"workers"``). Every
generator's state is saved with the checkpoints. Evaluation and measures never see it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, Subset

from flatlens import distributed as fd
from flatlens._augment import Augmentation
from flatlens._streams import Streams
from flatlens.core._checks import make_generator
from flatlens.data import Dataset, batches

__all__ = ["AUGMENT_ON", "Feed", "check_distributed"]

AUGMENT_ON = ("device", "workers")


class _Batches(torch.utils.data.Sampler):
    """Index lists of one epoch: a permutation from ``generator`` cut into global batches of
    ``batch_size``, each rank taking its contiguous share (:func:`flatlens.distributed.
    shard_range`)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, world: int) -> None:
        self.n, self.batch_size, self.generator, self.world = n, batch_size, generator, world

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=self.generator).tolist()
        for start in range(0, self.n, self.batch_size):
            chunk = order[start : start + self.batch_size]
            if self.world > 1:
                chunk = chunk[fd.shard_range(len(chunk), world=self.world)]
            yield chunk


class _Augmented(torch.utils.data.Dataset):
    """A map-style data set whose inputs pass through ``transform`` (per example)."""

    def __init__(self, base: Any, transform: Callable[[Tensor], Tensor]) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        x, y = self.base[i]
        return self.transform(torch.as_tensor(x)), y


class _AugmentedStream(IterableDataset):
    """An iterable data set whose inputs pass through ``transform`` (per example)."""

    def __init__(self, base: Any, transform: Callable[[Tensor], Tensor]) -> None:
        self.base, self.transform = base, transform

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for x, y in self.base:
            yield self.transform(torch.as_tensor(x)), y


class _Pairs(torch.utils.data.Dataset):
    """In-memory tensors as a map-style data set (for per-example augmentation)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


class Feed:
    """The data side of a :class:`~flatlens.train.Trainer` (see the module docstring).

    Args:
        data: A :class:`~flatlens.data.Dataset` or :class:`~flatlens.data.Streams`.
        batch_size, eval_batch_size: Examples per training and evaluation batch.
        seed: Seeds the shuffling (``seed``, as before streams existed), the device
            augmentation (``seed + 1``) and the loader's worker seeds (``seed + 2``).
        device, dtype: Where training batches go (floating inputs are cast to ``dtype``).
        augment: The augmentation, or None.
        augment_on: ``"device"`` or ``"workers"``.
        num_workers: ``DataLoader`` workers for streams (and for per-example augmentation
            of in-memory data).
        distributed: Give each rank its share of every batch.
    """

    def __init__(
        self,
        data: Dataset | Streams,
        *,
        batch_size: int,
        eval_batch_size: int,
        seed: int,
        device: torch.device,
        dtype: torch.dtype,
        augment: Augmentation | None,
        augment_on: str,
        num_workers: int,
        distributed: bool,
    ) -> None:
        if augment_on not in AUGMENT_ON:
            raise ValueError(f"augment_on must be one of {list(AUGMENT_ON)}, not {augment_on!r}")
        self.data = data
        self.streaming = isinstance(data, Streams)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.device, self.dtype = device, dtype
        self.augment = augment if augment is not None and augment.active else None
        self.augment_on = augment_on
        self.num_workers = num_workers
        self.distributed = distributed
        self.world = fd.world_size() if distributed else 1
        self.shuffle = make_generator(seed)
        self.augment_generator = torch.Generator(device=device).manual_seed(seed + 1)
        self.loader_generator = make_generator(seed + 2)
        self.implementation = "none"
        self._example_transform: Callable[[Tensor], Tensor] | None = None
        if self.augment is not None:
            if augment_on == "device":
                self.implementation = "tensor (device, per batch)"
            else:
                try:
                    self._example_transform = self.augment.torchvision()
                    self.implementation = "torchvision.transforms.v2 (workers, per example)"
                except ImportError:
                    self._example_transform = self.augment.example
                    self.implementation = "tensor (workers, per example)"
        train = data.train if self.streaming else None
        if isinstance(train, DataLoader) and self.distributed:
            raise ValueError(
                "a DataLoader cannot be sharded across ranks by the trainer; pass its data "
                "set in Streams and the trainer gives each rank its share of every batch"
            )
        if isinstance(train, DataLoader) and augment_on == "workers" and self.augment:
            raise ValueError(
                "augment_on='workers' needs the data set, not a DataLoader; pass the data set "
                "in Streams or augment on the device"
            )

    # ------------------------------------------------------------------ facts
    @property
    def num_train(self) -> int | None:
        """Training examples (None for an iterable data set without ``len``)."""
        if self.streaming:
            return self.data.size("train")
        return len(self.data.y_train)

    @property
    def steps_per_epoch(self) -> int | None:
        """Optimizer steps per epoch (None when unknown)."""
        train = self.data.train if self.streaming else None
        if isinstance(train, DataLoader):
            try:
                return len(train)
            except TypeError:
                return None
        n = self.num_train
        return None if n is None else math.ceil(n / self.batch_size)

    def settings(self) -> dict[str, Any]:
        """Plain values describing the data path (for results and checkpoints)."""
        return {
            "data_path": "streams" if self.streaming else "in_memory",
            "augment_implementation": self.implementation,
        }

    # ------------------------------------------------------------------ training batches
    def epoch(self) -> Iterator[tuple[Tensor, Tensor, float]]:
        """One epoch of training batches ``(x, y, weight)`` on the device, augmented, this
        rank's share; ``weight`` = world * share / global batch size (1 on one process)."""
        sizes: Iterator[int] | None = None
        sharded = False
        if self.streaming or self._example_transform is not None:
            source: Any = self._loader()
            sharded = isinstance(getattr(source, "batch_sampler", None), _Batches)
            if sharded:
                n = source.batch_sampler.n
                sizes = iter([min(self.batch_size, n - s) for s in range(0, n, self.batch_size)])
        else:
            source = batches(
                self.data.x_train,
                self.data.y_train,
                self.batch_size,
                shuffle=True,
                generator=self.shuffle,
            )
        for x, y in source:
            weight = 1.0
            total = next(sizes) if sizes is not None else len(y)
            if self.distributed:
                if not sharded:
                    x, y = fd.shard(x, y)
                weight = self.world * len(y) / total
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if x.is_floating_point():
                x = x.to(self.dtype)
            if y.is_floating_point():
                y = y.to(self.dtype)
            if self.augment is not None and self.augment_on == "device":
                x = self.augment.batch(x, self.augment_generator)
            yield x, y, weight

    def _loader(self) -> DataLoader:
        """The ``DataLoader`` of one epoch."""
        if self.streaming:
            base = self.data.train
            if isinstance(base, DataLoader):
                return base
        else:
            base = _Pairs(self.data.x_train, self.data.y_train)
        if self._example_transform is not None:
            wrap = _AugmentedStream if isinstance(base, IterableDataset) else _Augmented
            base = wrap(base, self._example_transform)
        common = {
            "num_workers": self.num_workers,
            "generator": self.loader_generator,
            "pin_memory": self.device.type == "cuda",
        }
        if isinstance(base, IterableDataset):
            return DataLoader(base, batch_size=self.batch_size, **common)
        sampler = _Batches(len(base), self.batch_size, self.shuffle, self.world)
        return DataLoader(base, batch_sampler=sampler, **common)

    # ------------------------------------------------------------------ evaluation
    def eval_data(self, split: str) -> tuple[Any, bool]:
        """The data of an evaluation over ``"train"`` or ``"test"``: this rank's share and
        whether the objective sums across ranks."""
        if not self.streaming:
            x, y = self.data.train() if split == "train" else self.data.test()
            x, y, dist = fd.local_split(x, y, enabled=self.distributed)
            return batches(x, y, self.eval_batch_size), dist
        source = self.data.train_eval if split == "train" else self.data.test
        if self.distributed:
            if isinstance(source, DataLoader) or isinstance(source, IterableDataset):
                raise ValueError(
                    "distributed evaluation needs map-style data sets (they are sharded by "
                    "index), not a DataLoader or an iterable data set"
                )
            source = Subset(source, list(range(len(source)))[fd.shard_range(len(source))])
            return self._eval_loader(source), True
        return self._eval_loader(source), False

    def _eval_loader(self, source: Any) -> Any:
        if isinstance(source, DataLoader):
            return source
        return DataLoader(source, batch_size=self.eval_batch_size, num_workers=self.num_workers)

    def measure_subset(self, samples: int) -> tuple[Tensor, Tensor]:
        """The fixed, unaugmented measurement subset (the same for every run on the data)."""
        if self.streaming:
            return self.data.measure_subset(samples)
        from flatlens.train._measures import measure_subset

        return measure_subset(self.data, samples)

    # ------------------------------------------------------------------ random states
    def state_dict(self) -> dict[str, Tensor]:
        """The generators' states (byte tensors)."""
        return {
            "shuffle": self.shuffle.get_state(),
            "augment": self.augment_generator.get_state(),
            "loader": self.loader_generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict` (checkpoints from before streams hold only the
        shuffling state)."""
        self.shuffle.set_state(state["shuffle"])
        if "augment" in state:
            self.augment_generator.set_state(state["augment"])
        if "loader" in state:
            self.loader_generator.set_state(state["loader"])


def check_distributed(distributed: bool | None, data: Dataset | Streams, batch_size: int) -> bool:
    """Whether to train data parallel: ``distributed``, or when ``None`` whether a process
    group of more than one rank is initialized.

    Raises:
        ValueError: ``distributed=True`` without a process group, or batches that leave a
            rank without a share.
    """
    if distributed is None:
        distributed = fd.is_distributed() and fd.world_size() > 1
    if not distributed:
        return False
    if not fd.is_distributed():
        raise ValueError(
            "distributed=True needs an initialized torch.distributed process group; "
            "start with torchrun and call flatlens.distributed.init_from_env()"
        )
    world = fd.world_size()
    n = len(data.y_train) if isinstance(data, Dataset) else data.size()
    last = 0 if n is None else n % batch_size
    if batch_size < world or 0 < last < world:
        raise ValueError(
            f"each of the {world} ranks needs a share of every batch, but batch_size="
            f"{batch_size} over {n} training samples leaves a batch of {last or batch_size}; "
            f"use a batch size of at least {world} whose last batch has at least that many "
            "samples"
        )
    return True
