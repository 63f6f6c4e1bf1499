"""flatlens.optim.SAM: one step against the closed form, in float64."""

from __future__ import annotations

import pytest
import torch
from helpers import classification_data, rel_err, tiny_mlp
from optim_ref import FlatProblem, base_step_with, flat, make_closure, unit

from flatlens.optim import SAM

LR = 0.1


def sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=1e-3)


def setup(seed: int = 0):
    model = tiny_mlp(seed=seed)
    x, y = classification_data(seed=seed)
    return model, x, y, FlatProblem(model, x, y)


@pytest.mark.parametrize("rho", [0.0, 0.05, 0.5])
def test_one_step_equals_closed_form(rho):
    model, x, y, problem = setup()
    theta = flat(model)
    g = problem.grad(theta)
    direction = problem.grad(theta + rho * g / g.norm())
    expected = base_step_with(model, direction, sgd)

    optimizer = SAM(model.parameters(), sgd(model.parameters()), rho=rho)
    loss = optimizer.step(make_closure(optimizer, model, x, y))

    assert rel_err(flat(model), expected) < 1e-12
    assert float(loss) == pytest.approx(float(problem.loss(theta)), rel=1e-14)
    assert not loss.requires_grad


def test_adaptive_step_equals_closed_form():
    model, x, y, problem = setup(1)
    theta, rho = flat(model), 0.3
    g = problem.grad(theta)
    e = rho * theta**2 * g / torch.linalg.vector_norm(theta.abs() * g)
    expected = base_step_with(model, problem.grad(theta + e), sgd)

    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=True, **_sgd_kw())
    optimizer.step(make_closure(optimizer, model, x, y))
    assert rel_err(flat(model), expected) < 1e-12


def _sgd_kw():
    return {"lr": LR, "momentum": 0.9, "weight_decay": 1e-3}


def test_base_optimizer_class_and_instance_give_the_same_step():
    results = []
    for use_class in (True, False):
        model, x, y, _ = setup()
        if use_class:
            optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.1, **_sgd_kw())
        else:
            optimizer = SAM(model.parameters(), sgd(model.parameters()), rho=0.1)
        for _ in range(3):
            optimizer.step(make_closure(optimizer, model, x, y))
        results.append(flat(model))
    assert torch.equal(results[0], results[1])


def test_adamw_base_and_several_param_groups():
    model, x, y, problem = setup(2)
    theta, rho = flat(model), 0.2
    g = problem.grad(theta)
    direction = problem.grad(theta + rho * unit(g))
    lrs = (0.01, 0.003)

    def adamw(params):
        return torch.optim.AdamW(
            [{"params": params[:2], "lr": lrs[0]}, {"params": params[2:], "lr": lrs[1]}],
            weight_decay=0.05,
        )

    expected = base_step_with(model, direction, adamw)
    params = list(model.parameters())
    groups = [{"params": params[:2], "lr": lrs[0]}, {"params": params[2:], "lr": lrs[1]}]
    optimizer = SAM(groups, torch.optim.AdamW, rho=rho, weight_decay=0.05)
    assert len(optimizer.param_groups) == 2
    optimizer.step(make_closure(optimizer, model, x, y))
    assert rel_err(flat(model), expected) < 1e-12


def test_first_pass_loss_is_returned_and_closure_runs_twice():
    model, x, y, problem = setup()
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=LR, rho=0.1)
    calls = []
    inner = make_closure(optimizer, model, x, y)

    def closure():
        calls.append(flat(model))
        return inner()

    loss = optimizer.step(closure)
    assert len(calls) == 2
    assert torch.equal(calls[0], flat(problem.model))
    assert float(loss) == pytest.approx(float(problem.loss(calls[0])), rel=1e-14)


def test_unused_parameters_keep_no_gradient():
    model, x, y, _ = setup()
    extra = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    params = [*model.parameters(), extra]
    optimizer = SAM(params, torch.optim.SGD, lr=LR, rho=0.1, weight_decay=0.1)
    optimizer.step(make_closure(optimizer, model, x, y))
    assert extra.grad is None
    assert torch.equal(extra, torch.ones(3, dtype=torch.float64))  # no weight decay either
