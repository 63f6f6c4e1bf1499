"""Conv -> eval BatchNorm pairs folded into one convolution: same function, same parameters."""

import copy

import pytest
import torch
from helpers import ModelSnapshot, bn_cnn, dense_reference, image_data
from torch import nn
from torch.func import functional_call, hessian
from torch.nn import functional as F

from flatlens import Objective, zoo
from flatlens.core._fold_batchnorm import conv_batchnorm, fold_conv_batchnorm
from flatlens.landscape import line, random_direction


def _randomize_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
                m.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
                    m.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
    return model.eval()


def _folded_calls(module: nn.Module) -> int:
    return sum(n.op == "call_function" and n.target is conv_batchnorm for n in module.graph.nodes)


@pytest.mark.parametrize(
    ("make", "shape", "pairs"),
    [
        (lambda: zoo.cnn(), (5, 1, 8, 8), 2),
        (lambda: zoo.ResNet18(width=4), (2, 3, 8, 8), 20),
        (lambda: nn.Sequential(nn.Conv1d(2, 3, 3, bias=True), nn.BatchNorm1d(3)), (4, 2, 9), 1),
        (
            lambda: nn.Sequential(
                nn.Conv3d(1, 2, 2, padding=1, padding_mode="circular"),
                nn.BatchNorm3d(2, affine=False),
            ),
            (2, 1, 3, 3, 3),
            1,
        ),
    ],
)
def test_folded_model_is_the_same_function_with_the_same_parameters(make, shape, pairs):
    torch.manual_seed(0)
    model = _randomize_stats(make().double())
    snap = ModelSnapshot.take(model)
    folded = fold_conv_batchnorm(model)
    assert _folded_calls(folded) == pairs
    x = torch.randn(shape, dtype=torch.float64)
    assert torch.allclose(folded(x), model(x), rtol=1e-12, atol=1e-12)
    params = dict(model.named_parameters())
    assert {n: p for n, p in folded.named_parameters()}.keys() <= params.keys()
    assert all(p is params[n] for n, p in folded.named_parameters())
    # functional_call with the model's names drives the folded module.
    values = {n: p.detach() * 1.1 for n, p in params.items()}
    expected = functional_call(model, values, (x,))
    assert torch.allclose(functional_call(folded, values, (x,), strict=False), expected, 1e-12)
    snap.assert_unchanged(model)


def test_second_derivatives_match_the_unfolded_model():
    model = bn_cnn()
    x, y = image_data()
    folded = fold_conv_batchnorm(model.eval())
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(module, theta):
        values, i = {}, 0
        for n, p in model.named_parameters():
            values[n] = theta[i : i + p.numel()].view_as(p)
            i += p.numel()
        return F.cross_entropy(functional_call(module, values, (x,), strict=False), y)

    assert len(names) == 5
    h_model, h_folded = (
        hessian(lambda t: loss(model, t))(flat),
        hessian(lambda t: loss(folded, t))(flat),
    )
    assert torch.allclose(h_folded, h_model, rtol=1e-10, atol=1e-12)


def test_train_mode_mismatched_dtype_and_no_statistics_run_unchanged():
    conv, bn = nn.Conv2d(1, 2, 3).double(), nn.BatchNorm2d(2).double()
    _randomize_stats(nn.Sequential(conv, bn))
    x = torch.randn(4, 1, 5, 5, dtype=torch.float64)
    twin = copy.deepcopy(bn).train()
    bn.train()
    assert torch.equal(conv_batchnorm(x, conv, bn), twin(conv(x)))
    assert torch.equal(bn.running_mean, twin.running_mean)  # both updated the statistics
    bn.eval()
    bn.running_mean, bn.running_var = None, None
    assert torch.equal(conv_batchnorm(x, conv, bn), bn(conv(x)))
    mixed = nn.BatchNorm2d(2).eval()  # float32 statistics, float64 convolution
    with pytest.raises(RuntimeError, match="dtype"):  # as F.batch_norm itself does
        conv_batchnorm(x, conv, mixed)


def test_pairs_that_cannot_be_folded_are_left_alone():
    class TwoUses(nn.Module):  # the convolution's output is also used past the BatchNorm
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    class Branchy(nn.Module):  # data-dependent control flow: not traceable
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    hooked = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    hooked[0].register_forward_hook(lambda *_: None)
    for model in (TwoUses(), Branchy(), hooked, nn.Sequential(nn.Linear(2, 2))):
        assert fold_conv_batchnorm(model.eval()) is None


