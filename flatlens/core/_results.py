"""Base class for measurement results: small dataclasses that JSON can hold."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

__all__ = ["MeasureResult", "Result", "to_jsonable"]


def to_jsonable(value: Any) -> Any:
    """Convert tensors, arrays, dataclasses and non-finite floats to plain JSON values.

    NaN and infinities become ``None`` so the output is strict JSON.
    """
    if isinstance(value, Result):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.device | torch.dtype):
        return str(value)
    return value


@dataclasses.dataclass
class Result:
    """A measurement's outcome. Fields marked ``metadata={"json": False}`` (large tensors such
    as eigenvectors) are left out of :meth:`to_dict`."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary of the result, including the settings that produced it."""
        out: dict[str, Any] = {"kind": type(self).__name__}
        for f in dataclasses.fields(self):
            if f.metadata.get("json", True):
                out[f.name] = to_jsonable(getattr(self, f.name))
        return out


@dataclasses.dataclass
class MeasureResult(Result):
    """A measure's result, with the peak memory the measure used while it ran.

    Attributes:
        peak_memory_bytes: CUDA: the maximum of ``torch.cuda.max_memory_allocated`` during
            the measure; CPU: the peak resident set size of the process during it.
        peak_memory_kind: ``"cuda_max_allocated"``, ``"cpu_peak_rss"``, or
            ``"cpu_process_peak_rss"`` when the CPU peak could not be reset (Linux without
            a writable ``/proc/self/clear_refs``, other systems): then it is the process's
            lifetime peak.
        hvp_method: How the Hessian-vector products of the measure were made
            (``"double_backward"``, ``"forward_over_reverse"``, ``"finite_difference"``);
            ``None`` when it made none through an Objective.
        hvp_note: Why, when ``"auto"`` switched to difference products (else empty).
    """

    peak_memory_bytes: int | None = dataclasses.field(default=None, kw_only=True)
    peak_memory_kind: str = dataclasses.field(default="", kw_only=True)
    hvp_method: str | None = dataclasses.field(default=None, kw_only=True)
    hvp_note: str = dataclasses.field(default="", kw_only=True)
