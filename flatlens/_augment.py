"""Image augmentation for training: random crop with padding, horizontal flip, Cutout.

The augmentations of the GAM and SAM reference code (xxgege/GAM ``main_cifar.py`` lines
222-227; davda54/sam ``example/data/cifar.py`` lines 13-19 and ``example/utility/cutout.py``):

* crop: pad each side by ``padding`` pixels of black, then cut a window of the original
  size at a uniformly random offset (torchvision's ``RandomCrop(32, padding=4)``);
* flip: mirror left-right with probability 1/2 (``RandomHorizontalFlip()``);
* Cutout (after normalization): with probability ``cutout_prob`` set a ``cutout_size``
  square to 0 whose top-left corner is uniform in [−size/2, H − size/2) x [−size/2,
  W − size/2), clipped to the image (davda54's ``Cutout(16, p=0.5)``).

Inputs here are already normalized, so "black" is the per-channel value ``fill`` =
−mean/std: padding a normalized image with it equals normalizing the padded raw image, the
order of the reference pipelines. Two implementations draw from the same distributions:
:meth:`Augmentation.batch` on a whole batch on its device (one ``torch.Generator``, no
Python loop) and :meth:`Augmentation.example` / :meth:`Augmentation.torchvision` per example
in the ``DataLoader`` workers (torch's global RNG, which the loader seeds per worker).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AUGMENTATIONS", "Augmentation"]

AUGMENTATIONS = ("none", "crop-flip", "crop-flip-cutout")


@dataclass(frozen=True)
class Augmentation:
    """A random augmentation of normalized image tensors ``(C, H, W)`` or ``(N, C, H, W)``.

    Attributes:
        augment: ``"none"``, ``"crop-flip"`` or ``"crop-flip-cutout"``.
        fill: The value of padded pixels, one per channel or one for all: black after
            normalization, −mean/std (0 for unnormalized images).
        padding: Pixels of padding on each side before the crop (4).
        cutout_size: Side of the Cutout square (16).
        cutout_prob: Probability that an image gets a Cutout square (0.5).
    """

    augment: str = "crop-flip"
    fill: tuple[float, ...] | float = 0.0
    padding: int = 4
    cutout_size: int = 16
    cutout_prob: float = 0.5

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {list(AUGMENTATIONS)}, not {self.augment!r}")
        if isinstance(self.padding, bool) or not isinstance(self.padding, int) or self.padding < 0:
            raise ValueError(f"padding must be an integer >= 0, got {self.padding!r}")
        if not isinstance(self.cutout_size, int) or self.cutout_size < 1:
            raise ValueError(f"cutout_size must be an integer >= 1, got {self.cutout_size!r}")
        if not 0.0 <= self.cutout_prob <= 1.0:
            raise ValueError(f"cutout_prob must lie in [0, 1], got {self.cutout_prob!r}")
        fill = self.fill
        fill = tuple(float(v) for v in fill) if isinstance(fill, Sequence) else float(fill)
        object.__setattr__(self, "fill", fill)

    @property
    def active(self) -> bool:
        """Whether this augmentation changes anything."""
        return self.augment != "none"

    def _fill(self, channels: int, like: Tensor) -> Tensor:
        fill = torch.as_tensor(self.fill, dtype=like.dtype, device=like.device).reshape(-1)
        if fill.numel() not in (1, channels):
            raise ValueError(f"fill has {fill.numel()} values for images of {channels} channels")
        return fill.expand(channels)

    # ------------------------------------------------------------------ a batch on its device
    def batch(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """A freshly augmented copy of the batch ``x`` (N, C, H, W), drawn from
        ``generator`` (which must live on ``x``'s device).

        Returns ``x`` itself for ``augment="none"``.
        """
        if not self.active:
            return x
        if x.dim() != 4:
            raise ValueError(f"augmentation needs image batches (N, C, H, W), got {tuple(x.shape)}")
        n, c, h, w = x.shape
        dev, p = x.device, self.padding
        offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=generator, device=dev)
        flips = torch.rand(n, generator=generator, device=dev) < 0.5
        padded = self._fill(c, x).reshape(1, c, 1, 1).repeat(n, 1, h + 2 * p, w + 2 * p)
        padded[:, :, p : p + h, p : p + w] = x
        rows = offsets[:, :1] + torch.arange(h, device=dev)
        cols = offsets[:, 1:] + torch.arange(w, device=dev)
        cols = torch.where(flips[:, None], cols.flip(1), cols)
        index = torch.arange(n, device=dev)[:, None, None]
        out = padded[index, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        out = out.contiguous()
        if self.augment == "crop-flip-cutout":
            apply = torch.rand(n, generator=generator, device=dev) <= self.cutout_prob
            half = self.cutout_size // 2
            top = torch.randint(-half, h - half, (n,), generator=generator, device=dev)
            left = torch.randint(-half, w - half, (n,), generator=generator, device=dev)
            out = out.masked_fill(self._cutout_mask(top, left, h, w, apply)[:, None], 0.0)
        return out

    def _cutout_mask(self, top: Tensor, left: Tensor, h: int, w: int, apply: Tensor) -> Tensor:
        """(N, H, W) masks of the squares [top, top + size) x [left, left + size)."""
        r = torch.arange(h, device=top.device)[None, :]
        c = torch.arange(w, device=top.device)[None, :]
        in_rows = (r >= top[:, None]) & (r < top[:, None] + self.cutout_size)
        in_cols = (c >= left[:, None]) & (c < left[:, None] + self.cutout_size)
        return in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None]

    # ------------------------------------------------------------------ one example
    def example(self, x: Tensor, /) -> Tensor:
        """One augmented copy of the image ``x`` (C, H, W), drawn from torch's global RNG
        (in a ``DataLoader`` worker: the worker's seed)."""
        if not self.active:
            return x
        c, h, w = x.shape
        p = self.padding
        padded = self._fill(c, x).reshape(c, 1, 1).repeat(1, h + 2 * p, w + 2 * p)
        padded[:, p : p + h, p : p + w] = x
        top, left = (int(v) for v in torch.randint(0, 2 * p + 1, (2,)))
        out = padded[:, top : top + h, left : left + w]
        if float(torch.rand(())) < 0.5:
            out = out.flip(-1)
        return self.cutout(out.contiguous())

    def cutout(self, x: Tensor, /) -> Tensor:
        """Cutout of one image (C, H, W) from the global RNG (``augment="crop-flip-cutout"``;
        other kinds return ``x``)."""
        if self.augment != "crop-flip-cutout" or float(torch.rand(())) > self.cutout_prob:
            return x
        _, h, w = x.shape
        half = self.cutout_size // 2
        top = int(torch.randint(-half, h - half, ()))
        left = int(torch.randint(-half, w - half, ()))
        out = x.clone()
        out[:, max(0, top) : top + self.cutout_size, max(0, left) : left + self.cutout_size] = 0
        return out

    def torchvision(self) -> Callable[[Tensor], Tensor]:
        """The per-example augmentation through ``torchvision.transforms.v2`` (crop and flip;
        Cutout, which torchvision does not have in this form, from :meth:`cutout`).

        Raises:
            ImportError: torchvision cannot be imported.
        """
        return _Torchvision(self)


class _Torchvision:
    """``v2.RandomCrop(size, padding, fill)`` to each image's own size, ``v2.RandomHorizontalFlip``,
    then :meth:`Augmentation.cutout`; picklable, so it runs in spawned workers too."""

    def __init__(self, augmentation: Augmentation) -> None:
        from flatlens._compat import import_torchvision

        import_torchvision()
        from torchvision.transforms import v2  # noqa: F401  (fail here, not in a worker)

        self.augmentation = augmentation
        self._crops: dict[tuple[int, int], Callable[[Tensor], Tensor]] = {}

    def __getstate__(self) -> dict:
        return {"augmentation": self.augmentation, "_crops": {}}

    def __call__(self, x: Tensor) -> Tensor:
        aug = self.augmentation
        if not aug.active:
            return x
        size = (int(x.shape[-2]), int(x.shape[-1]))
        if size not in self._crops:
            from flatlens._compat import import_torchvision

            import_torchvision()
            from torchvision.transforms import v2

            fill = list(aug.fill) if isinstance(aug.fill, tuple) else aug.fill
            self._crops[size] = v2.Compose(
                [v2.RandomCrop(size, padding=aug.padding, fill=fill), v2.RandomHorizontalFlip()]
            )
        return aug.cutout(self._crops[size](x))
