"""Inner products and norms of flat vectors accumulated in float64, without a float64 copy.

Float32 sums of length n ~ 1e8 lose far more than eps: torch's float32 ``norm`` of GPT-2
small's 124M parameters is 1.5% off. Here chunks of ``CHUNK_ELEMENTS`` are copied into two
float64 buffers kept per thread and device (8 MiB each) and summed there, so a norm costs
one read of the vector: casting the whole vector instead allocates n float64 numbers, and on
the CPU the page faults of that allocation cost ten times the sum (0.31 s against 0.03 s
for n = 1.24e8 on two cores).

Under a sharded layout (:func:`flatlens.core._sharding.sharded`) every sum is then summed
over the ranks (``reduce=True``, the default), so all ranks get the same bytes;
:func:`vector_norm` (the ball's and the ascent's norms) works the same way for ord 1, 2 and
inf.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

from flatlens.core._sharding import current_layout, reduce_max, reduce_sum

__all__ = ["CHUNK_ELEMENTS", "combo_norm64", "dot64", "norm64", "vector_norm"]

CHUNK_ELEMENTS = 1 << 20
"""Elements of each float64 buffer (8 MiB)."""

_local = threading.local()


def _buffers(device: torch.device) -> tuple[Tensor, Tensor]:
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    pair = cache.get(device)
    if pair is None:
        pair = cache[device] = (
            torch.empty(CHUNK_ELEMENTS, dtype=torch.float64, device=device),
            torch.empty(CHUNK_ELEMENTS, dtype=torch.float64, device=device),
        )
    return pair


def _chunks(n: int):
    for start in range(0, n, CHUNK_ELEMENTS):
        yield start, min(start + CHUNK_ELEMENTS, n)


def _reduced(total: Tensor, reduce: bool) -> float:
    return float(reduce_sum(total) if reduce else total)


def dot64(a: Tensor, b: Tensor, *, reduce: bool = True) -> float:
    """a . b = sum_i a_i b_i with every product and sum in float64."""
    a, b = a.detach().reshape(-1), b.detach().reshape(-1)
    if a.dtype == b.dtype == torch.float64:
        return _reduced((a @ b).reshape(1), reduce)
    x, y = _buffers(a.device)
    total = torch.zeros(1, dtype=torch.float64, device=a.device)
    for start, stop in _chunks(a.numel()):
        m = stop - start
        xs, ys = x[:m].copy_(a[start:stop]), y[:m].copy_(b[start:stop])
        total += xs @ ys
    return _reduced(total, reduce)


def norm64(a: Tensor, *, reduce: bool = True) -> float:
    """||a|| = sqrt(sum_i a_i^2) with the squares and the sum in float64; a vector whose
    squares overflow float64 (entries near 1e154 and above) is scaled by its largest
    entry first, so only a norm that is itself beyond float64 is infinite."""
    a = a.detach().reshape(-1)
    value = math.sqrt(max(_sum_of_squares(a, 1.0, reduce), 0.0))
    if math.isinf(value):
        zero = torch.zeros(1, dtype=torch.float64, device=a.device)
        peak = a.abs().max().to(torch.float64).reshape(1) if a.numel() else zero
        peak = float(reduce_max(peak) if reduce else peak)
        if math.isfinite(peak) and peak > 0:
            value = peak * math.sqrt(max(_sum_of_squares(a, peak, reduce), 0.0))
    return value


def _sum_of_squares(a: Tensor, scale: float, reduce: bool) -> float:
    """sum_i (a_i / scale)^2 in float64."""
    if a.dtype == torch.float64:
        scaled = a if scale == 1.0 else a / scale
        return _reduced((scaled @ scaled).reshape(1), reduce)
    x, _ = _buffers(a.device)
    total = torch.zeros(1, dtype=torch.float64, device=a.device)
    for start, stop in _chunks(a.numel()):
        xs = x[: stop - start].copy_(a[start:stop])
        if scale != 1.0:
            xs.div_(scale)
        total += xs @ xs
    return _reduced(total, reduce)


def combo_norm64(w: Tensor, u: Tensor, c: float, *, reduce: bool = True) -> float:
    """||w - c u|| with the difference formed and summed in float64."""
    w, u = w.detach().reshape(-1), u.detach().reshape(-1)
    x, y = _buffers(w.device)
    total = torch.zeros(1, dtype=torch.float64, device=w.device)
    for start, stop in _chunks(w.numel()):
        m = stop - start
        xs = x[:m].copy_(w[start:stop])
        xs.sub_(y[:m].copy_(u[start:stop]), alpha=c)
        total += xs @ xs
    return math.sqrt(max(_reduced(total, reduce), 0.0))


def vector_norm(x: Tensor, ord: float = 2) -> Tensor:
    """||x||_ord in float64 (a 0-d tensor on x's device) for ord 1, 2 or inf, over all
    ranks' pieces under a sharded layout. Sums run in float64 chunk by chunk, never on a
    float64 copy of x (for 1e8 entries its allocation costs ten times the sum)."""
    x = x.detach().reshape(-1)
    f64 = {"dtype": torch.float64, "device": x.device}
    if ord == 2:
        return torch.tensor(norm64(x), **f64)
    if ord == math.inf:
        part = x.abs().max().to(torch.float64).reshape(1) if x.numel() else torch.zeros(1, **f64)
        return reduce_max(part)[0]
    if ord == 1:
        part = torch.zeros(1, **f64)
        for start in range(0, x.numel(), CHUNK_ELEMENTS):
            part += x[start : start + CHUNK_ELEMENTS].abs().sum(dtype=torch.float64)
        return reduce_sum(part)[0]
    if current_layout() is not None:
        raise ValueError(f"ord must be 1, 2 or inf, not {ord!r}")
    return torch.linalg.vector_norm(x.to(torch.float64), ord=ord)
