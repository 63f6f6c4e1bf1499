"""Behaviour SAM and GAM share: BatchNorm statistics, state dicts, LR schedulers, errors,
restore on error, bf16 autocast and the float16 GradScaler path."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import bn_cnn, classification_data, image_data, tiny_mlp
from optim_ref import flat, make_closure

from flatlens.optim import GAM, SAM

VARIANTS = {
    "sam": (lambda ps, base, **kw: SAM(ps, base, rho=0.1, **kw), 2),
    "gam": (lambda ps, base, **kw: GAM(ps, base, **kw), 4),
    "gam-official": (
        lambda ps, base, **kw: GAM.from_official(
            ps,
            base,
            grad_rho=0.03,
            grad_norm_rho=0.2,
            grad_beta_0=0.5,
            grad_beta_1=0.6,
            grad_gamma=0.03,
            **kw,
        ),
        4,
    ),
    "gam-exact": (lambda ps, base, **kw: GAM(ps, base, mode="exact", perturb_rho=0.05, **kw), 3),
}


def build(name, net, base=None, **kw):
    factory, _ = VARIANTS[name]
    base = base or torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    return factory(net.parameters(), base, **kw)


# ------------------------------------------------------------------ BatchNorm statistics
@pytest.mark.parametrize("name", list(VARIANTS))
def test_batchnorm_statistics_move_once_per_step_with_model(name):
    model = bn_cnn().train()
    x, y = image_data()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference(x)  # one train-mode pass at theta
    optimizer = build(name, model, model=model)
    optimizer.step(make_closure(optimizer, model, x, y))
    for (n, b), (_, r) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        assert torch.equal(b, r), n
    assert int(model[1].num_batches_tracked) == 8


@pytest.mark.parametrize("name", list(VARIANTS))
def test_without_model_every_pass_updates_the_statistics(name):
    model = bn_cnn().train()
    x, y = image_data()
    optimizer = build(name, model)
    optimizer.step(make_closure(optimizer, model, x, y))
    assert int(model[1].num_batches_tracked) == 7 + VARIANTS[name][1]


# ------------------------------------------------------------------ state dicts, schedulers
@pytest.mark.parametrize("name", list(VARIANTS))
def test_state_dict_round_trip_continues_bit_exactly(name):
    x, y = classification_data()
    model = tiny_mlp()
    optimizer = build(name, model)
    for _ in range(2):
        optimizer.step(make_closure(optimizer, model, x, y))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    twin = tiny_mlp(seed=9)
    twin.load_state_dict(saved["model"])
    other = build(name, twin, base=torch.optim.SGD(twin.parameters(), lr=0.5, momentum=0.9))
    other.load_state_dict(saved["optimizer"])
    assert other.hyperparameters() == optimizer.hyperparameters()
    assert other.param_groups[0]["lr"] == 0.1
    for opt, net in ((optimizer, model), (other, twin)):
        opt.step(make_closure(opt, net, x, y))
    assert torch.equal(flat(model), flat(twin))


def test_load_state_dict_rejects_another_optimizers_settings_and_accepts_a_base_dict():
    model = tiny_mlp()
    sam = build("sam", model)
    gam = build("gam", model, base=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="another optimizer"):
        sam.load_state_dict(gam.state_dict())
    sam.load_state_dict(gam.base_optimizer.state_dict())
    assert sam.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("on_wrapper", [False, True])
def test_lr_scheduler_on_the_base_or_the_wrapper(on_wrapper):
    x, y = classification_data()
    runs = []
    for scheduled in (True, False):
        model = tiny_mlp()
        optimizer = build("gam", model)
        target = optimizer if on_wrapper else optimizer.base_optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(target, step_size=1, gamma=0.5)
        lrs = []
        for step in range(3):
            if not scheduled:
                for group in optimizer.param_groups:
                    group["lr"] = 0.1 * 0.5**step
            lrs.append(optimizer.base_optimizer.param_groups[0]["lr"])
            optimizer.step(make_closure(optimizer, model, x, y))
            if scheduled:
                scheduler.step()
        runs.append((flat(model), lrs))
    assert runs[0][1] == [0.1, 0.05, 0.025]
    assert torch.equal(runs[0][0], runs[1][0])


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda ps: SAM(ps, torch.optim.SGD, lr=0.1, rho=-0.1), ValueError, "rho"),
        (lambda ps: SAM(ps, torch.optim.SGD, lr=0.1, rho=float("nan")), ValueError, "rho"),
        (lambda ps: SAM(ps, torch.optim.SGD, lr=0.1, rho="0.1"), TypeError, "rho"),
        (lambda ps: GAM(ps, torch.optim.SGD, lr=0.1, rho=-1.0), ValueError, "rho"),
        (lambda ps: GAM(ps, torch.optim.SGD, lr=0.1, perturb_rho=-0.1), ValueError, "perturb"),
        (lambda ps: GAM(ps, torch.optim.SGD, lr=0.1, plus_weight=1.5), ValueError, "plus_weight"),
        (lambda ps: GAM(ps, torch.optim.SGD, lr=0.1, mode="fast"), ValueError, "mode"),
        (
            lambda ps: GAM(ps, torch.optim.SGD, lr=0.1, flatness_weight=0.1),
            ValueError,
            "flatness_weight",
        ),
        (
            lambda ps: GAM(ps, torch.optim.SGD, lr=0.1, mode="exact", orthogonal_weight=0.1),
            ValueError,
            "orthogonal_weight",
        ),
        (
            lambda ps: GAM(ps, torch.optim.SGD, lr=0.1, mode="exact", adaptive=True),
            ValueError,
            "adaptive",
        ),
        (lambda ps: SAM(ps, "sgd"), TypeError, "base_optimizer"),
        (lambda ps: SAM(ps, torch.optim.SGD(ps, lr=0.1), lr=0.1), TypeError, "base optimizer"),
        (lambda ps: SAM(ps[:1], torch.optim.SGD(ps, lr=0.1)), ValueError, "differ"),
        (lambda ps: SAM([], torch.optim.SGD, lr=0.1), ValueError, "empty"),
        (lambda ps: SAM(ps, SAM, lr=0.1), TypeError, "cannot wrap"),
        (lambda ps: SAM(ps, torch.optim.SGD, lr=0.1, model="net"), TypeError, "model"),
    ],
)
def test_bad_settings_raise_clear_errors(make, error, match):
    params = list(tiny_mlp().parameters())
    with pytest.raises(error, match=match):
        make(params)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_missing_or_wrong_closure(name):
    model = tiny_mlp()
    optimizer = build(name, model)
    with pytest.raises(ValueError, match="closure"):
        optimizer.step()
    with pytest.raises(TypeError, match="callable"):
        optimizer.step(3)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameters_and_buffers_come_back_when_a_pass_raises(name):
    model = bn_cnn().train()
    x, y = image_data()
    optimizer = build(name, model, model=model)
    inner = make_closure(optimizer, model, x, y)
    calls = []

    def closure(create_graph=False):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return inner(create_graph)

    before = flat(model)
    with torch.no_grad():
        copy.deepcopy(model)(x)
    with pytest.raises(KeyboardInterrupt):
        optimizer.step(closure)
    assert torch.equal(flat(model), before)
    assert int(model[1].num_batches_tracked) == 8  # the first pass's update only


# ------------------------------------------------------------------ mixed precision
@pytest.mark.parametrize("name", list(VARIANTS))
def test_bf16_autocast_smoke_on_cpu(name):
    torch.manual_seed(0)
    x, y = classification_data(n=64, dtype=torch.float32)
    updates = []
    for autocast in (False, True):
        model = tiny_mlp(dtype=torch.float32)
        optimizer = build(name, model, model=model)

        def closure(create_graph=False, model=model, optimizer=optimizer, autocast=autocast):
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward(create_graph=create_graph)
            return loss

        before = flat(model)
        loss = optimizer.step(closure)
        assert torch.isfinite(loss)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        updates.append(flat(model) - before)
    cosine = torch.nn.functional.cosine_similarity(updates[0], updates[1], dim=0)
    assert cosine > 0.97


@pytest.mark.parametrize("name", list(VARIANTS))
def test_grad_scaler_unscales_each_pass_and_skips_overflowing_steps(name):
    x, y = classification_data(dtype=torch.float32)
    results = []
    for use_scaler in (False, True):
        model = tiny_mlp(dtype=torch.float32)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if use_scaler else None
        optimizer = build(name, model, grad_scaler=scaler)

        def closure(create_graph=False, model=model, optimizer=optimizer, scaler=scaler):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            (scaler.scale(loss) if scaler else loss).backward(create_graph=create_graph)
            return loss

        optimizer.step(closure)
        if scaler:
            scaler.update()
            assert scaler.get_scale() == 2.0**10
        results.append(flat(model))
    assert torch.allclose(results[0], results[1], rtol=1e-5, atol=1e-7)

    # An overflow in the second pass: the step is skipped and the scale backs off.
    model = tiny_mlp(dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimizer = build(name, model, grad_scaler=scaler)
    calls = []

    def overflowing(create_graph=False):
        calls.append(1)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if len(calls) == 2:
            loss = loss * float("inf")
        scaler.scale(loss).backward(create_graph=create_graph)
        return loss

    before = flat(model)
    optimizer.step(overflowing)
    scaler.update()
    assert torch.equal(flat(model), before)
    assert scaler.get_scale() == 2.0**9
    assert len(calls) == 2  # stopped at the overflow
