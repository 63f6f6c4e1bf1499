"""Eval-mode BatchNorm folded into the convolution before it: a cheaper forward pass and
cheaper derivatives of the same function.

In eval mode a BatchNorm layer after a convolution is an affine map per output channel,

    BN(conv(x; W, c)) = conv(x; W * s, (c - mu) * s + beta),    s = gamma / sqrt(sigma^2 + eps),

so the pair is one convolution with rescaled weights and bias. Written that way, the
BatchNorm's elementwise work over the activations disappears from the forward pass and from
the first- and second-order graphs; only the (small) weights are rescaled. On the digits
BatchNorm CNN a Hessian-vector product through the cached graph took 0.115 s against 0.173 s
with the affine BatchNorm of :mod:`flatlens.affine_batchnorm` alone; a forward pass over 256
images 8.6 ms against 10.0 ms on a loaded machine (3.9 against 6.3 ms on a quiet one), and a
loss-landscape point 9% less CPU time. :class:`~flatlens.Objective` evaluates every eval-mode
pass this way.

:func:`fold_conv_batchnorm` finds the pairs with ``torch.fx``: a ``Conv1d/2d/3d`` whose output
feeds only a BatchNorm with running statistics, neither with hooks. It returns a
``GraphModule`` that shares the model's submodules, parameters and buffers (same qualified
names, so ``functional_call`` with the model's names works on it) and computes each pair as
one convolution. A BatchNorm that is in train mode when called, has no running statistics, or
has another dtype than the convolution runs unchanged. The folded value equals the original
up to rounding of the same order as the convolution's own (float64: ~1e-16 relative).

Outside autograd (loss values, loss landscapes), a folded float32 ``Conv2d`` on the CPU runs
on channels-last tensors, which oneDNN convolves without reordering, where every consumer of
its output (followed up to a flatten or reshape) is a built-in module or a layout-free
operation: a landscape point of the digits CNN took 3.8 ms against 4.4 ms (median of 25
interleaved chunks of 16 points), with bit-identical losses there (on other models the
layouts differ by rounding, about 1e-7 relative). A ``view`` of the output,
a user-defined module or function, or the model's output itself keeps the default layout
(converting back after each convolution measured 15% slower than not converting at all).
Gradients and Hessian-vector products keep the default layout.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from flatlens.affine_batchnorm import eval_scale

__all__ = ["conv_batchnorm", "fold_conv_batchnorm", "hooks_added"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def conv_batchnorm(
    x: Tensor, conv: nn.Module, bn: nn.Module, *, channels_last: bool = False
) -> Tensor:
    """``bn(conv(x))``, as one convolution with folded weights when ``bn`` is in eval mode.

    With ``channels_last`` (set by :func:`fold_conv_batchnorm` where every consumer of the
    output is indifferent to memory layout), a float32 2-D convolution on the CPU outside
    autograd runs on channels-last tensors and returns a channels-last output.
    """
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
    scale = eval_scale(var, bn.eps, bn.weight)
    centred = -mean if conv.bias is None else conv.bias - mean
    bias = centred * scale
    if bn.bias is not None:
        bias = bias + bn.bias
    folded = weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1))
    if channels_last and _inference_on_cpu(x, folded):
        # oneDNN convolves channels-last float32 tensors without reordering them: a forward
        # of the digits CNN took 0.80x the time. Derivatives keep the default layout, which
        # measured as fast or faster inside Hessian-vector products.
        x = x.contiguous(memory_format=torch.channels_last)
        folded = folded.contiguous(memory_format=torch.channels_last)
    return conv._conv_forward(x, folded, bias)


def _inference_on_cpu(x: Tensor, weight: Tensor) -> bool:
    """A float32 2-D convolution on the CPU, outside autograd and torch.func transforms."""
    return (
        not torch.is_grad_enabled()
        and x.dim() == weight.dim() == 4
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
        and not torch._C._functorch.is_functorch_wrapped_tensor(weight)
    )


# Consumers whose result does not depend on the memory layout of a tensor argument (the walk
# goes on to their own consumers), and those whose result is a fresh row-major tensor or not
# a tensor at all (the walk stops). Anything else -- ``view``, a user-defined module or
# function, the graph's output -- might depend on the layout.
_LAYOUT_FREE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
    operator.getitem, torch.add, torch.mul, torch.cat, torch.relu, torch.sigmoid, torch.tanh,
    F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish, F.dropout,
    F.avg_pool2d, F.max_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, conv_batchnorm,
}  # fmt: skip
_LAYOUT_FREE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "add", "add_", "mul", "mul_"}
_LAYOUT_RESET_FUNCTIONS = {torch.flatten, getattr}
_LAYOUT_RESET_METHODS = {"flatten", "reshape", "contiguous", "size", "dim"}


def _layout_free_downstream(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether every consumer of ``node``'s output, followed until a reshape or flatten, is
    indifferent to its memory layout (so a channels-last output computes the same values)."""
    pending, seen = list(node.users), set()
    while pending:
        user = pending.pop()
        if user in seen:
            continue
        seen.add(user)
        if user.op == "call_function":
            if user.target in _LAYOUT_RESET_FUNCTIONS:
                continue
            free = user.target in _LAYOUT_FREE_FUNCTIONS
        elif user.op == "call_method":
            if user.target in _LAYOUT_RESET_METHODS:
                continue
            free = user.target in _LAYOUT_FREE_METHODS
        elif user.op == "call_module":
            module = modules.get(user.target)
            if isinstance(module, nn.Flatten):
                continue
            free = type(module).__module__.startswith("torch.nn.")
        else:  # the graph's output: the caller's loss sees the layout
            free = False
        if not free:
            return False
        pending.extend(user.users)
    return True


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or getattr(module, "_forward_hooks_with_kwargs", None)
        or module._backward_hooks
    )


