"""Directions in parameter space for loss-landscape slices, as flat vectors over an Objective.

* :func:`random_direction`: Gaussian entries, scaled per filter, layer or model to the
  parameters' own norms (Li et al., 2018, "Visualizing the Loss Landscape of Neural Nets").
* :func:`interpolation_direction`: theta_other - theta, the straight line to another model.
* :func:`pca_directions`: principal directions of a training trajectory around its final point.
* :func:`eigen_directions`: the top eigenvectors of the Hessian.

Directions are never orthogonalized behind the caller's back; :func:`cosine` reports how
far from orthogonal two of them are (two random Gaussian directions in n dimensions have
cosine of order 1/sqrt(n)).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from flatlens.core._checks import make_generator
from flatlens.core._objective import Objective
from flatlens.core._renames import renamed
from flatlens.core._results import Result
from flatlens.measures._spectrum import hessian_eigenvalues

__all__ = [
    "Direction",
    "PCADirections",
    "as_direction",
    "cosine",
    "eigen_directions",
    "interpolation_direction",
    "normalize_direction",
    "pca_directions",
    "random_direction",
]

Normalization = Literal["filter", "layer", "model"] | None
Ignore = Literal["biasbn"] | None


@dataclass
class Direction(Result):
    """A flat direction vector over an Objective's parameters, with where it came from.

    Attributes:
        vector: Flat tensor of length ``num_params`` on the objective's device and dtype
            (left out of ``to_dict``).
        source: ``"random"``, ``"interpolation"``, ``"pca"``, ``"eigen"`` or ``"custom"``.
        settings: The arguments that produced it (seed, normalization, eigenvalue, ...).
        norm: Its Euclidean norm ||d||.
    """

    vector: Tensor = field(metadata={"json": False})
    source: str = "custom"
    settings: dict[str, Any] = field(default_factory=dict)
    norm: float = math.nan

    def __post_init__(self) -> None:
        if math.isnan(self.norm):
            self.norm = float(torch.linalg.vector_norm(self.vector.detach().double()))


def cosine(d1: Direction | Tensor, d2: Direction | Tensor) -> float:
    """cos(d1, d2) = <d1, d2> / (||d1|| ||d2||), computed in float64 (NaN if one is zero)."""
    a = (d1.vector if isinstance(d1, Direction) else d1).detach().double().reshape(-1)
    b = (d2.vector if isinstance(d2, Direction) else d2).detach().double().reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"directions have different lengths: {a.numel()} and {b.numel()}")
    den = float(torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
    return float(a @ b.to(a.device)) / den if den > 0 else math.nan


def as_direction(objective: Objective, direction: Direction | Tensor) -> Direction:
    """Check a direction against ``objective`` and wrap a bare tensor as a ``"custom"`` one.

    Raises:
        TypeError: if ``direction`` is neither a :class:`Direction` nor a tensor.
        ValueError: if its length, device or finiteness does not fit the objective.
    """
    if isinstance(direction, Tensor):
        direction = Direction(direction.detach(), "custom")
    if not isinstance(direction, Direction):
        raise TypeError(
            f"a direction must be a flat tensor or a Direction, not {type(direction).__name__}"
        )
    vec = direction.vector
    if vec.shape != (objective.num_params,):
        raise ValueError(
            f"direction has shape {tuple(vec.shape)}, expected ({objective.num_params},) "
            "(a flat vector over the objective's parameters; see objective.space)"
        )
    if vec.device != objective.device:
        raise ValueError(f"direction is on {vec.device}, the model on {objective.device}")
    if not bool(torch.isfinite(vec).all()):
        raise ValueError("direction has NaN or infinite entries")
    if vec.dtype != objective.dtype:
        direction = Direction(
            vec.to(objective.dtype), direction.source, direction.settings, direction.norm
        )
    return direction


def normalize_direction(
    objective: Objective,
    vector: Tensor,
    *,
    normalization: Normalization = "filter",
    ignore: Ignore = "biasbn",
) -> Tensor:
    """Scale a raw direction to the scale of the objective's parameters theta.

    Per parameter W (its slice of ``vector`` is D), in float64:

    * ``"filter"``: for a W with 2 or more dims, each filter i (slice along dim 0) becomes
      D_i * ||W_i|| / ||D_i||; a 1-D (or 0-D) W is treated as one filter.
    * ``"layer"``: D * ||W|| / ||D|| for each parameter.
    * ``"model"``: the whole vector d * ||theta_kept|| / ||d||, with theta_kept the entries
      not zeroed by ``ignore``.
    * ``None``: unchanged.

    ``ignore="biasbn"`` first zeroes every parameter with fewer than 2 dims (biases and
    BatchNorm scales/shifts), as Li et al. do. A filter of D with zero norm stays zero.

    Returns:
        A new flat vector on the objective's device and dtype.
    """
    if normalization not in ("filter", "layer", "model", None):
        raise ValueError(
            f"normalization must be 'filter', 'layer', 'model' or None, not {normalization!r}"
        )
    if ignore not in ("biasbn", None):
        raise ValueError(f"ignore must be 'biasbn' or None, not {ignore!r}")
    if vector.shape != (objective.num_params,):
        raise ValueError(f"vector must have shape ({objective.num_params},)")
    d = vector.detach().to("cpu", torch.float64).clone()
    theta = objective.theta.to("cpu", torch.float64)
    keep = torch.ones_like(d, dtype=torch.bool)
    for _, sl, shape in objective.space.segments():
        if len(shape) < 2 and ignore == "biasbn":
            d[sl] = 0.0
            keep[sl] = False
        elif normalization == "filter":
            rows = 1 if len(shape) < 2 else shape[0]
            dv, wv = d[sl].view(rows, -1), theta[sl].view(rows, -1)
            dn = torch.linalg.vector_norm(dv, dim=1, keepdim=True)
            wn = torch.linalg.vector_norm(wv, dim=1, keepdim=True)
            dv.mul_(torch.where(dn > 0, wn / torch.where(dn > 0, dn, 1.0), 0.0))
        elif normalization == "layer":
            dn = torch.linalg.vector_norm(d[sl])
            d[sl] *= torch.linalg.vector_norm(theta[sl]) / dn if dn > 0 else 0.0
    if normalization == "model":
        dn = torch.linalg.vector_norm(d)
        d *= torch.linalg.vector_norm(theta[keep]) / dn if dn > 0 else 0.0
    return d.to(objective.device, objective.dtype)


def random_direction(
    objective: Objective,
    *,
    normalization: Normalization = "filter",
    ignore: Ignore = "biasbn",
    seed: int | torch.Generator = 0,
) -> Direction:
    """A Gaussian direction d ~ N(0, I), normalized by :func:`normalize_direction`.

    The entries are drawn in float64 on the CPU from ``seed``, so every device, dtype and
    rank gets the same direction.

    Args:
        objective: Gives the parameters (theta) and their per-parameter layout.
        normalization: ``"filter"`` (Li et al.), ``"layer"``, ``"model"`` or ``None``.
        ignore: ``"biasbn"`` zeroes 1-D parameters; ``None`` keeps them.
        seed: Seed or generator.
    """
    gen = make_generator(seed)
    raw = torch.randn(objective.num_params, generator=gen, dtype=torch.float64)
    vec = normalize_direction(objective, raw, normalization=normalization, ignore=ignore)
    settings = {
        "normalization": normalization,
        "ignore": ignore,
        "seed": seed if isinstance(seed, int) else None,
    }
    return Direction(vec, "random", settings)


def _flat_from(objective: Objective, other: Any, what: str) -> Tensor:
    """The objective's parameters read from a model, a state dict or a flat vector."""
    if isinstance(other, Tensor):
        if other.shape != (objective.num_params,):
            raise ValueError(
                f"{what}: a flat vector must have shape ({objective.num_params},), "
                f"got {tuple(other.shape)}"
            )
        return other.detach().to(objective.device, objective.dtype)
    if isinstance(other, nn.Module):
        other = dict(other.named_parameters())
    if not isinstance(other, Mapping):
        raise TypeError(
            f"{what} must be a model, a state dict or a flat tensor, not {type(other).__name__}"
        )
    parts = []
    for name, _, shape in objective.space.segments():
        if name not in other:
            raise ValueError(
                f"{what} has no entry {name!r}; it must hold every parameter of the objective"
            )
        value = torch.as_tensor(other[name]).detach()
        if value.shape != shape:
            raise ValueError(
                f"{what}: {name!r} has shape {tuple(value.shape)}, expected {tuple(shape)}"
            )
        parts.append(value.reshape(-1).to(objective.device, objective.dtype))
    return torch.cat(parts)


