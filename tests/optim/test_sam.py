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


# ------------------------------------------------------------------ davda54/sam's two calls
def _bn_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()


@pytest.mark.parametrize(("adaptive", "bn_first_pass"), [(False, False), (True, True)])
def test_davda54_readme_loop_runs_unchanged_and_matches_step_closure(adaptive, bn_first_pass):
    """The training loop of davda54/sam's README, verbatim (first case), against flatlens'
    step(closure); with ``model=`` BatchNorm statistics come from the first pass in both."""
    gen = torch.Generator().manual_seed(3)
    data = [
        (torch.randn(12, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (12,)))
        for _ in range(4)
    ]
    loss_function = torch.nn.functional.cross_entropy

    def readme(model):
        base_optimizer = torch.optim.SGD  # define an optimizer for the "sharpness-aware" update
        extra = {"adaptive": True, "model": model} if bn_first_pass else {}
        optimizer = SAM(model.parameters(), base_optimizer, lr=0.1, momentum=0.9, **extra)
        for input, output in data:
            # first forward-backward pass
            loss = loss_function(model(input), output)  # use this loss for any training statistics
            loss.backward()
            optimizer.first_step(zero_grad=True)

            # second forward-backward pass
            loss_function(model(input), output).backward()  # make sure to do a full forward pass
            optimizer.second_step(zero_grad=True)

    def closure_form(model):
        extra = {"model": model} if bn_first_pass else {}
        optimizer = SAM(
            model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, adaptive=adaptive, **extra
        )
        for inputs, targets in data:

            def closure(inputs=inputs, targets=targets):
                optimizer.zero_grad()
                loss = loss_function(model(inputs), targets)
                loss.backward()
                return loss

            optimizer.step(closure)

    a, b = _bn_net(0), _bn_net(0)
    readme(a)
    closure_form(b)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert float((pa.double() - pb.double()).abs().max()) <= 1e-7, name
    assert any(float(p.abs().max()) > 0 for p in a.state_dict().values())


def test_first_and_second_step_guard_their_order():
    model, x, y, _ = setup()
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="without first_step"):
        optimizer.second_step()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    theta = flat(model).clone()
    optimizer.first_step()
    assert not torch.equal(flat(model), theta)  # at theta + e
    with pytest.raises(RuntimeError, match="twice"):
        optimizer.first_step()
    optimizer.second_step(zero_grad=True)
    assert all(p.grad is None for p in model.parameters())
