"""Eval-mode BatchNorm folded into the convolution before it (``Objective(fold_batchnorm=True)``).

In eval mode a BatchNorm after a convolution is an affine map per output channel,

    BN(conv(x; W, c)) = conv(x; W * s, (c - mu) * s + beta),    s = gamma / sqrt(var + eps),

so the pair is one convolution with rescaled weights and bias: the same function up to
rounding, with the BatchNorm's elementwise work gone from the forward pass and from the
first- and second-order graphs. The pairs are found with ``torch.fx``; the folded module
shares the model's submodules, parameters and buffers under the same names, so
``functional_call`` with the model's parameter names works on it. Forward hooks of a folded
convolution or BatchNorm (and global module hooks for them) do not run: that is why folding
is opt-in. Benchmarks: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["conv_batchnorm", "fold_conv_batchnorm"]

_CONVS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def conv_batchnorm(x: Tensor, conv: nn.Module, bn: nn.Module) -> Tensor:
    """``bn(conv(x))``, as one convolution with folded weights when ``bn`` is in eval mode."""
    mean, var, weight = bn.running_mean, bn.running_var, conv.weight
    if (
        bn.training
        or mean is None
        or var is None
        or mean.numel() != weight.shape[0]
        or not weight.dtype == mean.dtype == var.dtype
        or any(t is not None and t.dtype != weight.dtype for t in (bn.weight, bn.bias, conv.bias))
    ):
        return bn(conv(x))
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = (-mean if conv.bias is None else conv.bias - mean) * scale
    if bn.bias is not None:
        bias = bias + bn.bias
    folded = weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1))
    return _CONVS[type(conv)](
        x, folded, bias, conv.stride, conv.padding, conv.dilation, conv.groups
    )


def _foldable_conv(module: nn.Module | None) -> bool:
    return (
        type(module) in _CONVS
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def fold_conv_batchnorm(model: nn.Module) -> nn.Module | None:
    """A ``GraphModule`` computing ``model`` with each conv -> BatchNorm pair folded.

    Args:
        model: Any module. It is traced (``torch.fx.symbolic_trace``), never changed.

    Returns:
        The folded module (sharing the model's submodules, parameters and buffers), or
        ``None`` when the model cannot be traced or has no pair to fold.
    """
    if not any(isinstance(m, _BATCHNORMS) for m in model.modules()):
        return None
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception:  # data-dependent control flow, unsupported ops: evaluate unfolded
        return None
    modules = dict(traced.named_modules())
    graph = traced.graph
    folded_any = False
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BATCHNORMS):
            continue
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if (
            not isinstance(source, torch.fx.Node)
            or source.op != "call_module"
            or not _foldable_conv(modules.get(source.target))
            or len(source.users) != 1
            or len(source.args) != 1
            or source.kwargs
        ):
            continue
        with graph.inserting_before(node):
            conv = graph.get_attr(source.target)
            bn = graph.get_attr(node.target)
            fused = graph.call_function(conv_batchnorm, (source.args[0], conv, bn))
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        graph.erase_node(source)
        folded_any = True
    if not folded_any:
        return None
    graph.lint()
    return torch.fx.GraphModule(traced, graph)