def interpolation_direction(
    objective: Objective, other: nn.Module | Mapping[str, Tensor] | Tensor
) -> Direction:
    """d = theta_other - theta: ``line(objective, d, span=(0, 1))`` walks from theta to theta_other.

    Args:
        objective: The start point theta (the model's current parameters).
        other: The end point: a model with the same parameter names, a state dict holding
            them, or a flat vector.
    """
    end = _flat_from(objective, other, "other")
    vec = end - objective.theta
    return Direction(vec, "interpolation", {"distance": float(torch.linalg.vector_norm(vec))})


@dataclass
class PCADirections(Result):
    """Principal directions of a trajectory theta_0, ..., theta_T around its final point.

    Attributes:
        directions: k unit, mutually orthogonal :class:`Direction` objects (not in
            ``to_dict``; their settings are).
        explained_variance_ratio: s_j^2 / sum_i s_i^2 for the k directions.
        singular_values: s_1 >= ... >= s_k of the difference matrix.
        coordinates: ``(T + 1, k)`` array, c_t = D (theta_t - theta_T): each checkpoint
            in the directions' coordinates (the final one is the origin).
    """

    directions: list[Direction] = field(metadata={"json": False})
    explained_variance_ratio: np.ndarray
    singular_values: np.ndarray
    coordinates: np.ndarray
    num_checkpoints: int
    k: int

    def span(self, margin: float = 0.2) -> tuple[tuple[float, float], tuple[float, float]]:
        """Spans of the first two coordinates that hold the whole trajectory and the origin,
        widened by ``margin`` times the range on each side (for :func:`plane`)."""
        if self.k < 2:
            raise ValueError("span() needs k >= 2 directions")
        out = []
        for j in range(2):
            lo = min(0.0, float(self.coordinates[:, j].min()))
            hi = max(0.0, float(self.coordinates[:, j].max()))
            pad = margin * (hi - lo) if hi > lo else 1.0
            out.append((lo - pad, hi + pad))
        return out[0], out[1]


