"""What an eigenvalue bound covers: re-evaluation in float64, or an honest "estimate".

The Lanczos certificate (``_certificate``) bounds the distance from each returned value to
the spectrum of the operator *as computed*, with an allowance delta for the rounding of
one product measured from two roundings of the same product. A float32 Hessian-vector
product also differs from the exact one systematically (both roundings share it: the same
float32 forward pass, the same float32 weights), and a difference product by its
truncation. :func:`finish_certificate` decides what the bound covers:

* float64 products (an Objective in float64, any float64 operator): ``"certified"``;
* an Objective below float64 with exact (autograd) products, when a float64 copy of the
  model fits in memory: the k returned vectors are multiplied once more by the float64
  Hessian (k products on a float64 copy of the model and data), and the values, residuals
  and bounds are those of the float64 products. The other Ritz values, which set the gap
  of Kato-Temple, get a radius grown by 4 max_i ||H64 u_i - H32 u_i|| (the measured
  distance between the two operators). ``"certified"``;
* difference products: the step is re-checked along u_1 (:func:`_with_checked_step`) and
  the allowance grows by the Richardson estimate ||D_rh(u_1) - D_h(u_1)||, r = sqrt 3 (two
  more gradients, once per point). ``"estimate"``;
* otherwise (below float64 with ``certify=False``, no room for the copy, a GPU whose
  float64 runs at 1/32 of float32's rate, a sharded model, or an operator that is not an
  Objective): the bound covers the measured rounding only. ``"estimate"``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import Tensor

from flatlens.core._memory import available_bytes
from flatlens.measures._certificate import (
    ROUNDING_FACTOR,
    allowance,
    bound,
    rayleigh,
    rebound,
    spread,
)
from flatlens.measures._lanczos import EigshOutput, Which, lanczos_eigsh, order
from flatlens.measures._operators import Operator

__all__ = ["Finished", "certified_lanczos", "finish_certificate"]

F64 = torch.float64


@dataclasses.dataclass
class Finished:
    """The solver's output with the bound's final kind and the extra products it took."""

    output: EigshOutput
    kind: str
    reference_hvps: int = 0
    note: str = ""


def _room_for_copy(objective, k: int) -> bool:
    """Whether a float64 copy of the model with its products fits: twice the parameters'
    and buffers' float32 bytes for the copy, k + 3 float64 vectors, and twice the cached
    graph's estimate (when known) for one product, within half the free memory (or the
    objective's ``memory_budget``)."""
    model = objective.model
    tensors = [*model.parameters(), *model.buffers()]
    copy_bytes = sum(t.numel() * 8 for t in tensors if t.is_floating_point())
    need = copy_bytes + (k + 3) * objective.num_params * 8
    need += 2 * (objective.estimated_graph_bytes or 0)
    budget = objective.memory_budget or available_bytes(objective.device) / 2
    return need <= budget


FAST_FLOAT64 = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}
"""CUDA compute capabilities with float64 at half the float32 rate (P100, V100, A100, H100,
B200); other GPUs run float64 at 1/32 or 1/64 of it."""


def _fast_float64(device: torch.device) -> bool:
    """Whether float64 products cost a small multiple of float32 ones on ``device``."""
    if device.type != "cuda":
        return device.type == "cpu"
    return tuple(torch.cuda.get_device_capability(device)) in FAST_FLOAT64


def _float64_recheck(op: Operator, out: EigshOutput, tol: float, which: Which) -> Finished:
    objective = op.objective
    cert = out.certificate
    assert objective is not None and cert is not None
    copy = objective._copy_in_dtype(F64)
    point = op.point.to(F64)
    u = out.eigenvectors.to(F64)
    products = torch.stack([copy.hvp(row, at=point) for row in u])
    values, residuals = rayleigh(u, products)
    distance = spread(products, cert.products.to(F64))  # both in the output's order
    eps32, eps64 = torch.finfo(op.dtype).eps, torch.finfo(F64).eps
    delta = allowance(eps64, values, cert.neighbours, distance * eps64 / eps32, op.n, products)
    neighbours = cert.neighbours.widened(cert.delta + ROUNDING_FACTOR * distance)
    checked = bound(values, residuals, products, delta, neighbours, tol)
    rank = order(checked.values, which)
    new = dataclasses.replace(
        out,
        eigenvalues=checked.values[rank],
        eigenvectors=out.eigenvectors[rank],
        residuals=checked.residuals[rank],
        error_bounds=checked.bounds[rank],
        converged=checked.converged[rank],
        rounding=delta,
        certificate=checked,
    )
    del copy
    return Finished(new, "certified", u.shape[0])


UNRELIABLE = 0.1
"""A difference-product error estimate above this fraction of |lambda| is reported."""


def _with_difference_error(op: Operator, out: EigshOutput, tol: float, which: Which) -> Finished:
    objective, cert = op.objective, out.certificate
    assert objective is not None and cert is not None
    error = objective.difference_error(out.eigenvectors[0], cert.products[0], at=op.point)
    widened = rebound(cert, cert.delta + error, tol, kind="estimate")
    rank = order(widened.values, which)
    new = dataclasses.replace(
        out,
        error_bounds=widened.bounds[rank],
        converged=widened.converged[rank],
        rounding=widened.delta,
        certificate=widened,
    )
    note = f"difference products: error estimate {error:.2e} (Richardson, steps h and 1.73 h)"
    scale = float(new.eigenvalues.abs().max()) if new.eigenvalues.numel() else 0.0
    if error > UNRELIABLE * scale:
        note += "; unreliable: larger than a tenth of the eigenvalues"
        warnings.warn(
            f"difference products are unreliable here: their error estimate {error:.3g} "
            f"exceeds a tenth of |lambda| = {scale:.3g} (the loss is far from quadratic over "
            "the step, even after it was re-checked along the top Ritz vector); the "
            "eigenvalues may be "
            "wrong by more than their bounds. Use hvp_method='double_backward' where "
            "autograd can take second derivatives",
            RuntimeWarning,
            stacklevel=5,
        )
    return Finished(new, "estimate", 0, note)


