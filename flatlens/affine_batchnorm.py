"""Eval-mode BatchNorm as one per-channel affine map, for cheaper second derivatives.

In eval mode, BatchNorm with running statistics (mu, sigma^2), weight gamma and bias beta is

    y = (x - mu) * s + beta,    s = gamma / sqrt(sigma^2 + eps),

an affine map per channel. PyTorch differentiates ``F.batch_norm`` twice through the
general train-mode formula (``native_batch_norm_backward`` and its composite backward),
which on a BatchNorm CNN made up about a third of a Hessian-vector product. Written as
a subtraction and an ``addcmul`` the same function has a second derivative made of a few
broadcast multiplies. The value is the same up to rounding (float64: ~1e-16 relative).
Calls it cannot reproduce exactly (mixed dtypes, a channel count that does not match the
statistics, train mode, no running statistics) run ``F.batch_norm`` unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["AffineEvalBatchNorm", "eval_scale"]

_NAMES = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}


def eval_scale(var: torch.Tensor, eps: float, weight: torch.Tensor | None) -> torch.Tensor:
    """The per-channel scale s = gamma / sqrt(sigma^2 + eps) of eval-mode BatchNorm."""
    scale = torch.rsqrt(var + eps)
    return scale if weight is None else weight * scale


class AffineEvalBatchNorm(TorchFunctionMode):
    """Within this mode, ``F.batch_norm`` calls with ``training=False`` and running
    statistics are computed as ``(x - mu) * s + beta`` (see the module docstring); every
    other call, train-mode BatchNorm included, runs unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            a: dict[str, Any] = dict(_DEFAULTS)
            a.update(zip(_NAMES, args, strict=False))
            a.update(kwargs)
            x, mean, var = a["input"], a["running_mean"], a["running_var"]
            if (
                not a["training"]
                and mean is not None
                and var is not None
                and x.dim() >= 2
                and x.shape[1] == mean.numel()
                and x.dtype == mean.dtype == var.dtype
                and all(t is None or t.dtype == x.dtype for t in (a["weight"], a["bias"]))
            ):
                scale = eval_scale(var, a["eps"], a["weight"])
                shape = (1, -1) + (1,) * (x.dim() - 2)
                # (x - mu) * s + beta: subtracting the mean first keeps float32 accurate when
                # |mu| is large against sigma (the order of the CUDA kernels).
                centred = x - mean.reshape(shape)
                if a["bias"] is None:
                    return centred * scale.reshape(shape)
                return torch.addcmul(a["bias"].reshape(shape), centred, scale.reshape(shape))
        return func(*args, **kwargs)
