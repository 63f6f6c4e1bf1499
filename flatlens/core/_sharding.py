"""Flat vectors split across ranks: the reductions and random draws of a sharded space.

A model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``) holds on each rank a
piece of every parameter (rows of its first dimension). The flat vectors of a sharded
:class:`~flatlens.Objective` are this rank's pieces, concatenated: about n / world entries.
A :class:`ShardLayout` says where each piece sits in the global flat vector (the
concatenation of the full parameters), so that

* an inner product is the sum over ranks of the local ones (:func:`reduce_sum`),
* a maximum is the maximum over ranks (:func:`reduce_max`),
* a random vector is the global vector the one-process run draws, restricted to the local
  pieces (:func:`random_vector`, drawn in chunks: O(chunk) memory, not O(n)).

The measures do not pass the layout around: a measure on a sharded objective runs inside
:func:`sharded` (entered by :func:`~flatlens.core.tracks_peak_memory`), and the float64
reductions of the solvers (``flatlens.measures._basis``) and the ball's norms ask
:func:`current_layout`. Without a layout every function here is the one-process case.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "RANDOM_CHUNK",
    "ShardLayout",
    "any_rank",
    "current_layout",
    "global_size",
    "random_vector",
    "reduce_max",
    "reduce_sum",
    "sharded",
]

RANDOM_CHUNK = 1 << 16
"""Entries drawn at a time for a long random vector (a multiple of 64: a chunked draw then
equals one draw of the whole vector, except for a tail shorter than 16, drawn as 16)."""

_LAYOUT: contextvars.ContextVar[ShardLayout | None] = contextvars.ContextVar(
    "flatlens_shard_layout", default=None
)


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's entries sit in the global flat vector.

    Attributes:
        segments: ``(global start, length)`` of each local piece, in local order (the
            local vector is their concatenation).
        global_size: n, the length of the global flat vector.
        group: The process group the pieces are split over (default group: ``None``).
    """

    segments: tuple[tuple[int, int], ...]
    global_size: int
    group: Any = None

    @property
    def local_size(self) -> int:
        """Entries held on this rank."""
        return sum(length for _, length in self.segments)

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        """Sum (or max) ``t`` over the ranks, in place; returns it."""
        import torch.distributed as dist

        reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        dist.all_reduce(t, op=reduce_op, group=self.group)
        return t


def current_layout() -> ShardLayout | None:
    """The layout of the sharded measure running now, or ``None`` (one process's vectors)."""
    return _LAYOUT.get()


@contextlib.contextmanager
def sharded(layout: ShardLayout | None) -> Iterator[None]:
    """Within the block, reductions and random draws follow ``layout`` (``None``: no change)."""
    if layout is None:
        yield
        return
    token = _LAYOUT.set(layout)
    try:
        yield
    finally:
        _LAYOUT.reset(token)


def global_size(n: int) -> int:
    """The length of the global vector whose local pieces have ``n`` entries (n itself
    without a sharded layout)."""
    layout = current_layout()
    return layout.global_size if layout is not None and layout.local_size == n else n


def reduce_sum(t: Tensor) -> Tensor:
    """``t`` summed over the ranks of the current layout (in place), or ``t`` itself.

    Every rank receives the same bytes, so decisions taken on reduced values agree."""
    layout = current_layout()
    return t if layout is None else layout.all_reduce(t, "sum")


def reduce_max(t: Tensor) -> Tensor:
    """``t`` maximized over the ranks of the current layout (in place), or ``t`` itself."""
    layout = current_layout()
    return t if layout is None else layout.all_reduce(t, "max")


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on some rank (the same answer on every rank)."""
    layout = current_layout()
    if layout is None:
        return flag
    return bool(layout.all_reduce(torch.tensor([float(flag)]), "max")[0] > 0)


def _draw(m: int, generator: torch.Generator, kind: str, *, least: int = 0) -> Tensor:
    """m numbers (at least ``least`` drawn, the first m kept: a Gaussian draw of fewer than
    16 takes another path than the tail of a longer one)."""
    if kind == "rademacher":
        v = torch.randint(0, 2, (m,), generator=generator, dtype=torch.int8)
        return 2 * v.to(torch.float64) - 1
    if kind != "gaussian":
        raise ValueError(f"kind must be 'gaussian' or 'rademacher', not {kind!r}")
    return torch.randn(max(m, least), generator=generator, dtype=torch.float64)[:m]


def _global_draw(n: int, generator: torch.Generator, kind: str) -> Iterator[tuple[int, Tensor]]:
    """``(start, chunk)`` of the global random vector of length n, drawn chunk by chunk."""
    if n <= RANDOM_CHUNK:
        yield 0, _draw(n, generator, kind)
        return
    for start in range(0, n, RANDOM_CHUNK):
        yield start, _draw(min(RANDOM_CHUNK, n - start), generator, kind, least=16)


def random_vector(
    n: int,
    generator: torch.Generator,
    kind: str = "gaussian",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """A random flat vector (Gaussian or Rademacher), drawn in float64 on the CPU.

    Without a layout: the vector of length ``n``. Under a sharded layout: this rank's
    pieces of the global vector of length ``layout.global_size`` (``n`` must be the local
    size), the same numbers the one-process run draws, on every rank the same generator
    state afterwards.
    """
    layout = current_layout()
    if layout is None:
        out = torch.cat([chunk for _, chunk in _global_draw(n, generator, kind)])
        return out.to(device, dtype)
    if n != layout.local_size:
        raise ValueError(f"a sharded random vector has {layout.local_size} local entries, not {n}")
    out = torch.empty(n, dtype=torch.float64)
    pieces = []
    offset = 0
    for start, length in layout.segments:
        pieces.append((start, start + length, offset))
        offset += length
    for c0, chunk in _global_draw(layout.global_size, generator, kind):
        c1 = c0 + chunk.numel()
        for g0, g1, local in pieces:
            lo, hi = max(g0, c0), min(g1, c1)
            if lo < hi:
                out[local + lo - g0 : local + hi - g0] = chunk[lo - c0 : hi - c0]
    return out.to(device, dtype)
