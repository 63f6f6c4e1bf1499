"""Critical sharpness: the curvature the optimizer's own step sees, from forward passes only.

With Δ the optimizer's update direction (the step before the learning rate is applied: the
gradient for SGD, the momentum buffer with momentum, Adam's preconditioned moment), the
critical step size and the critical sharpness are (Kalra et al., 2026)::

    η_c = min{η > 0 : L(θ − η Δ) > L(θ)},        λ_c = 2 / η_c.

Under a quadratic model L(θ − ηΔ) = L(θ) − η Δᵀg + η²/2 ΔᵀHΔ, so η_c = 2 Δᵀg / ΔᵀHΔ and
λ_c = ΔᵀHΔ / Δᵀg: the curvature along the update, measured in the units of 2/η in which
gradient descent is stable (λ_c < 2/η). It needs no Hessian-vector product: η_c is
bracketed by an exponential search from a first guess (the last η_c during training), then
narrowed by safeguarded secant steps (exact for a quadratic) and geometric bisections until
the bracket's relative width is at most ``bracket_width``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flatlens.core._checks import check_positive, check_positive_int
from flatlens.core._errors import NonFiniteLossError
from flatlens.core._memory import tracks_peak_memory
from flatlens.core._objective import Objective
from flatlens.core._results import MeasureResult

__all__ = ["CriticalSharpnessResult", "critical_sharpness"]

_WARM_FACTOR = 2.0**0.25
"""First expansion factor from a given first guess: within ±19% of the last η_c the bracket
is found with two losses and closed to 1/16 with two bisections."""
_COLD_FACTOR = 2.0


@dataclass
class CriticalSharpnessResult(MeasureResult):
    """The critical sharpness λ_c = 2 / η_c along a direction Δ.

    Attributes:
        value: λ_c = 2 / η_c with η_c the geometric center of the final bracket; ``inf``
            when the loss rises for every step it resolves (Δ is not a descent direction:
            the last step without a rise left the loss unchanged to the last bit), 0 when it
            never rises up to the largest step tried.
        eta: The critical step η_c = 2 / value.
        eta_lower: The largest step tried with L(θ − ηΔ) <= L(θ) (0 if none).
        eta_upper: The smallest step tried with L(θ − ηΔ) > L(θ) (``inf`` if none).
        lower, upper: The bracket of λ_c: 2 / eta_upper and 2 / eta_lower.
        loss: L(θ).
        num_forward: Losses evaluated (forward passes over the data), L(θ) included.
        converged: Whether the bracket met ``bracket_width`` within ``max_evals``.
        bracket_width: The relative width asked for: eta_upper / eta_lower − 1 at most.
        eta_start: The first step tried.
        direction_norm: ||Δ||.
    """

    value: float
    eta: float
    eta_lower: float
    eta_upper: float
    lower: float
    upper: float
    loss: float
    num_forward: int
    converged: bool
    bracket_width: float
    eta_start: float
    direction_norm: float


@tracks_peak_memory
def critical_sharpness(
    objective: Objective,
    direction: Tensor,
    *,
    eta_start: float | None = None,
    bracket_width: float = 1 / 16,
    max_evals: int = 64,
    at: Tensor | None = None,
) -> CriticalSharpnessResult:
    """λ_c = 2 / η_c with η_c = min{η > 0 : L(θ − ηΔ) > L(θ)}, Δ = ``direction``.

    An exponential search from ``eta_start`` brackets η_c between a step at which the loss
    has not risen and one at which it has (each miss squares the search factor, so a guess
    off by a factor F costs about log2 log2 F extra losses). The bracket is then narrowed
    until eta_upper / eta_lower − 1 <= ``bracket_width``: secant steps on h(η) = (L(θ − ηΔ)
    − L(θ)) / η, which is linear in η under a quadratic model (the first step lands on η_c
    and one more closes the bracket), kept inside it, with a geometric bisection whenever
    two steps did not halve it. Under a quadratic model λ_c = ΔᵀHΔ / Δᵀg, which then lies
    in [``lower``, ``upper``]. Only losses are evaluated, one forward pass over the
    objective's data each: L(θ), two or three to bracket from a guess within a factor 3,
    two to narrow on a near-quadratic loss. A non-finite loss counts as a rise.

    Args:
        objective: The empirical risk L (use eval mode for a fixed, deterministic L).
        direction: Δ, a flat tensor of num_params: the optimizer's update before the
            learning rate is applied (the step is −ηΔ).
        eta_start: The first step tried, > 0 (during training: the last η_c). Default
            1 / ||Δ||, a step of length one.
        bracket_width: Relative width of the final bracket of η_c, > 0 (1/16).
        max_evals: Cap on the losses evaluated, >= 3.
        at: The point θ (default: the model's parameters).

    Returns:
        A :class:`CriticalSharpnessResult`. The model is left exactly as it was.

    Raises:
        ValueError: a direction of the wrong size, zero or not finite; bad settings.
    """
    bracket_width = check_positive("bracket_width", bracket_width)
    max_evals = check_positive_int("max_evals", max_evals, 3)
    theta = objective.point(at)
    if not isinstance(direction, Tensor) or direction.dim() != 1:
        raise ValueError("direction must be a flat (1-D) tensor of the parameters' size")
    if direction.numel() != theta.numel():
        raise ValueError(
            f"direction has {direction.numel()} entries, the parameters {theta.numel()}"
        )
    d = direction.detach().to(theta.device, theta.dtype)
    norm = float(torch.linalg.vector_norm(d.double()))
    if not math.isfinite(norm) or norm == 0:
        raise ValueError(f"direction must be finite and nonzero (its norm is {norm})")
    if eta_start is None:
        eta_start, factor = 1.0 / norm, _COLD_FACTOR
    else:
        eta_start, factor = check_positive("eta_start", eta_start), _WARM_FACTOR

    base = objective.loss(at=theta)
    count = 1

    def loss(eta: float) -> float:
        nonlocal count
        count += 1
        try:
            value = objective.loss(at=theta - eta * d)
        except NonFiniteLossError:  # so far along Δ that the loss overflows: a rise
            return math.inf
        return value if math.isfinite(value) else math.inf

    # exponential search: (lo, f_lo) with L <= L(θ), (hi, f_hi) with L > L(θ)
    lo, hi, f_lo, f_hi = 0.0, math.inf, base, math.inf
    eta = eta_start
    tiny, huge = eta_start * 2.0**-200, eta_start * 2.0**200
    while count < max_evals and (lo == 0.0 or hi == math.inf):
        value = loss(eta)
        if value > base:
            hi, f_hi = eta, value
            if lo > 0.0 or eta < tiny:
                break
            eta = eta / factor
        else:
            lo, f_lo = eta, value
            if hi < math.inf or eta > huge:
                break
            eta = eta * factor
        factor = factor * factor
    # refinement: secant steps on h(η) = (L(θ − ηΔ) − L(θ)) / η, which is linear in η for a
    # quadratic (so its root is η_c at once), kept a factor sqrt(1 + width) inside the
    # bracket, with a geometric bisection whenever two steps did not halve it (log scale)
    margin = math.sqrt(1.0 + bracket_width)
    history: list[float] = []
    # a loss that has not changed at all at lo: the rise starts below the loss' resolution
    unresolved = lo > 0.0 and f_lo == base and hi < math.inf
    while (
        not unresolved
        and lo > 0.0
        and hi < math.inf
        and hi / lo - 1 > bracket_width
        and count < max_evals
    ):
        width = math.log(hi / lo)
        stalled = len(history) >= 2 and width > 0.5 * history[-2]
        h_lo, h_hi = (f_lo - base) / lo, (f_hi - base) / hi
        if stalled or not math.isfinite(h_hi) or h_hi <= h_lo:
            eta = math.sqrt(lo * hi)
        else:
            eta = lo + h_lo / (h_lo - h_hi) * (hi - lo)
            eta = min(max(eta, lo * margin), hi / margin)
        history.append(width)
        value = loss(eta)
        if value > base:
            hi, f_hi = eta, value
        else:
            lo, f_lo = eta, value
    found = lo > 0.0 and hi < math.inf and not unresolved
    if found:
        eta_c = math.sqrt(lo * hi)
    else:  # the loss rose at every step it resolves (η_c -> 0), or at none (η_c -> inf)
        eta_c = 0.0 if hi < math.inf else math.inf
    value = 2.0 / eta_c if eta_c > 0 else math.inf
    return CriticalSharpnessResult(
        value=value,
        eta=eta_c,
        eta_lower=lo,
        eta_upper=hi,
        lower=2.0 / hi,
        upper=2.0 / lo if lo > 0 else math.inf,
        loss=base,
        num_forward=count,
        converged=bool(found and hi / lo - 1 <= bracket_width),
        bracket_width=bracket_width,
        eta_start=eta_start,
        direction_norm=norm,
    )
