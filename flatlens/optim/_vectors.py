"""Flat-vector arithmetic over lists of per-parameter tensors (None for no gradient),
accumulated in at least float32: dot products, norms, combinations and the ascent step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["_acc_dtype", "_ascent", "_combine", "_dot", "_norm", "_param_groups"]


def _acc_dtype(tensors: Sequence[Tensor | None]) -> torch.dtype:
    """float64 when any tensor is float64, else float32 (bf16/fp16 norms accumulate in fp32)."""
    return (
        torch.float64
        if any(t is not None and t.dtype == torch.float64 for t in tensors)
        else torch.float32
    )


def _dot(a: Sequence[Tensor | None], b: Sequence[Tensor | None], device: torch.device) -> Tensor:
    """sum_i <a_i, b_i> over parameters (None counts as zero), a 0-dim tensor on ``device``."""
    dtype = _acc_dtype([*a, *b])
    total = torch.zeros((), dtype=dtype, device=device)
    for x, y in zip(a, b, strict=True):
        if x is not None and y is not None:
            total += torch.sum(x.to(dtype) * y.to(dtype)).to(device)
    return total


def _norm(
    vecs: Sequence[Tensor | None],
    device: torch.device,
    weights: Sequence[Tensor] | None = None,
) -> Tensor:
    """||v|| = sqrt(sum_i ||v_i||^2), or ||w * v|| with elementwise |w_i| when ``weights``."""
    if weights is not None:
        vecs = [None if v is None else v * w.abs() for v, w in zip(vecs, weights, strict=True)]
    return torch.sqrt(_dot(vecs, vecs, device))


def _combine(coefs: Sequence[float | Tensor], vecs: Sequence[Sequence[Tensor | None]]):
    """sum_k c_k v_k, parameter by parameter (None where every v_k is None)."""
    out: list[Tensor | None] = []
    for parts in zip(*vecs, strict=True):
        acc: Tensor | None = None
        for c, v in zip(coefs, parts, strict=True):
            if v is None:
                continue
            term = v * (c.to(v.device, v.dtype) if isinstance(c, Tensor) else c)
            acc = term if acc is None else acc + term
        out.append(acc)
    return out


def _ascent(
    direction: Sequence[Tensor | None],
    radius: float,
    eps: float,
    device: torch.device,
    weights: Sequence[Tensor] | None = None,
) -> list[Tensor | None]:
    """The step of length ``radius`` along ``direction``: r d / (||d|| + eps), or, with
    ``weights`` w (adaptive), r w^2 d / (||w d|| + eps)."""
    scale = radius / (_norm(direction, device, weights) + eps)
    out: list[Tensor | None] = []
    for i, d in enumerate(direction):
        if d is None:
            out.append(None)
            continue
        step = d * scale.to(d.device, d.dtype)
        if weights is not None:
            step = step * weights[i].pow(2)
        out.append(step)
    return out


def _param_groups(params: Any) -> list[dict[str, Any]]:
    """Normalize ``params`` (tensors or param-group dicts) to a list of group dicts."""
    if isinstance(params, Tensor):
        raise TypeError(
            "params must be an iterable of tensors or of param-group dicts (e.g. "
            "model.parameters()), not a single tensor; wrap it in a list"
        )
    try:
        items = list(params)
    except TypeError as err:
        raise TypeError(
            f"params must be an iterable of tensors or param-group dicts, not "
            f"{type(params).__name__}"
        ) from err
    if not items:
        raise ValueError("params is empty: pass the parameters to optimize")
    if isinstance(items[0], dict):
        groups = []
        for group in items:
            if not isinstance(group, dict) or "params" not in group:
                raise TypeError("every param group must be a dict with a 'params' entry")
            group = dict(group)
            ps = group["params"]
            group["params"] = [ps] if isinstance(ps, Tensor) else list(ps)
            groups.append(group)
        return groups
    return [{"params": items}]
