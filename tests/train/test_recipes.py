"""The recipes reproduce the published setups: optimizer, schedule and loss, three steps on
fixed data, against references written here from the published code's algorithms
(xxgege/GAM's ``gam/gam.py`` and ``main_cifar.py``, davda54/sam's ``sam.py`` and
``example/train.py``), to 1e-6 in float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flatlens.data import Dataset
from flatlens.train import RECIPES, TrainConfig, build_model, train

EPOCHS = 3  # one step per epoch: the schedule changes the rate at every step


def _data() -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (12,), generator=g)
    return Dataset(x[:8], y[:8], x[8:], y[8:], 10, "tiny-cifar")


def _config(name: str) -> TrainConfig:
    small = (
        {"model": "resnet18", "model_kwargs": {"width": 2}}
        if name.startswith("gam")
        else {
            "model": "flatlens.zoo:WideResNet",
            "model_kwargs": {"depth": 10, "width_factor": 1, "layout": "davda54"},
        }
    )
    return TrainConfig.from_recipe(
        name,
        **small,
        epochs=EPOCHS,
        batch_size=8,
        augment="none",
        data_mean=None,
        data_std=None,
        dtype="float64",
        num_workers=0,
    )


def _smooth_kl(outputs: torch.Tensor, targets: torch.Tensor, eps: float) -> torch.Tensor:
    """The published loss: targets 1 - eps and eps / (n - 1), KL to the softmax, mean."""
    n = outputs.shape[1]
    t = torch.full_like(outputs, eps / (n - 1))
    t[torch.arange(len(targets)), targets] = 1 - eps
    return (t * (t.log() - outputs.log_softmax(1))).sum(1).mean()


def _bn_momentum(model: nn.Module, value: float | None) -> list[float | None]:
    """Set every BatchNorm's momentum (the published 'disable_running_stats')."""
    old = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            old.append(m.momentum)
            m.momentum = value
    return old


def _restore_momentum(model: nn.Module, old: list[float | None]) -> None:
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m, value in zip(bns, old, strict=True):
        m.momentum = value


def _norm(vs):
    return torch.sqrt(sum((v**2).sum() for v in vs))


def _grads(model, x, y, loss_fn):
    for p in model.parameters():
        p.grad = None
    loss = loss_fn(model(x), y)
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


def _official_gam_step(model, base, x, y, loss_fn, s, eps=1e-12):
    """gam/gam.py's step: g0; +rho' g0/|g0| -> g1; back; +rho (g1-g0)/|g1-g0| -> g2;
    +rho' g2/|g2| -> g3; h+ = b1 g1 + (1-b1) g3, h- = g0 + |1-b0| g2; remove gamma of h-'s
    part orthogonal to h+; back to theta; base step. BatchNorm momentum 0 after pass 1."""
    params = list(model.parameters())
    theta = [p.detach().clone() for p in params]
    loss, g0 = _grads(model, x, y, loss_fn)
    with torch.no_grad():
        e0 = [g * (s["grad_rho"] / (_norm(g0) + eps)) for g in g0]
        for p, e in zip(params, e0, strict=True):
            p.add_(e)
    saved = _bn_momentum(model, 0.0)
    _, g1 = _grads(model, x, y, loss_fn)
    with torch.no_grad():
        for p, e in zip(params, e0, strict=True):
            p.sub_(e)
        diff = [a - b for a, b in zip(g1, g0, strict=True)]
        e12 = [d * (s["grad_norm_rho"] / (_norm(diff) + eps)) for d in diff]
        for p, e in zip(params, e12, strict=True):
            p.add_(e)
    _, g2 = _grads(model, x, y, loss_fn)
    with torch.no_grad():
        e2 = [g * (s["grad_rho"] / (_norm(g2) + eps)) for g in g2]
        for p, e in zip(params, e2, strict=True):
            p.add_(e)
    _, g3 = _grads(model, x, y, loss_fn)
    b0, b1, gamma = s["grad_beta_0"], s["grad_beta_1"], s["grad_gamma"]
    with torch.no_grad():
        minus = [a + abs(1 - b0) * b for a, b in zip(g0, g2, strict=True)]
        plus = [b1 * a + (1 - b1) * b for a, b in zip(g1, g3, strict=True)]
        n_plus, n_minus = _norm(plus), _norm(minus)
        cos = sum((a * b).sum() for a, b in zip(minus, plus, strict=True)) / (
            n_plus * n_minus + eps
        )
        for p, t, m, h in zip(params, theta, minus, plus, strict=True):
            p.copy_(t)
            p.grad = h - gamma * (m - cos * n_minus * h / (n_plus + eps))
    base.step()
    _restore_momentum(model, saved)
    return loss


def _davda54_sam_step(model, base, x, y, loss_fn, rho, adaptive, eps=1e-12):
    """sam.py with example/train.py's loop: ascend rho (w^2) g / ||(|w|) g||, BatchNorm
    momentum 0 in the second pass, back to w, base step on the second gradient."""
    params = list(model.parameters())
    loss, g = _grads(model, x, y, loss_fn)
    with torch.no_grad():
        scale = [p.abs() if adaptive else torch.ones_like(p) for p in params]
        norm = _norm([s * gi for s, gi in zip(scale, g, strict=True)])
        old = [p.detach().clone() for p in params]
        for p, gi in zip(params, g, strict=True):
            p.add_((p**2 if adaptive else 1.0) * gi * (rho / (norm + eps)))
    saved = _bn_momentum(model, 0.0)
    _, g_sam = _grads(model, x, y, loss_fn)
    _restore_momentum(model, saved)
    with torch.no_grad():
        for p, o, gs in zip(params, old, g_sam, strict=True):
            p.copy_(o)
            p.grad = gs
    base.step()
    return loss


