"""Start points of the worst-case ascent, all on the sphere ||delta||_B = rho.

At a minimum grad L = 0, so the ascent cannot start from theta itself: it starts along the
gradient (the one-step SAM point), along +- the top curvature directions (eigenvectors of
S H S, by Lanczos) and at random points of the sphere, and keeps the best.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flatlens.core._objective import Objective
from flatlens.core._sharding import random_vector
from flatlens.measures._ball import Ball
from flatlens.measures._lanczos import lanczos_eigsh
from flatlens.measures._spectrum import EigenResult

__all__ = ["curvature_directions", "sphere_starts"]


def curvature_directions(
    objective: Objective,
    theta: Tensor,
    k: int,
    *,
    scale: Tensor | None = None,
    tol: float = 1e-3,
    max_hvps: int | None = None,
    generator: torch.Generator,
    basis_device: torch.device | str | None = None,
    basis_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-k eigenpairs of S H S (S = diag(scale), or S = I), by Lanczos at ``theta``.

    In the scaled coordinates u = delta / s the Hessian is S H S, so its eigenvectors are
    the directions of largest curvature in the adaptive geometry, and they transform with
    a rescaling of the network exactly as the ball does.

    The basis lives on ``basis_device`` in ``basis_dtype`` when given.

    Returns:
        ``(eigenvalues, eigenvectors)``: float64 values, unit rows.
    """

    def matvec(v: Tensor) -> Tensor:
        if scale is None:
            return objective.hvp(v, at=theta)
        return scale * objective.hvp(scale * v, at=theta)

    v0 = random_vector(objective.num_params, generator)
    # Difference products: Lanczos stops where they stop resolving, and their step, when not
    # chosen yet, is chosen along the gradient (a random vector is far flatter: on GPT-2
    # small its step misses the sharpest directions).
    rounding = objective.difference_rounding(at=theta)
    out = lanczos_eigsh(
        matvec,
        v0.to(objective.device, objective.dtype),
        k,
        which="LA",
        tol=tol,
        max_matvecs=max_hvps,
        generator=generator,
        basis_device=basis_device,
        basis_dtype=basis_dtype,
        rounding=rounding,
    )
    return out.eigenvalues, out.eigenvectors


def _eigen_rows(eigen: EigenResult | Tensor) -> Tensor:
    rows = eigen.eigenvectors if isinstance(eigen, EigenResult) else eigen
    if not isinstance(rows, Tensor):
        raise TypeError("eigen must be an EigenResult or a tensor of eigenvector rows")
    return rows if rows.dim() == 2 else rows.reshape(1, -1)


def sphere_starts(
    objective: Objective,
    ball: Ball,
    theta: Tensor,
    *,
    init: Sequence[str],
    restarts: int,
    gradient: Tensor | None,
    generator: torch.Generator,
    eigen: EigenResult | Tensor | None = None,
    num_eigen: int = 1,
    eigen_tol: float = 1e-3,
    eigen_max_hvps: int | None = None,
    starts: Sequence[Tensor] | None = None,
    basis: dict | None = None,
) -> list[tuple[str, Tensor]]:
    """Named start points for the ascent, all on the ball's sphere (given ones projected).

    * ``"gradient"`` in ``init``: rho d(g), the one-step SAM point (skipped if g = 0).
    * ``"eigen"`` in ``init``: the sphere points along +-u_i for the top ``num_eigen``
      eigenvectors u_i of S H S (or those of ``eigen``, read as directions u = delta / s).
    * ``restarts`` random points on the sphere.
    * ``starts``: caller-supplied perturbations.

    ``basis`` holds the ``basis_device`` / ``basis_dtype`` of the eigen start's Lanczos run.
    """
    out: list[tuple[str, Tensor]] = []
    scale = ball.scale
    if "gradient" in init and gradient is not None:
        d = ball.to_sphere(gradient if scale is None else scale * gradient)
        if bool((d != 0).any()):
            out.append(("gradient", d))
    if "eigen" in init:
        if eigen is None:
            _, rows = curvature_directions(
                objective,
                theta,
                num_eigen,
                scale=scale,
                tol=eigen_tol,
                max_hvps=eigen_max_hvps,
                generator=generator,
                **(basis or {}),
            )
        else:
            rows = _eigen_rows(eigen)[:num_eigen]
        for i, u in enumerate(rows):
            u = u.to(objective.device, objective.dtype)
            out += [(f"+eigen{i}", ball.to_sphere(u)), (f"-eigen{i}", ball.to_sphere(-u))]
    for i in range(restarts):
        point = ball.random_sphere(
            objective.num_params, generator, device=objective.device, dtype=objective.dtype
        )
        out.append((f"random{i}", point))
    for i, delta in enumerate(starts or ()):
        if not isinstance(delta, Tensor) or delta.shape != (objective.num_params,):
            raise ValueError(f"starts[{i}] must be a flat tensor of length {objective.num_params}")
        out.append(
            (f"given{i}", ball.project_scaled(delta.detach().to(objective.device, objective.dtype)))
        )
    return out
