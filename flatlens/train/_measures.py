"""The flatness measures a training run takes every few epochs: λ_max, tr(H), R0 and R1.

They run on one fixed subset of the training data, the same for every run on the same data,
so that the numbers of different optimizers and seeds are comparable.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from flatlens.core._checks import make_generator
from flatlens.core._objective import Objective
from flatlens.data import Dataset

__all__ = ["MEASURES", "check_measures", "measure_subset", "take_measures"]

MEASURES = ("lambda_max", "trace", "r0", "r1")


def check_measures(measures: Sequence[str]) -> tuple[str, ...]:
    """``measures`` as a tuple, unless one of them is not in :data:`MEASURES`."""
    if isinstance(measures, str):
        raise TypeError(f"measures must be a sequence of names, not the string {measures!r}")
    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise ValueError(f"unknown measures {unknown}; choose from {list(MEASURES)}")
    return tuple(measures)


def measure_subset(data: Dataset, samples: int) -> tuple[Tensor, Tensor]:
    """The first ``samples`` training examples of one permutation drawn from seed 0."""
    n = len(data.y_train)
    order = torch.randperm(n, generator=make_generator(0))
    keep = order[: min(samples, n)]
    return data.x_train[keep], data.y_train[keep]


def take_measures(
    objective: Objective,
    measures: Sequence[str],
    *,
    rho: float,
    steps: int,
    trace_probes: int,
    seed: int,
) -> dict[str, float]:
    """λ_max, tr(H), R0 and R1 (those in ``measures``) of ``objective``.

    One top eigenpair serves λ_max and starts the R0/R1 ascents; each measure draws from its
    own generator seeded with ``seed``. The model is left unchanged.
    """
    out: dict[str, float] = {}
    eigen = None
    if {"lambda_max", "r0", "r1"} & set(measures):
        from flatlens.measures._spectrum import hessian_eigenvalues

        eigen = hessian_eigenvalues(objective, k=1, tol=1e-3, seed=seed)
        if "lambda_max" in measures:
            out["lambda_max"] = float(eigen.eigenvalues[0])
    if "trace" in measures:
        from flatlens.measures._spectrum import hessian_trace

        out["trace"] = float(hessian_trace(objective, num_probes=trace_probes, seed=seed).value)
    ascents: list[tuple[str, Callable[..., Any]]] = []
    if "r0" in measures:
        from flatlens.measures._sharpness import zeroth_order_sharpness

        ascents.append(("r0", zeroth_order_sharpness))
    if "r1" in measures:
        from flatlens.measures._flatness import first_order_flatness

        ascents.append(("r1", first_order_flatness))
    for name, fn in ascents:
        extra = {"eigen": eigen} if "eigen" in inspect.signature(fn).parameters else {}
        out[name] = float(fn(objective, rho, steps=steps, seed=seed, **extra).value)
    return out
