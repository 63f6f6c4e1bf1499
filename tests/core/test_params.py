"""flatlens.core._params: parameter selection, flat vectors, bit-exact snapshot and restore."""

from __future__ import annotations

import pytest
import torch
from helpers import ModelSnapshot, bn_cnn, tiny_mlp, with_unused
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from flatlens.core._params import ModelState, ParamSpace, eval_mode, preserved, select_parameters


# ---------------------------------------------------------------------------------- selection
def names_of(selected):
    return [n for n, _ in selected]


def test_select_default_is_every_trainable_parameter_in_model_order():
    model = tiny_mlp()
    model[0].bias.requires_grad_(False)
    assert names_of(select_parameters(model)) == ["0.weight", "2.weight", "2.bias"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("2.weight", ["2.weight"]),
        ("2", ["2.weight", "2.bias"]),
        (["2.bias", "0.weight"], ["0.weight", "2.bias"]),
        (["0", "0.weight"], ["0.weight", "0.bias"]),
    ],
)
def test_select_by_name_and_prefix(spec, expected):
    assert names_of(select_parameters(tiny_mlp(), spec)) == expected


def test_select_prefix_does_not_match_a_longer_name():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(12)])
    assert names_of(select_parameters(model, "1")) == ["1.weight", "1.bias"]


def test_select_by_module_and_tensor():
    model = tiny_mlp()
    assert names_of(select_parameters(model, model[2])) == ["2.weight", "2.bias"]
    assert names_of(select_parameters(model, model[0].bias)) == ["0.bias"]
    mixed = select_parameters(model, [model[2].bias, model[0]])
    assert names_of(mixed) == ["0.weight", "0.bias", "2.bias"]
    assert mixed[0][1] is model[0].weight


def test_select_errors():
    model = tiny_mlp()
    with pytest.raises(ValueError, match="no parameter named 'fc'"):
        select_parameters(model, "fc")
    with pytest.raises(ValueError, match="not a parameter of this model"):
        select_parameters(model, torch.zeros(3))
    with pytest.raises(ValueError, match="no parameters of this model"):
        select_parameters(model, nn.Linear(2, 2))
    with pytest.raises(TypeError, match="names, modules or parameter tensors"):
        select_parameters(model, [3])
    model[2].bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"do not require grad: \['2.bias'\]"):
        select_parameters(model, "2")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter of the model requires grad"):
        select_parameters(model)


# ---------------------------------------------------------------------------------- ParamSpace
shapes_strategy = st.lists(
    st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple), min_size=1, max_size=5
)


@given(shapes=shapes_strategy, lead=st.lists(st.integers(1, 3), max_size=2).map(tuple))
def test_flatten_unflatten_round_trip(shapes, lead):
    tensors = [torch.randn(s, dtype=torch.float64) for s in shapes]
    space = ParamSpace.from_named([(f"p{i}", t) for i, t in enumerate(tensors)])
    assert space.dim == sum(t.numel() for t in tensors)
    flat = space.flatten(tensors)
    assert flat.shape == (space.dim,)
    back = space.unflatten(flat)
    assert all(torch.equal(a, b) for a, b in zip(back, tensors, strict=True))
    assert space.flatten(back).equal(flat)
    # Views, not copies: writing through them writes into the flat vector.
    back[-1].fill_(7.0)
    assert flat[-tensors[-1].numel() :].eq(7.0).all()
    # A leading batch dimension is kept.
    batched = torch.randn((*lead, space.dim), dtype=torch.float64)
    parts = space.unflatten(batched)
    for part, shape, (name, sl, seg_shape) in zip(parts, shapes, space.segments(), strict=True):
        assert part.shape == (*lead, *shape)
        assert seg_shape == torch.Size(shape)
        assert torch.equal(part.reshape(*lead, -1), batched[..., sl])
        assert torch.equal(space.as_dict(batched)[name], part)


