"""Issue 23, the optimizer rows: SAM and GAM copy and pickle (7), GAM's exact mode refuses a
closure that builds no graph (8), a step never leaves non-finite parameters silently (9),
and a state dict of another optimizer is refused (14)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers import bn_cnn, classification_data, image_data, tiny_mlp
from optim_ref import flat, make_closure

from flatlens.core import NonFiniteLossError
from flatlens.optim import GAM, SAM

BUILDERS = {
    "sam": lambda m, **kw: SAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **kw),
    "sam-adaptive": lambda m, **kw: SAM(
        m.parameters(), torch.optim.SGD, lr=0.1, adaptive=True, **kw
    ),
    "gam": lambda m, **kw: GAM(m.parameters(), torch.optim.AdamW, lr=0.01, **kw),
    "gam-exact": lambda m, **kw: GAM(
        m.parameters(), torch.optim.SGD, lr=0.1, mode="exact", perturb_rho=0.05, **kw
    ),
}


# ---------------------------------------------------------------------- 7 copy and pickle
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_7_sam_and_gam_copy_and_pickle_and_the_copy_steps_as_the_original(name, how):
    model = bn_cnn()
    x, y = image_data()
    optimizer = BUILDERS[name](model, model=model)
    optimizer.step(make_closure(optimizer, model, x, y))  # with state (momentum, Adam moments)
    pair = (model, optimizer)
    twin_model, twin = (
        copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    )
    assert type(twin) is type(optimizer) and twin.hyperparameters() == optimizer.hyperparameters()
    assert twin.model is twin_model and twin.base_optimizer is not optimizer.base_optimizer
    assert {id(p) for p in twin._params} == {id(p) for p in twin_model.parameters()}
    before = flat(model)
    twin.step(make_closure(twin, twin_model, x, y))
    assert torch.equal(flat(model), before)  # the original is independent of its copy
    optimizer.step(make_closure(optimizer, model, x, y))
    assert torch.equal(flat(model), flat(twin_model))
    for (_, a), (_, b) in zip(model.named_buffers(), twin_model.named_buffers(), strict=True):
        assert torch.equal(a, b)


def test_7_a_copy_of_sam_between_first_and_second_step_finishes_the_step():
    model = tiny_mlp()
    x, y = classification_data()
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    twin_model, twin = copy.deepcopy((model, optimizer))
    for net, opt in ((model, optimizer), (twin_model, twin)):
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.second_step(zero_grad=True)
    assert torch.equal(flat(model), flat(twin_model))


# ---------------------------------------------------------------------- 8 exact mode's graph
def test_8_gam_exact_refuses_a_closure_that_builds_no_graph_before_any_change():
    model = tiny_mlp()
    x, y = classification_data()
    optimizer = GAM(model.parameters(), torch.optim.SGD, lr=0.1, mode="exact")

    def closure(create_graph=False):  # takes create_graph but does not pass it on
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    before = flat(model)
    with pytest.raises(RuntimeError, match=r"built no graph.*create_graph=create_graph"):
        optimizer.step(closure)
    assert torch.equal(flat(model), before)
    assert not optimizer.state  # the base optimizer never stepped


def test_8_gam_exact_checks_the_graph_once_and_then_steps_as_before():
    model = tiny_mlp()
    x, y = classification_data()
    optimizer = GAM(model.parameters(), torch.optim.SGD, lr=0.1, mode="exact")
    closure = make_closure(optimizer, model, x, y)
    for _ in range(3):
        optimizer.step(closure)
    assert optimizer._graph_checked


# ---------------------------------------------------------------------- 9 no silent steps
def _closure(optimizer, model, x, y, scale=1.0):
    def closure(create_graph=False):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y) * scale
        loss.backward(create_graph=create_graph)
        return loss

    return closure


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda m: SAM(m.parameters(), torch.optim.SGD, lr=0.1, rho=1e308), "rho = 1e\\+308"),
        (lambda m: GAM(m.parameters(), torch.optim.SGD, lr=0.1, rho=1e308), "perturbed point"),
        (
            lambda m: GAM(m.parameters(), torch.optim.SGD, lr=0.1, perturb_rho=1e308),
            "perturbed point",
        ),
        (
            lambda m: GAM(m.parameters(), torch.optim.SGD, lr=0.1, mode="exact", rho=1e308),
            "perturbed point",
        ),
        (lambda m: SAM(m.parameters(), torch.optim.SGD, lr=1e38), "learning rate 1e\\+38"),
        (lambda m: GAM(m.parameters(), torch.optim.SGD, lr=1e38), "base optimizer's update"),
    ],
)
def test_9_a_step_to_non_finite_parameters_raises_and_changes_nothing(make, match):
    model = tiny_mlp(dtype=torch.float32)
    x, y = classification_data(dtype=torch.float32)
    optimizer = make(model)
    before = flat(model)
    with pytest.raises(NonFiniteLossError, match=match):  # (gradients ~100: lr g overflows)
        optimizer.step(_closure(optimizer, model, x, y, scale=1e3))
    assert torch.equal(flat(model), before)


def test_9_a_radius_set_to_nan_later_raises_and_changes_nothing():
    model = tiny_mlp()
    x, y = classification_data()
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    optimizer.step(_closure(optimizer, model, x, y))
    optimizer.rho = float("nan")
    before = flat(model)
    with pytest.raises(NonFiniteLossError, match="rho = nan"):
        optimizer.step(_closure(optimizer, model, x, y))
    assert torch.equal(flat(model), before)


def test_9_a_non_finite_loss_at_theta_is_named_and_changes_nothing():
    model = tiny_mlp()
    x, y = classification_data()
    optimizer = GAM(model.parameters(), torch.optim.SGD, lr=0.1)
    before = flat(model)
    with pytest.raises(NonFiniteLossError, match="loss at the current parameters is nan"):
        optimizer.step(_closure(optimizer, model, x, y, scale=float("nan")))
    assert torch.equal(flat(model), before)


def test_9_the_two_call_form_checks_the_perturbation_the_gradient_and_the_update():
    model = tiny_mlp(dtype=torch.float32)
    x, y = classification_data(dtype=torch.float32)
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=1e308)
    before = flat(model)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(NonFiniteLossError, match="first_step: a perturbed point"):
        optimizer.first_step()
    assert torch.equal(flat(model), before)
    optimizer.rho = 0.05  # not left half-way: first_step works again
    optimizer.first_step(zero_grad=True)
    (torch.nn.functional.cross_entropy(model(x), y) * float("inf")).backward()
    with pytest.raises(NonFiniteLossError, match="second_step: the update direction"):
        optimizer.second_step()
    assert torch.equal(flat(model), before)
    optimizer.zero_grad()
    (torch.nn.functional.cross_entropy(model(x), y) * float("nan")).backward()
    with pytest.raises(NonFiniteLossError, match="first_step: the gradient"):
        optimizer.first_step()
    optimizer.zero_grad()
    optimizer.base_optimizer.param_groups[0]["lr"] = 1e38
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    (torch.nn.functional.cross_entropy(model(x), y) * 1e3).backward()
    with pytest.raises(NonFiniteLossError, match="second_step: the base optimizer's update"):
        optimizer.second_step()
    assert torch.equal(flat(model), before)


def test_9_with_a_grad_scaler_an_overflow_still_skips_the_step():
    model = tiny_mlp(dtype=torch.float32)
    x, y = classification_data(dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1, grad_scaler=scaler)
    calls = []

    def closure():
        calls.append(1)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if len(calls) == 2:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        return loss

    before = flat(model)
    optimizer.step(closure)  # no error: the scaler skips the step
    scaler.update()
    assert torch.equal(flat(model), before) and scaler.get_scale() == 2.0**9


# ---------------------------------------------------------------------- 14 state dicts
def test_14_another_optimizers_state_is_refused_both_ways():
    model = tiny_mlp()
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    gam = GAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="saved from SAM, not GAM"):
        gam.load_state_dict(sam.state_dict())
    with pytest.raises(ValueError, match="saved from GAM, not SAM"):
        sam.load_state_dict(gam.state_dict())
    legacy = {k: v for k, v in sam.state_dict().items() if k != "optimizer"}  # older format
    with pytest.raises(ValueError, match="another optimizer"):
        gam.load_state_dict(legacy)
    own = {k: v for k, v in gam.state_dict().items() if k != "optimizer"}
    gam.load_state_dict(own)  # a state dict of its own kind, with or without the entry
    gam.load_state_dict(gam.state_dict())
    assert gam.state_dict()["optimizer"] == "GAM" and sam.state_dict()["optimizer"] == "SAM"


def test_7_a_copy_drops_a_step_hooked_onto_the_original():
    """A framework may wrap ``step`` on the instance (the Hugging Face adapter does); a copy
    must not keep a wrapper that calls the original optimizer."""
    model = tiny_mlp()
    x, y = classification_data()
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    calls = []
    original = optimizer.step

    def hooked(closure=None):
        calls.append(1)
        return original(closure)

    optimizer.step = hooked
    twin_model, twin = copy.deepcopy((model, optimizer))
    twin.step(make_closure(twin, twin_model, x, y))
    assert calls == [] and not torch.equal(flat(twin_model), flat(model))
