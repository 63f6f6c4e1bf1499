"""flatlens.data.Augmentation: every implementation crops, flips and cuts out as the reference
pipelines do (RandomCrop(32, padding=4), RandomHorizontalFlip, davda54's Cutout(16, p=0.5))."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from flatlens.data import Augmentation

FILL = (-2.0, -3.0, -4.0)


def _originals(n: int = 400) -> torch.Tensor:
    # every pixel distinct and positive, so a window and a Cutout square are recognizable
    base = torch.arange(1, 3 * 32 * 32 + 1, dtype=torch.float32).reshape(3, 32, 32)
    return base.expand(n, 3, 32, 32).clone()


def _implementations():
    aug = Augmentation("crop-flip-cutout", fill=FILL)

    def batch(x):
        return aug.batch(x, torch.Generator().manual_seed(0))

    def example(x):
        torch.manual_seed(0)
        return torch.stack([aug.example(img) for img in x])

    def torchvision(x):
        if importlib.util.find_spec("torchvision") is None:
            pytest.skip("torchvision is not installed (the 'models' extra; make test has it)")
        transform = aug.torchvision()  # imports torchvision through flatlens._compat
        torch.manual_seed(0)
        return torch.stack([transform(img) for img in x])

    return {"batch": batch, "example": example, "torchvision": torchvision}


@pytest.mark.parametrize("implementation", ["batch", "example", "torchvision"])
def test_crop_flip_and_cutout_have_the_published_geometry(implementation):
    x = _originals()
    out = _implementations()[implementation](x)
    img = x[0]
    padded = torch.tensor(FILL).reshape(3, 1, 1).repeat(1, 40, 40)
    padded[:, 4:36, 4:36] = img
    offsets, flips, cut = set(), 0, 0
    for o in out:
        zero = (o == 0).all(0)
        match = None
        for top in range(9):
            for left in range(9):
                window = padded[:, top : top + 32, left : left + 32]
                for flipped, w in ((False, window), (True, window.flip(-1))):
                    if torch.equal(torch.where(zero, 0.0, w), o):
                        match = (top, left, flipped)
        assert match is not None, "not a crop/flip of the padded image with a zeroed square"
        offsets.add(match[:2])
        flips += match[2]
        if zero.any():
            cut += 1
            rows, cols = zero.any(1).nonzero(), zero.any(0).nonzero()
            assert rows.max() - rows.min() < 16 and cols.max() - cols.min() < 16
            assert int(zero.sum()) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    n = len(out)
    assert len(offsets) > 60  # of the 81 offsets
    assert 0.4 < flips / n < 0.6
    # p = 0.5, and a square partly outside the image is clipped (sometimes to nothing
    # visible on a 1-pixel edge): about 0.5 of the images carry zeros
    assert 0.38 < cut / n < 0.6


def test_none_changes_nothing_and_settings_are_checked():
    x = _originals(4)
    assert Augmentation("none").batch(x, torch.Generator()) is x
    img = x[0]
    assert Augmentation("none").example(img) is img
    with pytest.raises(ValueError, match="augment must be one of"):
        Augmentation("mixup")
    with pytest.raises(ValueError, match="cutout_prob"):
        Augmentation("crop-flip-cutout", cutout_prob=2.0)
    with pytest.raises(ValueError, match="fill has 2 values"):
        Augmentation("crop-flip", fill=(1.0, 2.0)).batch(x, torch.Generator())


def test_the_batch_augmentation_draws_from_its_generator_only():
    x = _originals(8)
    aug = Augmentation("crop-flip-cutout", fill=FILL)
    outside = torch.get_rng_state()
    a = aug.batch(x, torch.Generator().manual_seed(3))
    b = aug.batch(x, torch.Generator().manual_seed(3))
    c = aug.batch(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), outside)
