"""The Hessian spectrum of an :class:`~flatlens.Objective`: extreme eigenvalues and trace
(the density is in ``flatlens.measures._density``).

All three only need products v -> H v, which run on the model's device; each also accepts
any symmetric operator instead of an Objective (:class:`SymmetricOperator`, a SciPy
``LinearOperator``, a curvlinops operator; see ``flatlens.measures._operators``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from flatlens.core._checks import check_positive_int, make_generator
from flatlens.core._memory import tracks_peak_memory
from flatlens.core._renames import renamed, renamed_attribute
from flatlens.core._results import MeasureResult
from flatlens.measures._basis import dot64, norm64, rows_dot64
from flatlens.measures._certificate import ROUNDING_FACTOR, ROUNDING_SCALE
from flatlens.measures._lanczos import Which
from flatlens.measures._operators import Operator, as_operator
from flatlens.measures._power import power_iteration
from flatlens.measures._reference import certified_lanczos

__all__ = ["EigenResult", "TraceResult", "hessian_eigenvalues", "hessian_trace"]


def _start_vector(
    op: Operator, generator: torch.Generator, *, use_gradient: bool
) -> tuple[Tensor, str]:
    """``(r / ||r|| + g / ||g||, "gradient")`` (r Gaussian, g the gradient where the Hessian is
    taken), or ``(r, "random")`` when not asked for, without an Objective, or when g is zero
    or not finite."""
    r = op.random(generator)
    if not use_gradient or op.objective is None:
        return r, "random"
    g = op.objective.gradient(at=op.point)
    g_norm = norm64(g)
    if not math.isfinite(g_norm) or g_norm == 0:
        return r, "random"
    return r / norm64(r) + g / g_norm, "gradient"


def _starts(first: Tensor | None, draw: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """Start vectors for power iteration: ``first`` (a warm start) once, then ``draw()``."""
    pending = [] if first is None else [first]
    return lambda: pending.pop() if pending else draw()


def _given_start(op: Operator, start: Tensor, method: str) -> Tensor:
    """A warm start vector checked against the operator: flat, of its size, finite, nonzero,
    moved to its device and dtype."""
    if start.dim() != 1 or start.numel() != op.n:
        raise ValueError(
            f"a start vector must be a flat tensor of num_params = {op.n} entries, got shape "
            f"{tuple(start.shape)}"
        )
    v0 = start.detach().to(op.device, op.dtype)
    nrm = torch.linalg.vector_norm(v0)
    if not bool(torch.isfinite(nrm)) or nrm == 0:
        raise ValueError("the start vector must be finite and nonzero")
    return v0


@dataclass
class EigenResult(MeasureResult):
    """Extreme eigenpairs of the Hessian (or of the operator given).

    Attributes:
        eigenvalues: 1-D float64 tensor of Rayleigh quotients u.Hu (float64 sums), most
            wanted first (descending for ``"LA"``).
        eigenvectors: ``(k, num_params)`` tensor of unit rows (left out of ``to_dict``).
        residuals: True residual norms ``||H u - lambda u||``, from one product per pair.
        error_bounds: Bound on each eigenvalue's error, min(r + d, (r + d)^2 / (gap - d) + d)
            with d = ``rounding`` (see :func:`~flatlens.measures.lanczos_eigsh`).
        converged: Whether each bound is within ``tol`` relative.
        num_hvps: Products spent, the final checks included (at most ``max_hvps``).
        start: The Lanczos start vector used: ``"gradient"``, ``"random"`` or ``"given"``
            (a warm start passed as a tensor).
        rounding: The allowance d for the rounding of one product (absolute).
        basis_vectors: Most vectors of length num_params the Lanczos basis held at once.
        bound_kind: ``"certified"`` (the bounds cover the distance to the exact Hessian's
            eigenvalues: float64 products, or pairs re-evaluated in float64) or
            ``"estimate"`` (that distance is estimated; ``bound_note`` says why).
        reference_hvps: Float64 products spent re-evaluating the pairs (not in ``num_hvps``).

    ``result.value`` is the first eigenvalue as a Python float (lambda_max for ``"LA"``),
    the number most users read.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor = field(metadata={"json": False})
    residuals: Tensor
    error_bounds: Tensor
    converged: Tensor
    num_hvps: int
    k: int
    which: str
    method: str
    tol: float
    max_hvps: int | None
    seed: int | None
    num_restarts: int = 0
    start: str = "gradient"
    rounding: float = 0.0
    basis_vectors: int = 0
    bound_kind: str = "certified"
    reference_hvps: int = 0
    bound_note: str = ""

    @property
    def value(self) -> float:
        """The first eigenvalue as a float: lambda_max for ``which="LA"``."""
        return float(self.eigenvalues[0])


