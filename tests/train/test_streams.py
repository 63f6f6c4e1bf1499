"""Data as it comes: data sets read every epoch (map-style, iterable, DataLoaders, workers),
augmentation fresh each epoch and never in evaluation or measures, exact resume with both
augmentation implementations."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from flatlens.data import Augmentation, Dataset, Streams
from flatlens.train import Trainer

N, TEST = 24, 8


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


class Counting(torch.utils.data.Dataset):
    """A map-style data set that counts how often each example is read."""

    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], self.y[i]


class Stream(IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        yield from zip(self.x, self.y, strict=True)


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 64, 3),
    )  # fmt: skip


class Recorder:
    """Records the inputs the model sees, by mode."""

    def __init__(self, model: nn.Module):
        self.train: list[torch.Tensor] = []
        self.eval: list[torch.Tensor] = []
        model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        (self.train if module.training else self.eval).append(args[0].detach().clone())


def trainer(data, model, **kw) -> Trainer:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kw.setdefault("batch_size", 8)
    return Trainer(model, opt, data, seed=5, **kw)


def _is_crop_flip_of(out: torch.Tensor, originals: torch.Tensor, fill: float, pad: int = 4):
    """Whether ``out`` is a padded crop (maybe flipped) of one of ``originals``."""
    c, h, w = out.shape
    for x in originals:
        padded = torch.full((c, h + 2 * pad, w + 2 * pad), fill)
        padded[:, pad : pad + h, pad : pad + w] = x
        for top in range(2 * pad + 1):
            for left in range(2 * pad + 1):
                window = padded[:, top : top + h, left : left + w]
                if torch.equal(window, out) or torch.equal(window.flip(-1), out):
                    return True
    return False


@pytest.mark.parametrize("augment_on", ["device", "workers"])
def test_augmentation_is_fresh_each_epoch_and_absent_from_evaluation_and_measures(augment_on):
    x, y = images(N, 0)
    data = Dataset(x, y, *images(TEST, 1), 3, "imgs")
    model = cnn()
    seen = Recorder(model)
    t = trainer(
        data, model, augment=Augmentation("crop-flip", fill=-1.5), augment_on=augment_on,
        measure_every=1, measures=("lambda_max",), measure_samples=6,
    )  # fmt: skip
    t.fit(2)
    epochs = [torch.cat(seen.train[:3]), torch.cat(seen.train[3:6])]
    assert not torch.equal(epochs[0], epochs[1])
    for batch in epochs:
        assert all(_is_crop_flip_of(img, x, -1.5) for img in batch[:6])
    changed = sum(not any(torch.equal(img, o) for o in x) for img in epochs[0])
    assert changed > N // 2  # most inputs were moved
    # evaluation and the measures see only the originals (train, test, subset)
    pool = torch.cat([x, data.x_test])
    for batch in seen.eval:
        assert all(any(torch.equal(img, o) for o in pool) for img in batch)
    sx, _ = t.measure_subset()
    assert all(any(torch.equal(img, o) for o in x) for img in sx)


def test_a_data_set_is_read_once_per_epoch_and_its_evaluation_copy_apart():
    x, y = images(N, 0)
    train_set, eval_set, test_set = Counting(x, y), Counting(x, y), Counting(*images(TEST, 1))
    data = Streams(train_set, test_set, num_classes=3, name="counting", train_eval=eval_set)
    result = trainer(data, cnn()).fit(3)
    assert train_set.reads == 3 * N  # fresh every epoch: no copy held
    assert eval_set.reads == 3 * N and test_set.reads == 3 * TEST  # one evaluation per epoch
    assert len(result.history) == 3


def test_streams_match_the_in_memory_path_without_augmentation():
    x, y = images(N, 0)
    xt, yt = images(TEST, 1)
    memory = trainer(Dataset(x, y, xt, yt, 3, "imgs"), cnn()).fit(2)
    streamed = trainer(Streams(TensorDataset(x, y), TensorDataset(xt, yt)), cnn()).fit(2)
    a, b = memory.model.state_dict(), streamed.model.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    assert [r["test_loss"] for r in memory.history] == pytest.approx(
        [r["test_loss"] for r in streamed.history], rel=1e-5
    )


def test_iterable_data_sets_and_data_loaders_train():
    x, y = images(N, 0)
    xt, yt = images(TEST, 1)
    stream = Streams(Stream(x, y), TensorDataset(xt, yt), num_classes=3)
    assert stream.size() is None and stream.input_shape == (3, 8, 8)
    assert trainer(stream, cnn()).fit(1).final["test_acc"] is not None
    loader = DataLoader(TensorDataset(x, y), batch_size=6, shuffle=False)
    result = trainer(Streams(loader, TensorDataset(xt, yt)), cnn()).fit(1)
    assert result.history[0]["step"] == 4  # the loader's own batches of 6


@pytest.mark.parametrize("augment_on", ["device", "workers"])
def test_a_resumed_run_with_workers_and_augmentation_repeats_the_straight_run(augment_on, tmp_path):
    x, y = images(N, 0)
    data = Streams(TensorDataset(x, y), TensorDataset(*images(TEST, 1)), num_classes=3)
    kw = {
        "augment": Augmentation("crop-flip-cutout", fill=-1.0, cutout_size=4),
        "augment_on": augment_on,
        "num_workers": 2,
    }
    straight = trainer(data, cnn(), **kw).fit(3)
    first = trainer(data, cnn(), checkpoint_dir=tmp_path, **kw)
    first.fit(2)
    resumed = trainer(data, cnn(seed=9), **kw)
    resumed.load_checkpoint(tmp_path / "checkpoint.pt")
    result = resumed.fit(3)
    a, b = straight.model.state_dict(), result.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in straight.history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in result.history]


def test_streams_errors_are_clear():
    x, y = images(4, 0)
    with pytest.raises(TypeError, match="Dataset or DataLoader"):
        Streams((x, y), TensorDataset(x, y))
    with pytest.raises(TypeError, match="test must be a data set"):
        Streams(TensorDataset(x, y), None)
    bad = Streams(TensorDataset(x, y), TensorDataset(torch.randn(2, 3, 4, 4), y[:2]))
    with pytest.raises(ValueError, match="train and test examples differ in shape"):
        bad.check()
