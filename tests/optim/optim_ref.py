"""Dense float64 references for the optimizer tests.

A :class:`FlatProblem` is the loss of a model over one fixed batch as a function of one flat
parameter vector, differentiated with ``torch.func`` (never through the optimizers), so every
formula in the tests is written on plain vectors.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call


class FlatProblem:
    """L(theta) = loss_fn(model(x; theta), y) over one batch, theta a flat float64 vector.

    ``train=True`` evaluates BatchNorm with batch statistics (as a training step does);
    buffers are copied so the model is never written to.
    """

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
        *,
        train: bool = False,
    ) -> None:
        self.model = copy.deepcopy(model).train(train)
        self.x, self.y, self.loss_fn = x, y, loss_fn
        named = list(self.model.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        parts = theta.split(self.numels)
        return {n: c.view(s) for n, c, s in zip(self.names, parts, self.shapes, strict=True)}

    def loss(self, theta: Tensor) -> Tensor:
        values = self.unflatten(theta)
        values.update({n: b.clone() for n, b in self.buffers.items()})
        out = functional_call(self.model, values, (self.x,), strict=False)
        return self.loss_fn(out, self.y).reshape(())

    def grad(self, theta: Tensor) -> Tensor:
        return torch.func.grad(self.loss)(theta.detach())

    def hessian(self, theta: Tensor) -> Tensor:
        return torch.func.hessian(self.loss)(theta.detach())


def flat(model: nn.Module) -> Tensor:
    """The model's parameters as one flat vector (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def make_closure(optimizer, model: nn.Module, x: Tensor, y: Tensor, loss_fn=None):
    """The documented closure; accepts ``create_graph`` so every mode can use it."""
    loss_fn = loss_fn or nn.functional.cross_entropy

    def closure(create_graph: bool = False) -> Tensor:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward(create_graph=create_graph)
        return loss

    return closure


def base_step_with(
    model: nn.Module, direction: Tensor, make_base: Callable[[list[nn.Parameter]], object]
) -> Tensor:
    """Flat parameters after one base-optimizer step on a copy of ``model`` whose gradient is
    set to ``direction``."""
    clone = copy.deepcopy(model)
    params = list(clone.parameters())
    base = make_base(params)
    offset = 0
    for p in params:
        p.grad = direction[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    base.step()
    return flat(clone)


def unit(v: Tensor, eps: float = 1e-12) -> Tensor:
    return v / (torch.linalg.vector_norm(v) + eps)
