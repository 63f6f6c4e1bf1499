"""Power iteration with deflation, for comparison with tools that use it (PyHessian).

Inner products are accumulated in float64 (:mod:`flatlens.measures._basis`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flatlens.measures._basis import combo_norm64, dot64, norm64
from flatlens.measures._lanczos import EigshOutput, MatVec, Which, fix_signs

__all__ = ["power_iteration"]


def power_iteration(
    matvec: MatVec,
    n: int,
    k: int,
    *,
    which: Which = "LA",
    tol: float = 1e-4,
    max_matvecs: int | None = None,
    make_start: Callable[[], Tensor],
    progress: bool = False,
) -> EigshOutput:
    """k eigenpairs by power iteration with deflation (Hotelling-style projection).

    Each eigenpair is found on the operator P (s A - c I) P, where P projects out the
    eigenvectors already found, s = -1 for ``"SA"`` and c is a shift. For ``"LA"``/``"SA"``
    the dominant eigenvalue is found first; when it has the wrong sign, the iteration is
    rerun with that eigenvalue as the shift so the wanted end of the spectrum dominates.
    Stops when the Rayleigh quotient changes by less than ``tol`` relative, or when the
    budget of ``max_matvecs`` products in all (default 1000 k) is spent; one product per
    pair checks its residual r (float64 sums) and is part of the budget. The bound is
    r + 2 eps |lambda| (Weyl: some eigenvalue lies that close, not necessarily the wanted).
    """
    if not 1 <= k < n:
        raise ValueError(f"k must be between 1 and num_params - 1 = {n - 1}, got {k}")
    budget = 1000 * k if max_matvecs is None else max_matvecs
    if budget < k:
        raise ValueError(f"max_matvecs must be >= k = {k} (one check per pair), got {budget}")
    sign = -1.0 if which == "SA" else 1.0
    found: list[Tensor] = []
    values: list[float] = []
    residuals: list[float] = []
    converged: list[bool] = []
    count = 0

    def deflate(v: Tensor) -> Tensor:
        for u in found:
            v = v - dot64(u, v) * u
        return v

    bar = tqdm(desc="power", unit="matvec", disable=not progress, leave=False)
    for _ in range(k):
        shift = 0.0
        for _attempt in range(2):
            v = deflate(make_start())
            v = v / norm64(v)
            lam, ok = 0.0, False
            while count + (k - len(found)) < budget:
                w = deflate(sign * matvec(v) - shift * v)
                count += 1
                bar.update(1)
                new = dot64(v, w)
                nw = norm64(w)
                if nw == 0:
                    lam, ok = new, True
                    break
                v = deflate(w / nw)
                v = v / norm64(v)
                if abs(new - lam) <= tol * abs(new):
                    lam, ok = new, True
                    break
                lam = new
            if which == "LM" or lam >= 0 or shift != 0.0:
                break
            shift = lam
        av = matvec(v)
        count += 1
        bar.update(1)
        value = dot64(v, av)
        found.append(v)
        values.append(value)
        residuals.append(combo_norm64(av, v, value))
        converged.append(ok)
    bar.close()
    vecs = torch.stack(found)
    res = torch.tensor(residuals, dtype=torch.float64)
    vals = torch.tensor(values, dtype=torch.float64)
    return EigshOutput(
        eigenvalues=vals,
        eigenvectors=fix_signs(vecs),
        residuals=res,
        error_bounds=res + 2 * torch.finfo(vecs.dtype).eps * vals.abs().max(),
        converged=torch.tensor(converged),
        num_matvecs=count,
        num_restarts=0,
    )
