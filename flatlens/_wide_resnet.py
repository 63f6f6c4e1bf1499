"""Wide residual networks for 32x32 images (Zagoruyko & Komodakis, BMVC 2016).

WRN-d-k: a 3x3 stem convolution to 16 channels, three groups of pre-activation residual
units with 16k, 32k and 64k channels (strides 1, 2, 2), BatchNorm-ReLU, global average
pooling and a linear classifier. A unit is

    a = relu(bn1(x));  out = conv2(dropout(relu(bn2(conv1(a)))));  out + shortcut

with shortcut = x, or a 1x1 convolution of a when the unit changes the shape (the first
unit of a group).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

__all__ = ["WideResNet"]

Layout = Literal["paper", "davda54"]


class _Unit(nn.Module):
    """One pre-activation residual unit (see the module docstring)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float, project: bool) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn1(x))
        out = self.conv2(self.dropout(torch.relu(self.bn2(self.conv1(a)))))
        return out + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    """WRN-depth-width_factor for CIFAR-sized inputs.

    Args:
        depth: Total depth d = 6n + 4 (16, 22, 28, 40, ...); n units per group.
        width_factor: k, the channel multiplier (16k, 32k, 64k channels).
        num_classes: Outputs.
        in_channels: Input channels.
        dropout: Dropout between the two convolutions of a unit.
        layout: ``"paper"``: n units per group, the first one projecting when the shape
            changes (WRN-16-8: 11.0M parameters, WRN-28-10: 36.5M). ``"davda54"``: the
            network of davda54/sam's ``example/model/wide_res_net.py``, which puts n + 1
            units in each group (a projecting ``DownsampleUnit`` and n ``BasicUnit`` s;
            WRN-16-8: 17.2M parameters); the SAM recipes use it.

    Both layouts are initialized as davda54/sam initializes its network: He-normal
    convolutions (fan-in, ReLU gain), BatchNorm weight 1 and bias 0, a zero classifier. The
    modules are created and initialized in the order of that code, so the ``"davda54"``
    layout draws the same initial weights from the same seed.
    """

    def __init__(
        self,
        depth: int = 16,
        width_factor: int = 8,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
        layout: Layout = "paper",
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (16, 22, 28, ...), got {depth!r}")
        if not isinstance(width_factor, int) or width_factor < 1:
            raise ValueError(f"width_factor must be an integer >= 1, got {width_factor!r}")
        if layout not in ("paper", "davda54"):
            raise ValueError(f"layout must be 'paper' or 'davda54', not {layout!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        n = (depth - 4) // 6
        units = n + 1 if layout == "davda54" else n
        channels = [16, 16 * width_factor, 32 * width_factor, 64 * width_factor]
        self.stem = nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=False)
        groups = []
        for g in range(3):
            cin, cout, stride = channels[g], channels[g + 1], 1 if g == 0 else 2
            project = layout == "davda54" or cin != cout or stride != 1
            group = [_Unit(cin, cout, stride, dropout, project)]
            group += [_Unit(cout, cout, 1, dropout, False) for _ in range(units - 1)]
            groups.append(nn.Sequential(*group))
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(channels[3])
        self.head = nn.Linear(channels[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn(self.groups(self.stem(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))