def _reference(name: str, config: TrainConfig, data: Dataset):
    """The published loop for EPOCHS epochs of one step: final model, losses, rates."""
    model = build_model(config, data)
    settings = RECIPES[name].settings
    eps = settings["label_smoothing"]

    def loss_fn(out, y):
        return _smooth_kl(out, y, eps)

    base = torch.optim.SGD(
        model.parameters(), lr=settings["lr"], momentum=settings["momentum"],
        weight_decay=settings["weight_decay"],
    )  # fmt: skip
    x, y = data.x_train, data.y_train
    losses, rates = [], []
    if name.startswith("gam"):
        # main_cifar.py: CosineAnnealingLR(T_max=epochs), stepped after each epoch
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=EPOCHS)
        official = {
            "grad_norm_rho": settings["gam_rho"],
            "grad_rho": settings["gam_perturb_rho"],
            "grad_beta_0": settings["gam_minus_weight"],
            "grad_beta_1": settings["gam_plus_weight"],
            "grad_gamma": settings["gam_orthogonal_weight"],
        }
        for _ in range(EPOCHS):
            rates.append(base.param_groups[0]["lr"])
            losses.append(float(_official_gam_step(model, base, x, y, loss_fn, official)))
            cosine.step()
    else:
        for epoch in range(EPOCHS):
            rates.append(base.param_groups[0]["lr"])
            step = _davda54_sam_step(
                model, base, x, y, loss_fn, settings["sam_rho"], settings["sam_adaptive"]
            )
            losses.append(float(step))
            # utility/step_lr.py, called after every step with the epoch
            lr = settings["lr"]
            if epoch >= EPOCHS * 3 / 10:
                lr *= 0.2
            if epoch >= EPOCHS * 6 / 10:
                lr *= 0.2
            if epoch >= EPOCHS * 8 / 10:
                lr *= 0.2
            for group in base.param_groups:
                group["lr"] = lr
    return model, losses, rates


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_three_steps_of_each_recipe_equal_the_published_algorithm(name):
    data = _data()
    config = _config(name)
    result = train(config, data)
    reference, losses, rates = _reference(name, config, data)

    assert [row["lr"] for row in result.history] == pytest.approx(rates, rel=1e-12)
    assert [row["train_loss_running"] for row in result.history] == pytest.approx(losses, rel=1e-6)
    mine, theirs = result.model.state_dict(), reference.state_dict()
    for key, value in theirs.items():
        if key.endswith("num_batches_tracked"):
            continue  # the published code counts every pass; flatlens the first only
        diff = (mine[key] - value).abs().max().item()
        assert diff <= 1e-6 * max(1.0, value.abs().max().item()), (key, diff)
    moved = max((mine[k] - v).abs().max().item() for k, v in build_model(config, data)
                .state_dict().items() if v.is_floating_point())  # fmt: skip
    assert moved > 1e-3  # the comparison is not between two untrained networks


def test_every_recipe_setting_has_a_source_and_is_a_train_config_field():
    import dataclasses

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, recipe in RECIPES.items():
        assert recipe.name == name
        assert set(recipe.settings) <= fields, name
        assert set(recipe.sources) == set(recipe.settings), name
        for key, source in recipe.sources.items():
            assert "GAM@" in source or "sam@" in source, (name, key)
            assert any(ch.isdigit() for ch in source.split(" ", 1)[1]), (name, key)  # a line
    assert RECIPES["gam-cifar100-resnet18"].settings["gam_plus_weight"] == 0.6
    assert RECIPES["asam-cifar10-wrn16-8"].settings["sam_rho"] == 2.0


def test_flags_and_overrides_replace_recipe_settings():
    config = TrainConfig.from_recipe("sam-cifar10-wrn16-8", epochs=1, lr=0.05)
    assert (config.epochs, config.lr, config.sam_rho, config.recipe) == (
        1, 0.05, 0.05, "sam-cifar10-wrn16-8"
    )  # fmt: skip
    assert config.milestones == (0.3, 0.6, 0.8) and config.lr_decay == 0.2
    with pytest.raises(ValueError, match="unknown recipe"):
        TrainConfig.from_recipe("gam-imagenet")


def test_smooth_cross_entropy_is_the_published_form():
    from flatlens.train import SmoothCrossEntropy

    g = torch.Generator().manual_seed(3)
    out = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 1, 1, 2])
    mine = SmoothCrossEntropy(0.1)(out, y)
    assert mine.item() == pytest.approx(_smooth_kl(out, y, 0.1).item(), rel=1e-12)
    # the same gradient as cross-entropy against the smoothed targets (KL = CE - entropy)
    t = torch.full((5, 4), 0.1 / 3, dtype=torch.float64)
    t[torch.arange(5), y] = 0.9
    ce = -(t * out.log_softmax(1)).sum(1).mean()
    entropy = -(t * t.log()).sum(1).mean()
    assert mine.item() == pytest.approx((ce - entropy).item(), rel=1e-12)
    (ga,) = torch.autograd.grad(mine, out)
    (gb,) = torch.autograd.grad(ce, out)
    assert torch.allclose(ga, gb, atol=1e-14)
    # torch's form differs: eps / n on every class
    torch_form = nn.CrossEntropyLoss(label_smoothing=0.1)(out, y)
    assert not math.isclose(torch_form.item(), ce.item(), rel_tol=1e-6)