def test_objective_folds_and_stays_exact():
    model = bn_cnn()
    x, y = image_data()
    snap = ModelSnapshot.take(model)
    ref = dense_reference(model, F.cross_entropy, (x, y))
    obj = Objective(model, F.cross_entropy, (x, y))
    v = torch.randn(obj.num_params, dtype=torch.float64)
    assert torch.allclose(obj.hvp(v), ref.hessian @ v, rtol=1e-10, atol=1e-12)
    assert _folded_calls(obj._folded) == 1
    snap.assert_unchanged(model)
    # Train mode (batch statistics) is never folded.
    train = Objective(model, F.cross_entropy, (x, y), eval_mode=False, check_determinism=False)
    train.hvp(v)
    assert train._folded is None


def test_a_hook_added_later_runs_on_the_unfolded_model():
    model = bn_cnn()
    x, y = image_data()
    obj = Objective(model, F.cross_entropy, (x, y))
    folded_loss = obj.loss()
    assert _folded_calls(obj._folded) == 1
    seen = []
    handle = model[0].register_forward_hook(lambda *_: seen.append(1))
    unfolded_loss = obj.loss()
    assert seen and abs(unfolded_loss - folded_loss) <= 1e-12 * abs(folded_loss)
    handle.remove()
    seen.clear()
    assert obj.loss() == folded_loss and not seen


def test_float32_inference_runs_channels_last_and_derivatives_do_not():
    model = _randomize_stats(zoo.cnn().float())
    folded = fold_conv_batchnorm(model)
    assert _channels_last_flags(folded) == [True, True]
    x = torch.randn(6, 1, 8, 8)
    conv, bn = model[3], model[4]
    h = torch.relu(model[1](model[0](x)))
    with torch.no_grad():
        fast = conv_batchnorm(h, conv, bn, channels_last=True)
        ref = bn(conv(h))
        assert fast.is_contiguous(memory_format=torch.channels_last)
        assert conv_batchnorm(h, conv, bn).is_contiguous()
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    with_grad = conv_batchnorm(h, conv, bn, channels_last=True)
    assert with_grad.requires_grad and with_grad.is_contiguous()
    torch.testing.assert_close(with_grad.detach(), fast, rtol=1e-5, atol=1e-5)
    # Under vmap (batched weights) the default layout is kept and the values agree.
    w = torch.stack([conv.weight.detach(), 2 * conv.weight.detach()])

    def at(weight):
        return functional_call(folded, {"3.weight": weight}, (x,))

    with torch.no_grad():
        batched = torch.func.vmap(at)(w)
        torch.testing.assert_close(batched[0], folded(x), rtol=1e-5, atol=1e-5)


def _channels_last_flags(folded: nn.Module) -> list[bool]:
    return [
        n.kwargs["channels_last"]
        for n in folded.graph.nodes
        if n.op == "call_function" and n.target is conv_batchnorm
    ]


def _twice(t):
    return 2 * t


torch.fx.wrap("_twice")


class _Viewing(nn.Module):
    """Old CIFAR-style code: ``view`` after the convolutions, a user function, an output
    straight from a conv -> BatchNorm pair."""

    def __init__(self, tail: str) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 8 * 8, 3)
        self.tail = tail

    def forward(self, x):
        h = self.bn2(self.conv2(torch.relu(self.bn(self.conv(x)))))
        if self.tail == "view":
            return self.head(torch.relu(h).view(h.size(0), -1))
        if self.tail == "function":
            return self.head(torch.flatten(_twice(h), 1))
        if self.tail == "output":
            return h
        return self.head(torch.relu(h).reshape(h.size(0), -1))


@pytest.mark.parametrize(
    ("tail", "flags"),
    [
        ("view", [False, False]),
        ("function", [False, False]),
        ("output", [False, False]),
        ("reshape", [True, True]),
    ],
)
def test_channels_last_only_where_no_consumer_can_see_the_layout(tail, flags):
    model = _randomize_stats(_Viewing(tail).float())
    folded = fold_conv_batchnorm(model)
    assert _channels_last_flags(folded) == flags
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        out = folded(x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    if tail == "output":
        assert out.is_contiguous()
    if tail != "output":
        obj = Objective(model, F.cross_entropy, (x, torch.tensor([0, 1, 2, 0, 1])))
        with torch.no_grad():
            ref = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0, 1])).item()
        assert obj.loss() == pytest.approx(ref, rel=1e-5)
        # The landscape's serial evaluator folds its own copy of the model the same way.
        ls = line(obj, random_direction(obj, seed=0), steps=3, method="serial")
        assert ls.values["loss"][1] == obj.loss()
