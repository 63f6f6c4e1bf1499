"""The critical sharpness λ_c = 2 / η_c: against ΔᵀHΔ / Δᵀg on quadratics, against a
brute-force line search on a small network, its cost in forward passes, and its errors."""

from __future__ import annotations

import pytest
import torch
from helpers import ModelSnapshot, tanh_classifier
from torch import nn

from flatlens import Objective, critical_sharpness


class _Quadratic(nn.Module):
    def __init__(self, n: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w


def _quadratic(n: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 100)
    q = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = q @ q.T + 0.1 * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    model = _Quadratic(n, seed)
    obj = Objective(
        model, lambda w, _y: 0.5 * w @ a @ w - b @ w, [(torch.zeros(1), torch.zeros(1))]
    )
    return obj, a, g


@pytest.mark.parametrize("seed", range(5))
def test_on_a_quadratic_the_bracket_holds_the_curvature_along_the_update(seed):
    obj, a, g = _quadratic(seed=seed)
    grad = obj.gradient()
    # an update direction with a descent component: momentum-like noise around g
    direction = grad + 0.5 * grad.norm() * torch.randn(grad.shape, generator=g, dtype=grad.dtype)
    if direction @ grad <= 0:
        direction = -direction

    def inside(r):  # the bracket holds the exact value (rounding: the secant lands on it)
        return r.lower * (1 - 1e-9) <= exact <= r.upper * (1 + 1e-9)

    exact = float(direction @ a @ direction / (direction @ grad))
    result = critical_sharpness(obj, direction)
    assert result.converged
    assert inside(result)
    assert result.eta_upper / result.eta_lower - 1 <= 1 / 16
    assert result.value == pytest.approx(exact, rel=1 / 16)
    assert result.eta == pytest.approx(2 / result.value)
    assert result.loss == pytest.approx(obj.loss())
    # warm start from a nearby η_c: at most 8 forward passes (L(θ) included)
    warm = critical_sharpness(obj, direction, eta_start=1.1 * 2 / exact)
    assert inside(warm) and warm.num_forward <= 6
    far = critical_sharpness(obj, direction, eta_start=3.0 * 2 / exact)
    assert inside(far) and far.num_forward <= 8


def test_a_tighter_bracket_is_a_closer_value():
    obj, a, _ = _quadratic(seed=9)
    d = obj.gradient()
    exact = float(d @ a @ d / (d @ d))
    fine = critical_sharpness(obj, d, bracket_width=1e-6)
    assert fine.value == pytest.approx(exact, rel=1e-6)
    assert fine.lower * (1 - 1e-9) <= exact <= fine.upper * (1 + 1e-9)


def test_agrees_with_a_brute_force_line_search_on_a_small_network():
    torch.manual_seed(0)
    model = tanh_classifier(4, 3, hidden=6).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    obj = Objective(model, nn.CrossEntropyLoss(), [(x, y)])
    snapshot = ModelSnapshot.take(model)
    direction = obj.gradient()
    result = critical_sharpness(obj, direction)
    snapshot.assert_unchanged(model)
    theta, base = obj.theta, obj.loss()
    # the smallest step on a fine geometric grid at which the loss has risen
    etas = torch.logspace(-4, 3, 20000, dtype=torch.float64).tolist()
    points = torch.stack([theta - eta * direction for eta in etas])
    losses = obj.evaluate_points(points)["loss"]
    first = next(eta for eta, value in zip(etas, losses.tolist(), strict=True) if value > base)
    step = etas[1] / etas[0]
    assert result.eta_lower <= first * step and first <= result.eta_upper * step
    assert 2 / first == pytest.approx(result.value, rel=1 / 16)


def test_non_descent_and_flat_directions():
    obj, _, _ = _quadratic(seed=2)
    up = -obj.gradient()  # the loss rises at every step along -(-g)
    rising = critical_sharpness(obj, up, max_evals=20)
    # η_c -> 0: λ_c infinite, or beyond 1e10 where rounding leaves L unchanged
    assert rising.value > 1e10 and not rising.converged and rising.num_forward <= 20

    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, dtype=torch.float64))

        def forward(self, x):
            return self.w

    flat = Objective(Linear(), lambda w, _y: -w.sum(), [(torch.zeros(1), torch.zeros(1))])
    never = critical_sharpness(flat, flat.gradient(), max_evals=30)
    assert never.value == 0.0 and not never.converged


def test_bad_input_is_a_clear_error():
    obj, _, _ = _quadratic()
    with pytest.raises(ValueError, match="nonzero"):
        critical_sharpness(obj, torch.zeros(obj.num_params, dtype=torch.float64))
    with pytest.raises(ValueError, match="entries"):
        critical_sharpness(obj, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="bracket_width"):
        critical_sharpness(obj, obj.gradient(), bracket_width=0)
    with pytest.raises(ValueError, match="eta_start"):
        critical_sharpness(obj, obj.gradient(), eta_start=-1.0)
    d = critical_sharpness(obj, obj.gradient()).to_dict()
    assert d["kind"] == "CriticalSharpnessResult" and d["num_forward"] >= 3
