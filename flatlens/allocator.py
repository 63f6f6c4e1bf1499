"""Keep freed memory inside the process on glibc Linux, so large CPU tensors are cheap to
allocate again.

PyTorch's CPU allocator calls ``malloc``/``free`` for every tensor. With glibc's defaults,
blocks above an adaptive threshold (128 KiB to 32 MiB) are mapped fresh from the kernel and
returned on ``free``, and the top of the heap is trimmed whenever 128 KiB or more are free.
A forward and backward pass allocates and frees the same few large activation tensors
again and again, so each one can be page-faulted (and zeroed by the kernel) anew: a top-5
Hessian spectrum of the digits BatchNorm CNN in a fresh process ran 1.2-1.6x faster on one
core with the tuning (``benchmarks/bench_allocator.py``).

:func:`tune_cpu_allocator` raises the mmap and trim thresholds (``mallopt``) so freed blocks
stay in the heap for reuse. The process then keeps its peak heap size instead of returning
memory to the system. It changes the whole process, so flatlens never calls it on import:
the ``flatlens`` command does, and library users opt in. Environment variables achieve the
same before Python starts: ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=...``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["tune_cpu_allocator"]

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1
_MMAP_THRESHOLD_MAX = 32 << 20


def tune_cpu_allocator(
    *, mmap_threshold: int = 1 << 30, top_pad: int = 64 << 20, trim_threshold: int = _INT_MAX
) -> bool:
    """Tell glibc ``malloc`` to keep freed memory in the process (see the module docstring).

    Args:
        mmap_threshold: Blocks of at least this many bytes are still mapped individually.
        top_pad: Extra bytes requested from the kernel whenever the heap grows.
        trim_threshold: Free bytes at the top of the heap before any is given back.

    Returns:
        ``True`` when all three settings were applied (an mmap threshold an older glibc
        refuses is lowered to its 32 MiB maximum); ``False`` on a platform without glibc's
        ``mallopt`` (macOS, Windows, musl: nothing changed) or when glibc refused a
        setting (the others are still applied).

    Raises:
        ValueError: a setting is negative or does not fit a C ``int``.
    """
    settings = {
        "mmap_threshold": (_M_MMAP_THRESHOLD, mmap_threshold),
        "top_pad": (_M_TOP_PAD, top_pad),
        "trim_threshold": (_M_TRIM_THRESHOLD, trim_threshold),
    }
    for name, (_, value) in settings.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT_MAX:
            raise ValueError(f"{name} must be an int between 0 and {_INT_MAX}, got {value!r}")
    mallopt = _mallopt()
    if mallopt is None:
        return False
    applied = [mallopt(param, value) == 1 for param, value in settings.values()]
    if not applied[0] and mmap_threshold > _MMAP_THRESHOLD_MAX:
        # Older glibc refuses mmap thresholds above HEAP_MAX_SIZE / 2 (32 MiB on 64 bits).
        applied[0] = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    return all(applied)


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        _ = libc.gnu_get_libc_version  # only glibc has it; musl's mallopt is a stub
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt
