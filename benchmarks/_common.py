"""Shared helpers for the benchmark scripts: timing, plain-text tables, JSON results.

Timing takes the median of repeated calls after warm-up calls, because the benchmark machines
are shared and single measurements are noisy. Several contenders are timed *interleaved*
(A, B, C, A, B, C, ...) so a change in machine load hits all of them alike and their ratios
stay meaningful. Results go to ``benchmarks/results/<name>.json`` (or ``$OUT`` when a GPU
check runs on a lent machine), written atomically.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flatlens.core._io import write_json as _atomic_write_json
from flatlens.core._results import to_jsonable

__all__ = [
    "Column",
    "Timing",
    "environment",
    "format_table",
    "relative_difference",
    "report",
    "results_dir",
    "set_threads",
    "synchronize",
    "time_call",
    "time_interleaved",
    "write_json",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Timing:
    """Seconds per call of repeated calls (warm-up calls excluded).

    Attributes:
        times: Wall-clock seconds per call, in the order they ran.
        cpu_times: CPU seconds of this process per call (all its threads). On a shared
            machine with a fixed thread count this is far less sensitive to other users'
            load than wall time; on a GPU it mostly measures launch overhead and waiting.
    """

    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        """Median wall-clock seconds per call (NaN when nothing was timed)."""
        return statistics.median(self.times) if self.times else math.nan

    @property
    def cpu_median(self) -> float:
        """Median CPU seconds per call (NaN when nothing was timed)."""
        return statistics.median(self.cpu_times) if self.cpu_times else math.nan

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the repeats were."""
        if len(self.times) < 2 or not self.median:
            return 0.0
        return (max(self.times) - min(self.times)) / self.median

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "median_s": self.median,
            "min_s": min(self.times) if self.times else None,
            "spread": self.spread,
            "cpu_median_s": self.cpu_median,
            "times_s": list(self.times),
            "cpu_times_s": list(self.cpu_times),
        }


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued kernels on a CUDA ``device`` (no-op elsewhere)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], Any],
    *,
    repeats: int = 3,
    warmup: int = 1,
    number: int = 1,
    device: torch.device | str | None = None,
) -> tuple[Timing, Any]:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timings of ``number`` calls.

    Args:
        fn: The call to time.
        repeats: Number of timed samples (the median is reported).
        warmup: Untimed calls first (allocator, autograd and kernel caches).
        number: Calls per sample; each sample is the mean over them (for very short calls).
        device: Synchronize this CUDA device around each sample.

    Returns:
        The timing and the result of the last call.
    """
    timings = time_interleaved(
        {"fn": fn}, repeats=repeats, warmup=warmup, number=number, device=device
    )
    return timings["fn"]


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    *,
    repeats: int = 3,
    warmup: int = 1,
    number: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, tuple[Timing, Any]]:
    """Time several calls round-robin, so slow phases of a shared machine hit all alike.

    Each round runs every ``fns`` entry once (``number`` times), in the given order.

    Returns:
        For each name, its timing and the result of its last call.
    """
    if repeats < 1 or warmup < 0 or number < 1:
        raise ValueError("need repeats >= 1, warmup >= 0 and number >= 1")
    out: dict[str, tuple[Timing, Any]] = {name: (Timing(), None) for name in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(number):
                result = fn()
            synchronize(device)
            timing = out[name][0]
            timing.times.append((time.perf_counter() - start) / number)
            timing.cpu_times.append((time.process_time() - cpu_start) / number)
            out[name] = (timing, result)
    return out


def set_threads(n: int | None) -> int:
    """Set PyTorch's intra-op CPU threads (``None`` leaves them) and return the count in use."""
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(n)
    return torch.get_num_threads()


def relative_difference(a: Sequence[float], b: Sequence[float]) -> float:
    """max_i |a_i - b_i| / |b_i| over the common length (``b`` is the reference)."""
    n = min(len(a), len(b))
    if n == 0:
        return math.nan
    return max(abs(float(a[i]) - float(b[i])) / max(abs(float(b[i])), 1e-300) for i in range(n))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Versions, threads and hardware that produced a measurement."""
    dev = torch.device(device)
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "device": str(dev),
        "git_commit": _git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if hasattr(os, "getloadavg"):
        env["load_average"] = list(os.getloadavg())
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
        env["cuda"] = torch.version.cuda
        env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        env["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return env


@dataclass(frozen=True)
class Column:
    """One table column: the row key, its header and a format spec for numbers."""

    key: str
    header: str
    fmt: str = ""


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt and isinstance(value, int | float) and not isinstance(value, bool):
        return format(value, fmt)
    return str(value)


def format_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], *, markdown: bool = False
) -> str:
    """Rows as an aligned plain-text table (or a Markdown table); missing values show ``-``."""
    cells = [[_cell(row.get(c.key), c.fmt) for c in columns] for row in rows]
    headers = [c.header for c in columns]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(items: Sequence[str]) -> str:
        # Text left-aligned, numbers right-aligned.
        parts = [
            s.rjust(w) if _numeric(s) else s.ljust(w) for s, w in zip(items, widths, strict=True)
        ]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts).rstrip()

    rule = (
        "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        if markdown
        else "  ".join("-" * w for w in widths)
    )
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def _numeric(text: str) -> bool:
    try:
        float(text.rstrip("x%"))
    except ValueError:
        return False
    return True


def results_dir(out_dir: str | os.PathLike | None = None) -> Path:
    """Where results go: ``out_dir``, else ``benchmarks/results``."""
    return Path(out_dir) if out_dir is not None else RESULTS_DIR


def write_json(name: str, payload: Any, out_dir: str | os.PathLike | None = None) -> Path:
    """Write ``payload`` atomically as strict JSON to ``<out_dir>/<name>.json``."""
    path = results_dir(out_dir) / f"{name}.json"
    _atomic_write_json(path, to_jsonable(payload))
    return path


def report(
    name: str,
    tables: Mapping[str, tuple[Sequence[Mapping[str, Any]], Sequence[Column]]],
    payload: Any,
    *,
    out_dir: str | os.PathLike | None = None,
    markdown: bool = False,
) -> Path:
    """Print each titled table and write ``payload`` to ``<out_dir>/<name>.json``.

    Args:
        name: Result file stem.
        tables: ``{title: (rows, columns)}``, printed in order.
        payload: Everything to keep (JSON-ready after :func:`flatlens.core._results.to_jsonable`).
        out_dir: Folder for the JSON file (default ``benchmarks/results``).
        markdown: Print Markdown tables (for pasting into ``docs/``).

    Returns:
        The path written.
    """
    for title, (rows, columns) in tables.items():
        print(f"\n{'### ' if markdown else ''}{title}\n")
        print(format_table(rows, columns, markdown=markdown))
    path = write_json(name, payload, out_dir)
    print(f"\nwrote {path}")
    return path