def pca_directions(
    checkpoints: Sequence[nn.Module | Mapping[str, Tensor] | Tensor],
    k: int = 2,
    *,
    objective: Objective | None = None,
) -> PCADirections:
    """PCA of a training trajectory about its final point (Li et al., 2018, Sec. 7).

    With M the ``(T+1) x n`` matrix of rows theta_t - theta_T and its thin SVD
    M = U S V^T, the directions are the first k rows of V^T (unit, orthogonal), the
    explained variance ratios s_j^2 / sum_i s_i^2 and the coordinates U_k S_k. Unlike
    scikit-learn's PCA the rows are not centred on their mean: the plane passes through the
    final point, where the landscape is drawn. Each direction's sign makes the first
    checkpoint's coordinate non-positive, so the path runs towards the origin.

    Args:
        checkpoints: Two or more points, oldest first, final last: flat vectors, or models /
            state dicts (these need ``objective`` to say which parameters and in what order).
        k: Number of directions, 1 <= k <= number of checkpoints - 1.
        objective: Required for models and state dicts; the directions then live on its
            device and dtype.
    """
    if len(checkpoints) < 2:
        raise ValueError("pca_directions needs at least two checkpoints (a trajectory)")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(checkpoints) - 1:
        raise ValueError(
            f"k must be an integer in [1, {len(checkpoints) - 1}] (checkpoints - 1), got {k!r}"
        )
    flats = []
    for i, cp in enumerate(checkpoints):
        if objective is not None:
            flats.append(_flat_from(objective, cp, f"checkpoints[{i}]"))
        elif isinstance(cp, Tensor) and cp.dim() == 1:
            flats.append(cp.detach())
        else:
            raise ValueError(
                "checkpoints given as models or state dicts need objective= to pick the "
                "parameters; or pass flat vectors"
            )
    if len({f.shape for f in flats}) != 1:
        raise ValueError("all checkpoints must have the same number of parameters")
    out_device, out_dtype = flats[-1].device, flats[-1].dtype
    pts = torch.stack([f.to(out_device, torch.float64) for f in flats])
    diffs = pts - pts[-1]
    _, s, vh = torch.linalg.svd(diffs, full_matrices=False)
    vh = vh[:k]
    coords = diffs @ vh.T
    signs = torch.where(coords[0] > 0, -1.0, 1.0).to(vh.dtype)
    vh, coords = vh * signs[:, None], coords * signs
    total = float((s**2).sum())
    ratio = (s[:k] ** 2 / total).cpu().numpy() if total > 0 else np.zeros(k)
    dirs = [
        Direction(
            vh[j].to(out_dtype).contiguous(),
            "pca",
            {"component": j, "explained_variance_ratio": float(ratio[j])},
        )
        for j in range(k)
    ]
    return PCADirections(
        directions=dirs,
        explained_variance_ratio=ratio,
        singular_values=s[:k].cpu().numpy(),
        coordinates=coords.cpu().numpy(),
        num_checkpoints=len(checkpoints),
        k=k,
    )


@renamed(max_iter="max_hvps")
def eigen_directions(
    objective: Objective,
    k: int = 2,
    *,
    tol: float = 1e-4,
    max_hvps: int | None = None,
    seed: int | torch.Generator = 0,
    progress: bool = False,
) -> list[Direction]:
    """The k eigenvectors of the Hessian with the largest eigenvalues, as unit directions.

    Computed by :func:`flatlens.measures.hessian_eigenvalues` (Lanczos, ``which="LA"``);
    each direction's settings hold its eigenvalue and certified error bound.
    """
    res = hessian_eigenvalues(
        objective, k, which="LA", tol=tol, max_hvps=max_hvps, seed=seed, progress=progress
    )
    return [
        Direction(
            res.eigenvectors[j].to(objective.device, objective.dtype).contiguous(),
            "eigen",
            {
                "index": j,
                "eigenvalue": float(res.eigenvalues[j]),
                "error_bound": float(res.error_bounds[j]),
                "converged": bool(res.converged[j]),
                "num_hvps": res.num_hvps,
                "seed": seed if isinstance(seed, int) else None,
            },
        )
        for j in range(k)
    ]