def test_unflatten_scalar_parameter():
    space = ParamSpace(("t", "w"), (torch.Size([]), torch.Size([2])))
    t, w = space.unflatten(torch.tensor([3.0, 1.0, 2.0]))
    assert t.shape == () and float(t) == 3.0 and w.tolist() == [1.0, 2.0]
    (tb, wb) = space.unflatten(torch.arange(6.0).view(2, 3))
    assert tb.shape == (2,) and wb.shape == (2, 2)


def test_unflatten_rejects_wrong_length():
    space = ParamSpace.from_named(list(tiny_mlp().named_parameters()))
    with pytest.raises(ValueError, match=f"expected {space.dim}"):
        space.unflatten(torch.zeros(space.dim + 1))


def test_segments_cover_the_vector_in_order():
    model = tiny_mlp()
    space = ParamSpace.from_named(list(model.named_parameters()))
    flat = space.flatten(model.parameters())
    stop = 0
    for (name, sl, shape), (pname, p) in zip(
        space.segments(), model.named_parameters(), strict=True
    ):
        assert name == pname and shape == p.shape and sl.start == stop
        assert torch.equal(flat[sl].view(shape), p.detach())
        stop = sl.stop
    assert stop == space.dim


# ---------------------------------------------------------------------------------- preserved
def scramble(model: nn.Module) -> None:
    """Change everything a measurement could touch."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        for b in model.buffers():
            b.add_(1)
    model.train(not model.training)
    next(model.parameters()).requires_grad_(False)
    model(torch.randn(4, 1, 4, 4, dtype=torch.float64))  # train-mode BN writes its stats


def mixed_mode_bn_cnn() -> nn.Module:
    model = bn_cnn()
    model.train()
    model[1].eval()  # per-module flags must come back individually
    return model


def test_preserved_restores_bit_for_bit():
    model = mixed_mode_bn_cnn()
    before = ModelSnapshot.take(model)
    with preserved(model) as state:
        assert isinstance(state, ModelState)
        scramble(model)
        assert not torch.equal(model[1].running_mean, before.tensors["1.running_mean"])
    before.assert_unchanged(model)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_preserved_restores_on_error_and_interrupt(exc):
    model = mixed_mode_bn_cnn()
    before = ModelSnapshot.take(model)
    with pytest.raises(type(exc)), preserved(model):
        scramble(model)
        raise exc
    before.assert_unchanged(model)


def test_preserved_keeps_optimizer_references_valid():
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = ModelSnapshot.take(model)
    with preserved(model):
        model(torch.randn(3, 4, dtype=torch.float64)).sum().backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    before.assert_unchanged(model)
    assert all(
        p is q for p, q in zip(opt.param_groups[0]["params"], model.parameters(), strict=True)
    )


def test_preserved_restores_unused_parameter():
    model = with_unused()
    before = ModelSnapshot.take(model)
    with preserved(model), torch.no_grad():
        model.unused.weight.zero_()
    before.assert_unchanged(model)


def test_eval_mode_restores_each_module_flag():
    model = mixed_mode_bn_cnn()
    flags = {n: m.training for n, m in model.named_modules()}
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert {n: m.training for n, m in model.named_modules()} == flags
    with pytest.raises(KeyboardInterrupt), eval_mode(model):
        raise KeyboardInterrupt
    assert {n: m.training for n, m in model.named_modules()} == flags
    with eval_mode(model, enabled=False):
        assert {n: m.training for n, m in model.named_modules()} == flags


def test_snapshot_helper_detects_changes():
    """The helper the other tests rely on must be able to fail."""
    model = bn_cnn()
    snap = ModelSnapshot.take(model)
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = -model[0].weight[0, 0, 0, 0]
    with pytest.raises(AssertionError, match="changed"):
        snap.assert_unchanged(model)
    model = bn_cnn()
    snap = ModelSnapshot.take(model)
    model[1].num_batches_tracked += 1
    with pytest.raises(AssertionError):
        snap.assert_unchanged(model)
    model = bn_cnn()
    snap = ModelSnapshot.take(model)
    model.train(False)
    with pytest.raises(AssertionError, match="flags"):
        snap.assert_unchanged(model)
