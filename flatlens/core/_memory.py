"""Memory: the peak a measure used, and what caching the autograd graph would cost.

* :class:`PeakMemory` measures the peak over a block of code: on CUDA the maximum of
  ``torch.cuda.max_memory_allocated`` (its peak counter is reset at the start), on the CPU
  the peak resident set size of the process (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs``; where that cannot be reset, the process's lifetime peak).
* :func:`saved_bytes` counts the bytes autograd saves for the backward pass of a function
  (with ``torch.autograd.graph.saved_tensors_hooks``): the memory a cached graph keeps.
* :func:`available_bytes` is what the device has free now.
"""

from __future__ import annotations

import functools
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["PeakMemory", "available_bytes", "saved_bytes", "tracks_peak_memory"]

R = TypeVar("R")


def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _vm_hwm() -> int | None:
    return _status("VmHWM")


def _reset_vm_hwm() -> bool:
    """Reset the peak RSS to the current RSS; False where the kernel (or a sandbox) does not
    support it, which is checked, since some accept the write and ignore it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    hwm, rss = _vm_hwm(), _status("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + (4 << 20)


_DEPTH = [0]


class PeakMemory:
    """Context manager: ``with PeakMemory(device) as peak: ...``, then ``peak.bytes``.

    Nested inside another ``PeakMemory`` (a measure calling measures), the counter is not
    reset again, so the outer peak stays true and the inner one may include the outer's
    earlier peak.

    Attributes:
        bytes: The peak in bytes (CUDA: allocated by tensors; CPU: resident set size).
        kind: ``"cuda_max_allocated"``, ``"cpu_peak_rss"``, or ``"cpu_process_peak_rss"``
            when the CPU peak could not be reset (then it may predate the block).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.bytes: int | None = None
        self.kind = ""

    def __enter__(self) -> PeakMemory:
        outer = _DEPTH[0] > 0
        _DEPTH[0] += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            if not outer:
                torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_allocated"
        elif outer:
            self.kind = "cpu_peak_rss" if _vm_hwm() is not None else "cpu_process_peak_rss"
        else:
            self.kind = "cpu_peak_rss" if _reset_vm_hwm() else "cpu_process_peak_rss"
        return self

    def __exit__(self, *exc: object) -> None:
        _DEPTH[0] -= 1
        self.bytes = self.so_far()

    def so_far(self) -> int:
        """The peak since entering, read without leaving the block (for partial results)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        peak = _vm_hwm() if self.kind == "cpu_peak_rss" else None
        if peak is None:
            scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
            self.kind = "cpu_process_peak_rss"
        return int(peak)


def _device_of(target: Any) -> torch.device:
    device = getattr(target, "device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


def tracks_peak_memory(measure: Callable[..., R]) -> Callable[..., R]:
    """Decorate a measure ``measure(target, ...) -> Result``: the result's
    ``peak_memory_bytes`` and ``peak_memory_kind`` record the peak while it ran, on the
    device of its first argument (an Objective or an operator), and ``hvp_method`` /
    ``hvp_note`` how that Objective made the products the measure spent. On a sharded
    Objective the measure runs inside its layout (:func:`flatlens.core._sharding.sharded`),
    so every inner product is summed over the ranks."""
    from flatlens.core._sharding import ShardLayout, sharded

    @functools.wraps(measure)
    def wrapper(target: Any, *args: Any, **kwargs: Any) -> R:
        counts = getattr(target, "counts", None)
        before = counts.get("hvp", 0) if isinstance(counts, dict) else None
        layout = getattr(target, "layout", None)  # a tensor's is torch.strided
        layout = layout if isinstance(layout, ShardLayout) else None
        with PeakMemory(_device_of(target)) as peak, sharded(layout):
            result = measure(target, *args, **kwargs)
        if hasattr(result, "peak_memory_bytes"):
            result.peak_memory_bytes = peak.bytes
            result.peak_memory_kind = peak.kind
        if before is not None and hasattr(result, "hvp_method") and result.hvp_method is None:
            if target.counts.get("hvp", 0) > before:
                result.hvp_method = getattr(target, "hvp_method_used", None)
                result.hvp_note = getattr(target, "hvp_note", "")
        return result

    return wrapper


def saved_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` and count the bytes of the tensors autograd saves for backward.

    Tensors saved twice (the same storage) are counted once; parameters and inputs that
    autograd saves by reference count too, so the figure is an upper bound on what caching
    the graph adds.
    """
    seen: set[tuple[int, int]] = set()
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        try:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without storage
            return t
        if key not in seen:
            seen.add(key)
            total += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def available_bytes(device: torch.device) -> int:
    """Memory free for new tensors now: CUDA's free memory, or the CPU's ``MemAvailable``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30
