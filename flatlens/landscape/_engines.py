"""Evaluators that compute the loss (and correct predictions) at a chunk of parameter points.

Both take a ``(C, n)`` tensor of flat parameter vectors and make one pass over the
objective's data, returning for each point the weighted loss sum S_k = sum_b w_b loss(B_b;
theta_k) in float64 (w_b = n_b for a mean-reduced loss, 1 for a summed one, accumulated
batch by batch in the same order as :class:`~flatlens.Objective`) and the number of correct
argmax predictions. The risk is then S_k / N (mean) or S_k (sum).

* :class:`VmapEvaluator`: per batch, one :func:`torch.func.vmap` call over the chunk of
  :meth:`Objective.forward` (``functional_call`` with batched parameters).
* :class:`SerialEvaluator`: per batch, one ordinary forward per point. It runs a private
  copy of the model whose parameters are views into one flat buffer, so moving to the next
  point is a single copy and the forward pays no ``functional_call`` overhead (with
  conv -> BatchNorm pairs folded as in :meth:`Objective.forward`); it falls
  back to :meth:`Objective.forward` when the model cannot be copied, when
  ``Objective.forward`` is overridden, or in train mode (``eval_mode=False``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from flatlens.core._fold_batchnorm import fold_conv_batchnorm
from flatlens.core._objective import Objective
from flatlens.core._params import eval_mode

__all__ = ["SerialEvaluator", "VmapEvaluator", "chunk_size_for", "per_point_bytes"]

ChunkResult = tuple[Tensor, Tensor, int]


def _weighted(objective: Objective, loss: Any, n: int) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn must return a scalar tensor; use a reduced loss")
    loss = loss.reshape(())
    return loss * n if objective.reduction == "mean" else loss


def _correct(out: Any, y: Any, classify: bool) -> Tensor:
    if not classify:
        return torch.zeros(
            (), dtype=torch.int64, device=y.device if isinstance(y, Tensor) else None
        )
    return (out.argmax(dim=-1) == y).sum()


def _reduce(objective: Objective, totals: Tensor, correct: Tensor, count: int) -> ChunkResult:
    if objective.distributed:
        import torch.distributed as dist

        counter = torch.tensor([float(count)], device=objective.device, dtype=torch.float64)
        dist.all_reduce(counter)
        dist.all_reduce(totals)
        dist.all_reduce(correct)
        count = int(counter.item())
    return totals, correct, count


class VmapEvaluator:
    """Evaluate a chunk of points with ``torch.func.vmap`` over :meth:`Objective.forward`."""

    name = "vmap"

    def __init__(self, objective: Objective, classify: bool) -> None:
        self.objective = objective
        self.classify = classify

    def __call__(self, thetas: Tensor) -> ChunkResult:
        with torch.no_grad(), eval_mode(self.objective.model, self.objective.eval_mode):
            return self._run(thetas)

    def _run(self, thetas: Tensor) -> ChunkResult:
        obj = self.objective
        totals = torch.zeros(len(thetas), device=obj.device, dtype=torch.float64)
        correct = torch.zeros(len(thetas), device=obj.device, dtype=torch.int64)
        count = 0
        for x, y, n in obj.batches():

            def point(theta: Tensor, x=x, y=y, n=n) -> tuple[Tensor, Tensor]:
                out = obj.forward(theta, x)
                return _weighted(obj, obj.loss_fn(out, y), n), _correct(out, y, self.classify)

            parts, hits = torch.func.vmap(point, randomness="error")(thetas)
            totals += parts
            correct += hits
            count += n
        return _reduce(obj, totals, correct, count)


def _working_copy(objective: Objective) -> tuple[nn.Module, Tensor] | None:
    """A deep copy of the model in eval mode whose selected parameters view one flat buffer."""
    if not objective.eval_mode or type(objective).forward is not Objective.forward:
        return None
    try:
        work = copy.deepcopy(objective.model)
    except Exception:  # models holding locks, process groups, open files, ...
        return None
    buf = objective.theta
    params = dict(work.named_parameters())
    for name, sl, shape in objective.space.segments():
        p = params[name]
        p.grad = None
        p.data = buf[sl].view(shape)
    work.requires_grad_(False)
    work.eval()
    if objective._evaluation_module() is not objective.model:
        # Fold conv -> BatchNorm pairs as the Objective does, so the arithmetic is the same.
        work = fold_conv_batchnorm(work) or work
    return work, buf


class SerialEvaluator:
    """Evaluate a chunk of points one forward at a time (the reference and CPU path)."""

    name = "serial"

    def __init__(self, objective: Objective, classify: bool, *, use_copy: bool = True) -> None:
        self.objective = objective
        self.classify = classify
        made = _working_copy(objective) if use_copy else None
        self._work, self._buf = made if made is not None else (None, None)

    @property
    def uses_copy(self) -> bool:
        """Whether the fast private-copy path is in use."""
        return self._work is not None

    def __call__(self, thetas: Tensor) -> ChunkResult:
        with torch.no_grad(), eval_mode(self.objective.model, self.objective.eval_mode):
            return self._run(thetas)

    def _run(self, thetas: Tensor) -> ChunkResult:
        # The per-point loop is kept lean (the forward of a small model takes well under a
        # millisecond): no per-point checks or reshapes, one stack per batch.
        obj, work, buf = self.objective, self._work, self._buf
        points = thetas.unbind(0)
        totals = torch.zeros(len(points), device=obj.device, dtype=torch.float64)
        correct = torch.zeros(len(points), device=obj.device, dtype=torch.int64)
        count = 0
        for x, y, n in obj.batches():
            losses, hits = [], []
            for theta in points:
                if work is None:
                    out = obj.forward(theta, x)
                else:
                    buf.copy_(theta)
                    out = work(x)
                losses.append(obj.loss_fn(out, y))
                if self.classify:
                    hits.append(_correct(out, y, True))
            totals += _stack_weighted(obj, losses, n)
            if self.classify:
                correct += torch.stack(hits).to(correct.device)
            count += n
        return _reduce(obj, totals, correct, count)


def _stack_weighted(objective: Objective, losses: list[Any], n: int) -> Tensor:
    """``stack(losses) * n_b`` (mean) or ``stack(losses)`` (sum): the same products, element
    by element, as ``loss.reshape(()) * n_b`` in the Objective."""
    if not all(isinstance(v, Tensor) and v.numel() == 1 for v in losses):
        raise ValueError("loss_fn must return a scalar tensor; use a reduced loss")
    if any(v.dim() for v in losses):
        losses = [v.reshape(()) for v in losses]
    stacked = torch.stack(losses)
    return stacked * n if objective.reduction == "mean" else stacked


def per_point_bytes(objective: Objective, theta: Tensor) -> int:
    """Rough memory one vmapped point needs: the outputs of every leaf module on the first
    batch (an upper bound on what inference keeps alive) plus three parameter vectors."""
    total = 0

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        for t in output if isinstance(output, tuple | list) else (output,):
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()

    leaves = [m for m in objective.model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            for x, _, _ in objective.batches():
                out = objective.forward(theta, x)
                if total == 0 and isinstance(out, Tensor):
                    total = out.numel() * out.element_size()
                break
    finally:
        for h in handles:
            h.remove()
    return total + 3 * objective.num_params * theta.element_size()


def chunk_size_for(objective: Objective, theta: Tensor, num_points: int) -> int:
    """Points per vmapped call: as many as fit half the free accelerator memory (1 GiB on
    the CPU), at most 256 on an accelerator and 16 on the CPU (where larger chunks measured
    slower: their activations fall out of the caches)."""
    per_point = max(per_point_bytes(objective, theta), 1)
    if objective.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(objective.device)
        budget, cap = free // 2, 256
    else:
        budget, cap = 1 << 30, 16
    return int(max(1, min(cap, num_points, budget // per_point)))
