"""GAM's exact mode with difference products (``hvp_method="finite_difference"``): the same
step as with double backward, to the differences' accuracy, from plain closures."""

from __future__ import annotations

import pytest
import torch
from helpers import classification_data, rel_err, tiny_mlp
from optim_ref import FlatProblem, base_step_with, flat, make_closure, unit

from flatlens.optim import GAM


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


@pytest.mark.parametrize("perturb_rho", [0.0, 0.05])
def test_exact_mode_with_differences_equals_the_dense_formula(perturb_rho):
    model = tiny_mlp(seed=6)
    x, y = classification_data(seed=6)
    problem = FlatProblem(model, x, y)
    theta, rho, weight = flat(model), 0.4, 0.5

    g = problem.grad(theta)
    f = problem.hessian(theta) @ unit(g)
    theta_adv = theta + rho * unit(f)
    g_adv = problem.grad(theta_adv)
    h_norm = rho * problem.hessian(theta_adv) @ unit(g_adv)
    h_loss = problem.grad(theta + perturb_rho * unit(g)) if perturb_rho else g
    expected = base_step_with(model, h_loss + weight * h_norm, sgd)

    optimizer = GAM(
        model.parameters(),
        sgd(model.parameters()),
        mode="exact",
        rho=rho,
        perturb_rho=perturb_rho,
        flatness_weight=weight,
        hvp_method="finite_difference",
    )

    def closure():  # no create_graph needed
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    assert rel_err(flat(model) - theta, expected - theta) < 1e-6


def test_difference_products_are_for_the_exact_mode():
    model = tiny_mlp()
    with pytest.raises(ValueError, match="mode='exact'"):
        GAM(model.parameters(), torch.optim.SGD, lr=0.1, hvp_method="finite_difference")
    with pytest.raises(ValueError, match="hvp_method must be"):
        GAM(model.parameters(), torch.optim.SGD, lr=0.1, mode="exact", hvp_method="jvp")
    x, y = classification_data()
    exact = GAM(model.parameters(), torch.optim.SGD, lr=0.1, mode="exact")
    exact.step(make_closure(exact, model, x, y))  # double backward still the default
