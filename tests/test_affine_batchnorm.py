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


def test_mixed_dtypes_and_mismatched_channels_run_native_batch_norm():
    bn = nn.BatchNorm2d(3).eval()  # float32 statistics
    x = torch.randn(2, 3, 4, 4).to(torch.bfloat16)
    with AffineEvalBatchNorm():
        y = bn(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, bn(x))
    with AffineEvalBatchNorm(), pytest.raises(RuntimeError):
        bn(torch.randn(2, 1, 4, 4))  # native BatchNorm refuses the wrong channel count


def test_large_running_mean_stays_accurate_in_float32():
    bn = nn.BatchNorm1d(4).eval()
    bn.running_mean.fill_(1e4)
    bn.running_var.fill_(0.01)
    x = 1e4 + 0.1 * torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    ref = bn.double()(x.double())
    with AffineEvalBatchNorm():
        y = bn.float()(x)
    # x - mu is exact here; x * s - mu * s would lose ~6e-3 to cancellation.
    assert (y.double() - ref).abs().max() < 1e-5