def fold_conv_batchnorm(model: nn.Module) -> nn.Module | None:
    """A ``GraphModule`` computing ``model`` with each conv -> BatchNorm pair folded.

    Args:
        model: Any module. It is traced (``torch.fx.symbolic_trace``), never changed.

    Returns:
        The folded module (sharing the model's submodules, parameters and buffers), or
        ``None`` when the model cannot be traced or has no pair to fold.
    """
    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        return None
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception:  # data-dependent control flow, unsupported ops: evaluate unfolded
        return None
    modules = dict(traced.named_modules())
    graph = traced.graph
    pairs: list[tuple[nn.Module, nn.Module]] = []
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BatchNorm):
            continue
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if (
            not isinstance(source, torch.fx.Node)
            or source.op != "call_module"
            or type(modules.get(source.target)) not in _CONVS
            or len(source.users) != 1
            or len(source.args) != 1
            or source.kwargs
            or _has_hooks(modules[source.target])
            or _has_hooks(modules[node.target])
        ):
            continue
        with graph.inserting_before(node):
            conv = graph.get_attr(source.target)
            bn = graph.get_attr(node.target)
            fused = graph.call_function(conv_batchnorm, (source.args[0], conv, bn))
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        graph.erase_node(source)
        pairs.append((modules[source.target], modules[node.target]))
    if not pairs:
        return None
    for node in graph.nodes:
        if node.op == "call_function" and node.target is conv_batchnorm:
            node.kwargs = {"channels_last": _layout_free_downstream(node, modules)}
    graph.lint()
    folded = torch.fx.GraphModule(traced, graph)
    folded._flatlens_pairs = pairs
    return folded


def hooks_added(folded: nn.Module) -> bool:
    """Whether a convolution or BatchNorm folded by :func:`fold_conv_batchnorm` has gained a
    hook since (the folded module would not run it: evaluate the model itself instead)."""
    return any(_has_hooks(m) for pair in getattr(folded, "_flatlens_pairs", ()) for m in pair)
