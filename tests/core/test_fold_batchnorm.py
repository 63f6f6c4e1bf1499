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


def _randomize_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
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
                nn.Conv3d(1, 2, 2, padding=1), nn.BatchNorm3d(2, affine=False), nn.ReLU()
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

    circular = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"))
    circular.append(nn.BatchNorm2d(2))
    same = nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.BatchNorm2d(2))
    for model in (TwoUses(), Branchy(), circular, same, nn.Sequential(nn.Linear(2, 2))):
        assert fold_conv_batchnorm(model.eval()) is None


def test_objective_folds_and_stays_exact():
    model = bn_cnn()
    x, y = image_data()
    snap = ModelSnapshot.take(model)
    ref = dense_reference(model, F.cross_entropy, (x, y))
    obj = Objective(model, F.cross_entropy, (x, y), fold_batchnorm=True)
    v = torch.randn(obj.num_params, dtype=torch.float64)
    assert torch.allclose(obj.hvp(v), ref.hessian @ v, rtol=1e-10, atol=1e-12)
    assert _folded_calls(obj._folded) == 1
    snap.assert_unchanged(model)
    # Train mode (batch statistics) is never folded.
    train = Objective(
        model,
        F.cross_entropy,
        (x, y),
        eval_mode=False,
        check_determinism=False,
        fold_batchnorm=True,
    )
    train.hvp(v)
    assert train._folded is None


def test_by_default_the_objective_runs_the_model_as_written_hooks_included():
    """A global forward hook fires for every Conv2d and BatchNorm2d in a plain forward; the
    default Objective (no folding) runs the same modules, so it fires for the same ones."""
    model = bn_cnn()
    x, y = image_data()

    def kinds_seen(run) -> list[str]:
        seen: list[str] = []
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, i, o: seen.append(type(m).__name__)
        )
        try:
            run()
        finally:
            handle.remove()
        return seen

    plain = kinds_seen(lambda: model.eval()(x))
    assert {"Conv2d", "BatchNorm2d"} <= set(plain)
    obj = Objective(model, F.cross_entropy, (x, y), check_determinism=False)
    assert kinds_seen(obj.loss) == plain
    assert kinds_seen(lambda: obj.hvp(torch.ones(obj.num_params, dtype=x.dtype))) == plain
    # Folding is the documented opt-out: the folded pair runs as one function.
    folded = Objective(model, F.cross_entropy, (x, y), check_determinism=False, fold_batchnorm=True)
    seen = kinds_seen(folded.loss)
    assert "BatchNorm2d" not in seen and "Conv2d" not in seen
    assert abs(folded.loss() - obj.loss()) <= 1e-12 * abs(obj.loss())


def test_fold_batchnorm_is_off_by_default():
    model = bn_cnn()
    obj = Objective(model, F.cross_entropy, image_data())
    assert obj.fold_batchnorm is False
    obj.loss()
    assert obj._folded is None