def finish_certificate(
    op: Operator, out: EigshOutput, *, tol: float, which: Which, certify: bool | None
) -> Finished:
    """The bound's kind, re-evaluating in float64 where that makes it certified.

    Args:
        op: The operator Lanczos ran on.
        out: Its output (with the certificate).
        tol: The tolerance asked for.
        which: The order of the output.
        certify: ``None``: re-evaluate in float64 when the objective is below float64, a
            float64 copy fits and float64 is fast on the device (the CPU, datacenter GPUs);
            ``True``: always (an error when impossible); ``False``: never (the bound of a
            below-float64 objective is then an estimate).
    """
    objective = op.objective
    if out.certificate is None:
        return Finished(out, "estimate")
    if objective is not None and objective.uses_differences:
        if certify:
            raise ValueError(
                "certify=True: difference products have no exact float64 counterpart here "
                f"({objective.hvp_note or 'hvp_method=finite_difference'}); their bound is "
                "an estimate"
            )
        return _with_difference_error(op, out, tol, which)
    if op.dtype == F64:
        return Finished(out, "certified")
    reason = ""
    if objective is None:
        reason = f"a {op.dtype} operator without an Objective cannot be re-evaluated in float64"
    elif certify is False:
        reason = "certify=False: float32 products, their systematic rounding not covered"
    elif objective.layout is not None:
        reason = "a sharded model is not copied to float64"
    elif certify is None and not _room_for_copy(objective, out.eigenvectors.shape[0]):
        reason = "no memory for a float64 copy of the model"
    elif certify is None and not _fast_float64(op.device):
        reason = f"float64 is slow on {op.device} (pass certify=True to re-evaluate anyway)"
    if reason:
        if certify:
            raise ValueError(f"certify=True: {reason}")
        return Finished(out, "estimate", 0, reason)
    try:
        return _float64_recheck(op, out, tol, which)
    except (RuntimeError, TypeError, ValueError) as err:
        if certify:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return Finished(out, "estimate", 0, f"the float64 re-evaluation failed: {first[:160]}")


MAX_STEP_REFINEMENTS = 3
"""Lanczos runs redone with a shorter difference step, at most."""


def _lanczos(op: Operator, v0: Tensor, k: int, **kwargs: Any) -> EigshOutput:
    """:func:`~flatlens.measures.lanczos_eigsh`; with difference products and no
    ``rounding`` given, their relative error as the step's walk measured it is passed as
    the operator's rounding (about 1e-4 in float32), so Lanczos stops where they stop
    resolving instead of spending its budget there."""
    objective = op.objective
    if kwargs.get("rounding") is None and objective is not None:
        kwargs = {**kwargs, "rounding": objective.difference_rounding(v0, at=op.point)}
    return lanczos_eigsh(op, v0, k, **kwargs)


def _with_checked_step(
    op: Operator, out: EigshOutput, k: int, caught: list, begin: int, **kwargs: Any
) -> EigshOutput:
    """Difference products: check the step along the top Ritz vector and, while a shorter
    step is clearly better there, run Lanczos again with it.

    The step was chosen along the first vector, where the loss may be far flatter than
    along the top eigenvectors (GPT-2 small: a step right for a random direction makes the
    products along the sharpest one 100 times too small, and Lanczos never finds it).
    Along the top Ritz vector u the Richardson estimate ||D_rh(u) - D_h(u)|| is taken (the
    bound needs it anyway); above half the tolerance the step walks down, and when a
    shorter step's products agree far better, Lanczos restarts from the k Ritz vectors with
    it (the warnings ``caught`` from the runs before are dropped). Nothing happens for
    exact products. The reruns share ``max_matvecs`` with the first run, which started
    at the operator's count ``begin``."""
    objective = op.objective
    if objective is None or not objective.uses_differences:
        return out
    tol = kwargs.get("tol", 1e-4)
    budget = kwargs.get("max_matvecs")
    for _ in range(MAX_STEP_REFINEMENTS):
        cert = out.certificate
        if cert is None or (budget is not None and budget - (op.count - begin) < 2 * k + 1):
            break
        scale = float(cert.values.abs().max())
        target = 0.5 * tol * scale
        refined = objective.refine_difference_step(
            out.eigenvectors[0], cert.products[0], target, at=op.point
        )
        if not refined.changed:
            break
        remaining = None if budget is None else budget - (op.count - begin)
        caught.clear()
        out = _lanczos(op, out.eigenvectors.sum(0), k, **{**kwargs, "max_matvecs": remaining})
    return out


def certified_lanczos(
    op: Operator, v0: Tensor, k: int, *, certify: bool | None, **kwargs: Any
) -> Finished:
    """:func:`~flatlens.measures.lanczos_eigsh` (``kwargs`` are its settings; with
    difference products, again with a shorter step while :func:`_with_checked_step` finds
    one), then :func:`finish_certificate`. A warning that the rounding of the products
    keeps the bound above tol is passed on only when the final bound still misses tol (a
    float64 re-evaluation often meets it)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        begin = op.count
        out = _lanczos(op, v0, k, **kwargs)
        out = _with_checked_step(op, out, k, caught, begin, **kwargs)
    which, tol = kwargs.get("which", "LA"), kwargs.get("tol", 1e-4)
    done = finish_certificate(op, out, tol=tol, which=which, certify=certify)
    for w in caught:
        if not bool(done.output.converged.all()) or not issubclass(w.category, RuntimeWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return done
