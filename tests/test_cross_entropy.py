"""The fast cross-entropy equals F.cross_entropy (value, gradient, HVP) and falls back where
it does not apply; predictions() equals argmax, ties included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import classification_data, tiny_mlp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from flatlens import Objective
from flatlens.cross_entropy import fast_cross_entropy, predictions


def logits(n: int, c: int, seed: int, dtype=torch.float64, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(n, c, generator=g, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=g)
    return z, y


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    c=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    which=st.sampled_from(["functional", "mean", "sum"]),
)
def test_value_equals_cross_entropy_in_float64(n, c, seed, scale, which):
    loss_fn = F.cross_entropy if which == "functional" else nn.CrossEntropyLoss(reduction=which)
    fast = fast_cross_entropy(loss_fn)
    assert fast is not loss_fn
    z, y = logits(n, c, seed, scale=scale)
    ref = loss_fn(z, y)
    torch.testing.assert_close(fast(z, y), ref, rtol=1e-14, atol=1e-14)


def test_float32_value_agrees_to_rounding():
    z, y = logits(1797, 10, 0, dtype=torch.float32)
    fast = fast_cross_entropy(F.cross_entropy)
    torch.testing.assert_close(fast(z, y), F.cross_entropy(z, y), rtol=1e-6, atol=0)


def test_gradient_and_hessian_vector_product_equal_cross_entropy():
    z, y = logits(25, 7, 1)
    v = torch.randn(25, 7, dtype=torch.float64)
    fast = fast_cross_entropy(nn.CrossEntropyLoss())
    results = []
    for fn in (F.cross_entropy, fast):
        zz = z.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(zz, y), zz, create_graph=True)
        (hv,) = torch.autograd.grad((g * v).sum(), zz)
        results.append((g.detach(), hv))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def counted(ce: nn.CrossEntropyLoss) -> tuple[nn.CrossEntropyLoss, list[int]]:
    """``ce`` with its forward counting calls (still of type nn.CrossEntropyLoss)."""
    calls: list[int] = []
    forward = ce.forward

    def counting(out, t):
        calls.append(1)
        return forward(out, t)

    ce.forward = counting
    return ce, calls


@pytest.mark.parametrize(
    "ce",
    [
        nn.CrossEntropyLoss(weight=torch.rand(5, dtype=torch.float64)),
        nn.CrossEntropyLoss(label_smoothing=0.1),
        nn.CrossEntropyLoss(ignore_index=2),
        nn.CrossEntropyLoss(reduction="none"),
    ],
    ids=["weight", "smoothing", "ignore-class", "none"],
)
def test_settings_it_does_not_cover_call_the_module(ce):
    z, y = logits(12, 5, 2)
    ref = ce(z, y)
    ce, calls = counted(ce)
    assert torch.equal(fast_cross_entropy(ce)(z, y), ref) and len(calls) == 1


def test_plain_module_takes_the_fast_path_and_rereads_its_settings():
    z, y = logits(12, 5, 2)
    ce, calls = counted(nn.CrossEntropyLoss())
    fast = fast_cross_entropy(ce)
    torch.testing.assert_close(fast(z, y), F.cross_entropy(z, y), rtol=1e-14, atol=0)
    assert not calls
    ce.label_smoothing = 0.3  # changed after wrapping: the module computes it
    assert torch.equal(fast(z, y), F.cross_entropy(z, y, label_smoothing=0.3))
    assert len(calls) == 1


def test_hooks_on_the_loss_still_run():
    z, y = logits(12, 5, 2)
    ce = nn.CrossEntropyLoss()
    seen = []
    ce.register_forward_hook(lambda module, args, out: seen.append(out))
    fast = fast_cross_entropy(ce)
    value = fast(z, y)
    assert len(seen) == 1 and torch.equal(value, seen[0])


@pytest.mark.parametrize(
    "loss_fn",
    [type("MyLoss", (nn.CrossEntropyLoss,), {})(), F.nll_loss, lambda z, y: F.cross_entropy(z, y)],
    ids=["subclass", "nll", "lambda"],
)
def test_other_losses_are_returned_unchanged(loss_fn):
    assert fast_cross_entropy(loss_fn) is loss_fn


@pytest.mark.parametrize(
    "case", ["ignored-target", "soft-targets", "3d-outputs", "uint8-targets", "float16"]
)
def test_inputs_it_does_not_cover_go_to_the_original_loss(case):
    z, y = logits(12, 5, 2)
    if case == "ignored-target":
        y[3] = -100
    elif case == "soft-targets":
        y = torch.softmax(torch.randn(12, 5, dtype=torch.float64), 1)
    elif case == "3d-outputs":
        z, y = z.reshape(12, 5, 1), y.reshape(12, 1)
    elif case == "uint8-targets":
        y = y.to(torch.uint8)
    else:
        z = z.to(torch.float16)
    ce, calls = counted(nn.CrossEntropyLoss())
    assert torch.equal(fast_cross_entropy(ce)(z, y), F.cross_entropy(z, y))
    assert len(calls) == 1
    assert torch.equal(fast_cross_entropy(F.cross_entropy)(z, y), F.cross_entropy(z, y))


def test_batched_targets_under_vmap_fall_back():
    z, y = logits(12, 5, 2)
    zs, ys = torch.stack([z, 2 * z]), torch.stack([y, y.flip(0)])
    fast = fast_cross_entropy(F.cross_entropy)
    torch.testing.assert_close(
        torch.func.vmap(fast)(zs, ys), torch.func.vmap(F.cross_entropy)(zs, ys)
    )


def test_predictions_equal_argmax_with_ties():
    z, _ = logits(200, 6, 3)
    z[:50] = 0.0  # every entry tied
    z[50:100, 1] = z[50:100, 4] = z[50:100].max() + 1  # two tied maxima
    z = z.round(decimals=1)  # more ties
    assert torch.equal(predictions(z), z.argmax(dim=-1))
    assert torch.equal(predictions(z.float()), z.float().argmax(dim=-1))


def test_objective_evaluates_the_fast_form_and_keeps_the_users_loss():
    x, y = classification_data(40, seed=0)
    model = tiny_mlp(seed=0)
    obj = Objective(model, F.cross_entropy, (x, y))
    assert obj.loss_fn is F.cross_entropy and obj.criterion is not F.cross_entropy
    with torch.no_grad():
        ref = F.cross_entropy(model(x), y).item()
    assert obj.loss() == pytest.approx(ref, rel=1e-14)
    custom = Objective(model, lambda out, t: F.cross_entropy(out, t), (x, y))
    assert custom.criterion is custom.loss_fn
    assert custom.loss() == pytest.approx(ref, rel=1e-14)


def test_float32_accuracy_matches_log_softmax_for_confident_predictions():
    # Per-sample losses near 1e-4 with logits around 5-20: an unshifted logsumexp(z) - z_y
    # loses three digits to cancellation; the shifted form must stay as close to the
    # float64 value as F.cross_entropy.
    z, y = logits(1797, 10, 4, scale=2.0)
    z[torch.arange(1797), y] += 14.0
    z += 5.0
    ref = F.cross_entropy(z, y).item()
    z32 = z.float()
    err_torch = abs(F.cross_entropy(z32, y).item() - ref) / ref
    err_fast = abs(fast_cross_entropy(F.cross_entropy)(z32, y).item() - ref) / ref
    assert err_fast <= 2 * err_torch + 1e-6


def test_targets_changed_in_place_are_scanned_again():
    z, y = logits(12, 5, 2)
    ce, calls = counted(nn.CrossEntropyLoss())
    fast = fast_cross_entropy(ce)
    fast(z, y)
    fast(z, y)
    assert not calls
    y[3] = -100  # now an ignored target: the module must compute it
    assert torch.equal(fast(z, y), F.cross_entropy(z, y)) and len(calls) == 1