@renamed(max_iter="max_hvps")
@tracks_peak_memory
def hessian_eigenvalues(
    objective: Any,
    k: int = 1,
    *,
    which: Which = "LA",
    method: Literal["lanczos", "power"] = "lanczos",
    tol: float = 1e-4,
    max_hvps: int | None = None,
    basis_size: int | None = None,
    seed: int | torch.Generator = 0,
    progress: bool = False,
    at: Tensor | None = None,
    start: Literal["gradient", "random"] | Tensor = "gradient",
    basis_device: torch.device | str | None = None,
    basis_dtype: torch.dtype | None = None,
    rounding: float | None = None,
    certify: bool | None = None,
) -> EigenResult:
    """The k extreme eigenvalues of H = grad^2 L(theta) (or of a symmetric operator).

    ``method="lanczos"`` runs thick-restart Lanczos with full reorthogonalization on the
    model's device, stops once the k wanted Ritz pairs are within half of ``tol``, and
    certifies each returned pair with its true residual r = ||H u - lambda u|| (one more
    product per pair; the rounding allowance d comes from comparing that product with the
    one the Lanczos products give; float64 sums): |lambda - lambda_true| <=
    min(r + d, (r + d)^2 / (gap - d) + d). See :func:`~flatlens.measures.lanczos_eigsh`.
    ``method="power"`` runs power iteration with deflation and stops when the Rayleigh
    quotient changes by less than ``tol`` relative (its bound is r plus rounding only).

    Args:
        objective: The empirical risk whose Hessian is taken, or a symmetric operator:
            :class:`~flatlens.measures.SymmetricOperator`, a SciPy ``LinearOperator``, a
            torch operator with ``@`` (curvlinops), a square tensor.
        k: Number of eigenpairs (1 <= k < num_params).
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest
            magnitude.
        method: ``"lanczos"`` or ``"power"``.
        tol: Relative accuracy wanted, > 0.
        max_hvps: Budget of products for either method, checks included (default:
            Lanczos ``max(500, 20 basis_size)``, power iteration ``1000 k``).
            When it is spent before ``tol`` is met, ``converged`` says so.
        basis_size: Lanczos vectors processed between restarts; the basis grows to at most
            ``basis_size + 1`` vectors of num_params (``+ k`` while refining); default
            ``max(2k + 10, 24)``, capped at n.
        seed: Seed or generator for the start vector.
        progress: Show a tqdm bar of products done (no total: Lanczos stops when converged).
        at: Flat parameter vector where the Hessian is taken (default: the model's; an
            Objective only).
        start: Lanczos start vector. ``"gradient"`` (for ``"LA"`` and ``"LM"``) is
            r / ||r|| + g / ||g|| with r Gaussian and g = grad L(theta): the gradient of a
            trained network lies mostly in the top eigenspace (Gur-Ari et al., 2018), and
            r keeps every eigenvector in reach. It costs one gradient: free when the
            objective caches its graph, one more pass over the data otherwise (not counted
            in ``num_hvps``). ``"random"`` is r alone (always used for ``"SA"``, for power
            iteration, for operators, and when g is zero); the result's ``start`` says which.
            A flat tensor of num_params is a warm start (``"given"``): Lanczos starts from
            it, e.g. the previous top eigenvector during training, which converges in a few
            products when the Hessian has moved little; the certificate is the same.
        basis_device: Keep the Lanczos basis there, e.g. ``"cpu"`` when the parameters are
            many: device memory for two transfers of num_params per step.
        basis_dtype: Store the basis in a lower precision (e.g. bfloat16): half the memory,
            weaker orthogonality, accuracy reachable about eps(basis_dtype); the
            certificate still holds.
        rounding: Known relative rounding u of one product (||fl(Hv) - Hv|| <= u ||H||),
            instead of measuring it (from the checked products, sometimes one more).
        certify: Re-evaluate the k pairs of an Objective below float64 with float64
            products on a float64 copy of the model (``flatlens.measures._reference``):
            ``None`` when the copy fits in memory, ``True`` always, ``False`` never.

    Returns:
        An :class:`EigenResult`.
    """
    n = _size(objective)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k < n:
        raise ValueError(f"k must be an integer with 1 <= k < num_params = {n}, got {k!r}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if which not in ("LA", "SA", "LM"):
        raise ValueError(f"which must be 'LA', 'SA' or 'LM', not {which!r}")
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', not {method!r}")
    if max_hvps is not None:
        max_hvps = check_positive_int("max_hvps", max_hvps)
    given = isinstance(start, Tensor)
    if not given and start not in ("gradient", "random"):
        raise ValueError(f"start must be 'gradient', 'random' or a flat tensor, not {start!r}")
    gen = make_generator(seed)
    op = as_operator(objective, at)
    if given:
        v0, used = _given_start(op, start, method), "given"
    elif method == "lanczos":
        v0, used = _start_vector(op, gen, use_gradient=start == "gradient" and which != "SA")
    if method == "lanczos":
        done = certified_lanczos(
            op,
            v0,
            k,
            certify=certify,
            which=which,
            tol=tol,
            max_matvecs=max_hvps,
            basis_size=basis_size,
            generator=gen,
            progress=progress,
            basis_device=basis_device,
            basis_dtype=basis_dtype,
            rounding=rounding,
        )
        out, kind, extra, note = done.output, done.kind, done.reference_hvps, done.note
    else:
        used = "given" if given else "random"
        out = power_iteration(
            op.matvec,
            n,
            k,
            which=which,
            tol=tol,
            max_matvecs=max_hvps,
            make_start=_starts(v0 if given else None, lambda: op.random(gen)),
            progress=progress,
        )
        exact = op.dtype == torch.float64 and not getattr(op.objective, "uses_differences", 0)
        kind, extra, note = ("certified", 0, "") if exact else ("estimate", 0, "power, float32")
    return EigenResult(
        eigenvalues=out.eigenvalues,
        eigenvectors=out.eigenvectors,
        residuals=out.residuals,
        error_bounds=out.error_bounds,
        converged=out.converged,
        num_hvps=op.count,
        k=k,
        which=which,
        method=method,
        tol=tol,
        max_hvps=max_hvps,
        seed=seed if isinstance(seed, int) else None,
        num_restarts=out.num_restarts,
        start=used,
        rounding=out.rounding,
        basis_vectors=out.basis_vectors,
        bound_kind=kind,
        reference_hvps=extra,
        bound_note=note,
    )


def _size(objective: Any) -> int:
    """num_params of an Objective or n of an operator, before any work (for the k check)."""
    n = getattr(objective, "num_params", None)
    if isinstance(n, int):
        return n
    return as_operator(objective).n


@dataclass
class TraceResult(MeasureResult):
    """Stochastic estimate of tr(H).

    Attributes:
        value: The estimate.
        stderr: Its standard error s / sqrt(m) over the m stochastic samples. For Hutch++
            this is the whole statistical error: given the sketch Q the estimate is
            unbiased and tr(Q^T H Q) is exact. NaN when a single stochastic sample is left
            (Hutch++ with ``num_probes=3``, Hutchinson with 1): one sample has no spread,
            so its error is unknown, not zero.
        num_hvps: Products spent (``num_probes``).
        num_probes: The product budget m asked for.
        rounding: Allowance for the operator's rounding in the exact part tr(Q^T H Q) of
            Hutch++ (r d, d measured as in the eigenvalue certificate; 0 for Hutchinson,
            whose rounding is part of the sample spread).
    """

    value: float
    stderr: float
    num_hvps: int
    num_probes: int
    method: str
    seed: int | None
    rounding: float = 0.0

    num_samples = renamed_attribute("TraceResult", "num_samples", "num_probes")


def _orthonormal_rows(y: Tensor) -> Tensor:
    """Orthonormalize the rows of ``y`` in place (Gram-Schmidt twice, float64 sums); returns
    the leading rows that span them (a zero row is dropped)."""
    r = 0
    for i in range(y.shape[0]):
        x = y[i].clone()
        for _ in range(2):
            if r:
                x.addmv_(y[:r].T, rows_dot64(y[:r], x).to(x.device, x.dtype), alpha=-1.0)
        nrm = norm64(x)
        if nrm > 0:
            y[r] = x / nrm
            r += 1
    return y[:r]


@renamed(num_samples="num_probes")
@tracks_peak_memory
def hessian_trace(
    objective: Any,
    *,
    num_probes: int = 99,
    method: Literal["hutch++", "hutchinson"] = "hutch++",
    seed: int | torch.Generator = 0,
    progress: bool = False,
    at: Tensor | None = None,
) -> TraceResult:
    """Estimate tr(H) with ``num_probes`` products (all sums in float64).

    * Hutchinson: tr(H) ~ (1/m) sum_i z_i^T H z_i with Rademacher z_i.
    * Hutch++ (Meyer et al., 2021): with s = m/3 products sketch Q = orth(H S), add the
      exact tr(Q^T H Q) (s products) and Hutchinson on the deflated rest
      (I - QQ^T) H (I - QQ^T) (the remaining products, one of which measures the rounding
      of H q_1 when at least three remain). Its variance falls like 1/m^2 instead of 1/m.
      Memory: s + 3 vectors of num_params (S is never stored; Q overwrites H S).

    Args:
        objective: The empirical risk, or a symmetric operator (see
            :func:`hessian_eigenvalues`).
        num_probes: Product budget m, one random probe vector each (>= 2 for Hutchinson,
            >= 3 for Hutch++).
        method: ``"hutch++"`` or ``"hutchinson"``.
        seed: Seed or generator.
        progress: Show a tqdm bar of products done (of ``num_probes``).
        at: Flat parameter vector where the Hessian is taken (default: the model's).
    """
    if method not in ("hutch++", "hutchinson"):
        raise ValueError(f"method must be 'hutch++' or 'hutchinson', not {method!r}")
    least = 3 if method == "hutch++" else 2
    if not isinstance(num_probes, int) or num_probes < least:
        raise ValueError(f"num_probes must be an integer >= {least} for {method}")
    gen = make_generator(seed)
    op = as_operator(objective, at)
    bar = tqdm(total=num_probes, desc="trace", unit="matvec", disable=not progress, leave=False)
    op.on_product = bar.update
    exact, rounding, spread, q = 0.0, 0.0, 0.0, None
    n_stoch = num_probes
    try:
        if method == "hutch++":
            s = min(num_probes // 3, op.n)
            y = torch.empty(s, op.n, device=op.device, dtype=op.dtype)
            for i in range(s):
                y[i] = op.matvec(op.random(gen, "rademacher"))
            q = _orthonormal_rows(y)
            products = []
            for i in range(q.shape[0]):
                hq = op.matvec(q[i])
                exact += dot64(q[i], hq)
                products.append(norm64(hq))
                if i == 0 and num_probes - 2 * s >= 3:
                    spread = norm64(op.matvec(ROUNDING_SCALE * q[0]) / ROUNDING_SCALE - hq)
                del hq
            eps = torch.finfo(op.dtype).eps
            floor = 2 * eps * max(products, default=0.0)
            d = max(ROUNDING_FACTOR * spread, floor) if num_probes - 2 * s >= 3 else floor
            rounding = q.shape[0] * d
            n_stoch = num_probes - op.count
        samples = []
        for _ in range(n_stoch):
            z = op.random(gen, "rademacher")
            if q is not None and q.shape[0]:
                z.addmv_(q.T, rows_dot64(q, z).to(z.device, z.dtype), alpha=-1.0)
            samples.append(dot64(z, op.matvec(z)))
    finally:
        op.on_product = None
        bar.close()
    arr = np.asarray(samples, dtype=np.float64)
    stderr = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else float("nan")
    return TraceResult(
        value=exact + (float(arr.mean()) if arr.size else 0.0),
        stderr=stderr,
        num_hvps=op.count,
        num_probes=num_probes,
        method=method,
        seed=seed if isinstance(seed, int) else None,
        rounding=rounding,
    )
