"""Eval-mode BatchNorm written as an affine map equals F.batch_norm to float64 rounding."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatlens.affine_batchnorm import AffineEvalBatchNorm


def _bn(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(
        x,
        module.running_mean,
        module.running_var,
        module.weight,
        module.bias,
        module.training,
        module.momentum,
        module.eps,
    )


@pytest.mark.parametrize(
    ("cls", "shape"),
    [(nn.BatchNorm1d, (7, 3)), (nn.BatchNorm1d, (7, 3, 5)), (nn.BatchNorm2d, (4, 3, 5, 6))],
)
@pytest.mark.parametrize("affine", [True, False])
def test_matches_native_value_gradient_and_hessian(cls, shape, affine):
    gen = torch.Generator().manual_seed(0)
    bn = cls(3, affine=affine).double().eval()
    bn.running_mean.copy_(torch.randn(3, generator=gen, dtype=torch.float64))
    bn.running_var.copy_(torch.rand(3, generator=gen, dtype=torch.float64) + 0.5)
    if affine:
        with torch.no_grad():
            bn.weight.copy_(torch.randn(3, generator=gen, dtype=torch.float64))
            bn.bias.copy_(torch.randn(3, generator=gen, dtype=torch.float64))
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    c = torch.randn(shape, generator=gen, dtype=torch.float64)

    def loss(inp: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(bn(inp)) * c).sum()

    with AffineEvalBatchNorm():
        y = bn(x)
        hess = torch.autograd.functional.hessian(loss, x)
    assert torch.allclose(y, bn(x), rtol=1e-13, atol=1e-13)
    ref = torch.autograd.functional.hessian(loss, x)
    assert torch.allclose(hess, ref, rtol=1e-12, atol=1e-12)
    if affine:
        with AffineEvalBatchNorm():
            gw = torch.autograd.grad(loss(x), bn.weight)[0]
        assert torch.allclose(gw, torch.autograd.grad(loss(x), bn.weight)[0], rtol=1e-12)


def test_train_mode_passes_through_and_updates_running_stats():
    bn = nn.BatchNorm2d(3).double().train()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    ref = nn.BatchNorm2d(3).double().train()
    with AffineEvalBatchNorm():
        y = _bn(bn, x)
    assert torch.equal(y, _bn(ref, x))
    assert torch.equal(bn.running_mean, ref.running_mean)
    assert not torch.equal(bn.running_mean, torch.zeros(3, dtype=torch.float64))
