"""flatlens.optim.GAM against its formulas, rebuilt here on flat float64 vectors.

* ``GAM.from_official`` against the update of the authors' released code (xxgege/GAM,
  ``gam/gam.py``), re-derived step by step from that file's operations;
* the accelerated algorithm in the paper's form (h- = beta g0 + (1 - beta) g2);
* the exact mode against dense Hessians, on a quadratic and on a small network.
"""

from __future__ import annotations

import pytest
import torch
from helpers import Quadratic, classification_data, rel_err, symmetric_with_spectrum, tiny_mlp
from optim_ref import FlatProblem, base_step_with, flat, make_closure, unit

from flatlens.optim import GAM

EPS = 1e-12


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def norm(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(v)


# ------------------------------------------------------------------ the released code's update
def official_direction(problem, theta, *, grad_rho, grad_norm_rho, b0, b1, gamma, adaptive):
    """gam/gam.py's step, operation by operation, on one flat vector ``w``.

    perturb_weights(0) -> get_grad -> unperturb('e_w_0') -> grad_norm_ascent -> get_grad ->
    perturb_weights(1) -> get_grad -> gradient_decompose, with grad_beta_2 = 1 - b0 and
    grad_beta_3 = 1 - b1 as main_cifar.py sets them.
    """
    b2, b3 = 1 - b0, 1 - b1

    def grad_norm(g, w):
        return norm(g * w.abs()) if adaptive else norm(g)

    def perturbation(g, w, radius):
        e = g * (radius / (grad_norm(g, w) + EPS))
        return e * w**2 if adaptive else e

    w = theta.clone()
    g0 = problem.grad(w)
    e_w_0 = perturbation(g0, w, grad_rho)
    w = w + e_w_0
    g1 = problem.grad(w)
    w = w - e_w_0
    e_w_1_2 = perturbation(g1 - g0, w, grad_norm_rho)
    w = w + e_w_1_2
    g2 = problem.grad(w)
    e_w = perturbation(g2, w, grad_rho)
    w = w + e_w
    g3 = problem.grad(w)

    pro_m = g0 + abs(b2) * g2
    grad = b1 * g1 + b3 * g3
    inner_prod = torch.sum(pro_m * grad)
    new_grad_norm, old_grad_norm = norm(grad), norm(pro_m)
    cosine = inner_prod / (new_grad_norm * old_grad_norm + EPS)
    vertical = pro_m - cosine * old_grad_norm * grad / (new_grad_norm + EPS)
    return grad - gamma * vertical


SETTINGS = {
    # main_cifar.py: CIFAR-10 ResNet, CIFAR-100 ResNet; then beta_0 > 1, where |1 - beta_0|
    # differs from 1 - beta_0, and the adaptive variant.
    "cifar10": dict(grad_rho=0.03, grad_norm_rho=0.2, b0=0.1, b1=0.1, gamma=0.05, adaptive=False),
    "cifar100": dict(grad_rho=0.02, grad_norm_rho=0.2, b0=0.5, b1=0.6, gamma=0.03, adaptive=False),
    "beta0>1": dict(grad_rho=0.1, grad_norm_rho=0.5, b0=1.7, b1=0.3, gamma=0.4, adaptive=False),
    "adaptive": dict(grad_rho=0.2, grad_norm_rho=0.6, b0=0.3, b1=0.5, gamma=0.1, adaptive=True),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_from_official_step_equals_released_code(name):
    s = SETTINGS[name]
    model = tiny_mlp(seed=3)
    x, y = classification_data(seed=3)
    problem = FlatProblem(model, x, y)
    theta = flat(model)
    direction = official_direction(problem, theta, **s)
    expected = base_step_with(model, direction, sgd)

    optimizer = GAM.from_official(
        model.parameters(),
        sgd(model.parameters()),
        model=model,
        grad_rho=s["grad_rho"],
        grad_norm_rho=s["grad_norm_rho"],
        grad_beta_0=s["b0"],
        grad_beta_1=s["b1"],
        grad_gamma=s["gamma"],
        adaptive=s["adaptive"],
    )
    loss = optimizer.step(make_closure(optimizer, model, x, y))

    assert (flat(model) - expected).abs().max() < 1e-10
    assert rel_err(flat(model) - theta, expected - theta) < 1e-10
    assert float(loss) == pytest.approx(float(problem.loss(theta)), rel=1e-14)


def test_paper_form_differs_from_released_code_only_in_h_minus():
    model = tiny_mlp(seed=4)
    x, y = classification_data(seed=4)
    problem = FlatProblem(model, x, y)
    theta = flat(model)
    rho_p, rho, alpha, beta, gamma = 0.05, 0.3, 0.4, 0.3, 0.5

    g0 = problem.grad(theta)
    g1 = problem.grad(theta + rho_p * unit(g0))
    theta_adv = theta + rho * unit(g1 - g0)
    g2 = problem.grad(theta_adv)
    g3 = problem.grad(theta_adv + rho_p * unit(g2))
    h_plus = alpha * g1 + (1 - alpha) * g3
    h_minus = beta * g0 + (1 - beta) * g2
    parallel = (h_minus @ h_plus) / (h_plus @ h_plus) * h_plus
    direction = h_plus - gamma * (h_minus - parallel)
    expected = base_step_with(model, direction, sgd)

    optimizer = GAM(
        model.parameters(),
        sgd(model.parameters()),
        rho=rho,
        perturb_rho=rho_p,
        plus_weight=alpha,
        minus_weight=beta,
        orthogonal_weight=gamma,
    )
    optimizer.step(make_closure(optimizer, model, x, y))
    assert rel_err(flat(model) - theta, expected - theta) < 1e-10


# ------------------------------------------------------------------ exact mode
class _QuadraticLoss:
    """L(theta) = 0.5 theta^T A theta + b^T theta: gradient A theta + b, Hessian A."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.a, _ = symmetric_with_spectrum(torch.linspace(-1.0, 4.0, n), seed=seed)
        self.b = torch.randn(
            n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64
        )

    def __call__(self, out: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
        return 0.5 * out @ (self.a @ out) + self.b @ out


@pytest.mark.parametrize("perturb_rho", [0.0, 0.1])
def test_exact_mode_on_a_quadratic_equals_the_dense_formula(perturb_rho):
    n, rho, weight, lr = 6, 0.3, 0.7, 0.1
    model = Quadratic(n, seed=5)
    loss_fn = _QuadraticLoss(n, seed=5)
    a, b = loss_fn.a, loss_fn.b
    theta = model.theta.detach().clone()

    g = a @ theta + b
    f = a @ g / norm(g)
    theta_adv = theta + rho * f / norm(f)
    g_adv = a @ theta_adv + b
    h_norm = rho * a @ g_adv / norm(g_adv)
    h_loss = a @ (theta + perturb_rho * g / norm(g)) + b if perturb_rho else g
    expected = theta - lr * (h_loss + weight * h_norm)

    optimizer = GAM(
        model.parameters(),
        torch.optim.SGD(model.parameters(), lr=lr),
        mode="exact",
        rho=rho,
        perturb_rho=perturb_rho,
        flatness_weight=weight,
    )
    x, y = torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    optimizer.step(make_closure(optimizer, model, x, y, loss_fn))
    assert rel_err(model.theta.detach(), expected) < 1e-12


def test_exact_mode_on_a_network_uses_the_hessians_at_theta_and_theta_adv():
    model = tiny_mlp(seed=6)
    x, y = classification_data(seed=6)
    problem = FlatProblem(model, x, y)
    theta, rho, weight = flat(model), 0.4, 0.5

    g = problem.grad(theta)
    f = problem.hessian(theta) @ unit(g)
    theta_adv = theta + rho * unit(f)
    g_adv = problem.grad(theta_adv)
    h_norm = rho * problem.hessian(theta_adv) @ unit(g_adv)
    expected = base_step_with(model, g + weight * h_norm, sgd)

    optimizer = GAM(
        model.parameters(),
        sgd(model.parameters()),
        mode="exact",
        rho=rho,
        flatness_weight=weight,
    )
    optimizer.step(make_closure(optimizer, model, x, y))
    assert rel_err(flat(model) - theta, expected - theta) < 1e-10
    for p in model.parameters():  # no graph is left on the gradients
        assert not p.grad.requires_grad


def test_exact_mode_needs_a_closure_that_takes_create_graph():
    model = tiny_mlp()
    x, y = classification_data()
    optimizer = GAM(model.parameters(), torch.optim.SGD, lr=0.1, mode="exact")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    before = flat(model)
    with pytest.raises(TypeError, match="create_graph"):
        optimizer.step(closure)
    assert torch.equal(flat(model), before)
