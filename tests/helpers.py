"""Shared test helpers: tiny models, data, and dense float64 references.

The references never go through :class:`flatlens.Objective`: they concatenate all batches,
call the model with :func:`torch.func.functional_call` and differentiate with
``torch.func.jacrev`` and ``torch.autograd.functional.hessian`` (row by row). Not
``torch.func.hessian``: in torch 2.13 its vmapped forward-over-reverse gets the cross terms
of two stacked LayerNorms wrong (1.2 absolute on a 5-layer MLP with entries up to 6.4,
where finite differences and double backward agree to 1e-10). For a per-sample
decomposable loss,

* mean reduction: L(theta) = (1/N) sum_i loss(x_i, y_i; theta) = the full-batch mean loss,
* sum reduction:  L(theta) = sum_i loss(x_i, y_i; theta) = the full-batch summed loss,

which is exactly what the Objective must compute from uneven mini-batches.
"""

from __future__ import annotations

import copy
import functools
import os
import pickle
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "RHOS",
    "DenseReference",
    "InterruptingLoss",
    "ModelSnapshot",
    "OneShot",
    "Quadratic",
    "ReIterable",
    "bn_cnn",
    "classification_data",
    "dense_hessian",
    "dense_reference",
    "gloo_ranks",
    "image_data",
    "least_squares",
    "logistic_data",
    "logistic_hessian",
    "logistic_regression",
    "nonlinear_cases",
    "objective_reference",
    "quadratic_objective_parts",
    "regression_data",
    "regression_net",
    "rel_err",
    "relu_rescaled",
    "symmetric_with_spectrum",
    "tanh_classifier",
    "tiny_mlp",
    "uneven_batches",
    "with_unused",
]


# ---------------------------------------------------------------------------------- numbers
def rel_err(actual: Tensor, expected: Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (absolute when expected is 0)."""
    a = torch.as_tensor(actual).detach().to("cpu", torch.float64)
    e = torch.as_tensor(expected).detach().to("cpu", torch.float64)
    den = float(torch.linalg.vector_norm(e))
    num = float(torch.linalg.vector_norm(a - e))
    return num / den if den > 0 else num


def symmetric_with_spectrum(
    eigenvalues: Sequence[float] | Tensor, *, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """A dense symmetric float64 matrix ``Q diag(eigenvalues) Q^T`` with random orthogonal Q.

    Returns:
        ``(A, Q)``; the columns of Q are the eigenvectors.
    """
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(
        torch.randn(lam.numel(), lam.numel(), generator=gen, dtype=torch.float64)
    )
    q = q * torch.sign(torch.diagonal(r))
    a = (q * lam) @ q.T
    return (a + a.T) / 2, q


# ---------------------------------------------------------------------------------- models
def tiny_mlp(
    in_features: int = 4,
    hidden: int = 5,
    num_classes: int = 3,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> nn.Sequential:
    """Linear - tanh - Linear (smooth, so the Hessian is well defined everywhere).

    Parameter names: ``0.weight, 0.bias, 2.weight, 2.bias``.
    """
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, num_classes)
    ).to(dtype)


def tanh_classifier(in_features: int, num_classes: int, hidden: int = 5) -> nn.Sequential:
    """A ``package.module:factory`` model for the trainer and the CLI (``helpers:tanh_classifier``).

    Flatten - Linear - tanh - Linear in the default dtype, drawn from the global RNG (the
    caller seeds it); ``in_features`` and ``num_classes`` are filled in from the data set.
    """
    return nn.Sequential(
        nn.Flatten(), nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, num_classes)
    )


def logistic_regression(dim: int = 5, *, seed: int = 0) -> nn.Linear:
    """``nn.Linear(dim, 1)`` in float64: logit = w^T x + b."""
    torch.manual_seed(seed)
    model = nn.Linear(dim, 1).to(torch.float64)
    with torch.no_grad():
        model.weight.mul_(3.0)
    return model


class _WithUnused(nn.Module):
    """An MLP with an extra layer that the forward pass never reaches."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.body = tiny_mlp(dtype=dtype)
        self.unused = nn.Linear(2, 2).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def with_unused(*, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A tiny MLP (``body.*``) plus ``unused.weight``/``unused.bias`` that get no gradient."""
    torch.manual_seed(seed)
    return _WithUnused(dtype)


def bn_cnn(*, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Conv - BatchNorm - tanh - Linear on 1x4x4 images, with non-trivial running stats.

    The running statistics are set far from what the data would give, so a loss evaluated
    with batch statistics (train mode) differs clearly from one with running statistics.
    """
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, bias=False),
        nn.BatchNorm2d(2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).to(dtype)
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.3, -0.2], dtype=dtype))
        bn.running_var.copy_(torch.tensor([2.0, 0.5], dtype=dtype))
        bn.weight.copy_(torch.tensor([1.3, 0.7], dtype=dtype))
        bn.bias.copy_(torch.tensor([0.1, -0.4], dtype=dtype))
        bn.num_batches_tracked.fill_(7)
    return model


class Quadratic(nn.Module):
    """``forward(x)`` returns the parameter vector; with :func:`quadratic_objective_parts`
    the loss is 0.5 * theta^T A theta, whose Hessian is exactly A."""

    def __init__(self, n: int, *, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.theta = nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return self.theta + 0 * x.sum()


def quadratic_objective_parts(
    eigenvalues: Sequence[float] | Tensor, *, seed: int = 0
) -> tuple[Quadratic, Callable[[Tensor, Tensor], Tensor], tuple[Tensor, Tensor], Tensor]:
    """``(model, loss_fn, data, A)`` for the loss 0.5 theta^T A theta with spec(A) given."""
    a, _ = symmetric_with_spectrum(eigenvalues, seed=seed)
    model = Quadratic(a.shape[0], seed=seed)

    def loss_fn(out: Tensor, _target: Tensor) -> Tensor:
        return 0.5 * out @ (a.to(out.dtype) @ out)

    data = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    return model, loss_fn, data, a


# ---------------------------------------------------------------------------------- data
def classification_data(
    n: int = 23,
    in_features: int = 4,
    num_classes: int = 3,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """``(x, y)`` with standard normal features and uniform labels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return x, y


def image_data(
    n: int = 13, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """``(x, y)`` with x of shape ``(n, 1, 4, 4)`` for :func:`bn_cnn`."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, y


def logistic_data(n: int = 40, dim: int = 5, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(x, y)`` with float64 features and 0/1 float targets of shape ``(n, 1)``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (n, 1), generator=gen).to(torch.float64)
    return x, y


def logistic_hessian(model: nn.Linear, x: Tensor) -> Tensor:
    """Closed form Hessian of the mean logistic loss over (weight, bias):
    H = X~^T diag(p (1 - p)) X~ / N with X~ = [X, 1] and p = sigmoid(X~ [w; b])."""
    xt = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    with torch.no_grad():
        p = torch.sigmoid(model(x)).reshape(-1)
    return xt.T @ (xt * (p * (1 - p))[:, None]) / x.shape[0]


def uneven_batches(x: Tensor, y: Tensor, sizes: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    """Cut ``(x, y)`` into consecutive batches of the given sizes (which must sum to N)."""
    assert sum(sizes) == len(y)
    out, start = [], 0
    for s in sizes:
        out.append((x[start : start + s], y[start : start + s]))
        start += s
    return out


class ReIterable:
    """A re-iterable of batches made by ``make(pass_index)``: new data every pass if wanted."""

    def __init__(self, make: Callable[[int], list[tuple[Any, Any]]]) -> None:
        self.make = make
        self.passes = 0

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        batches = self.make(self.passes)
        self.passes += 1
        return iter(batches)


class OneShot:
    """An iterator over batches that is exhausted after one pass (``iter(self) is self``)."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        self._it = iter(batches)

    def __iter__(self) -> OneShot:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        return next(self._it)


# ---------------------------------------------------------------------------------- measures
# Problems shared by the R0, R1 and bound tests (test_sharpness, test_flatness, test_bounds).
RHOS = [1e-3, 1e-2, 0.1, 1.0]
"""Radii of the closed-form checks, from far inside the quadratic regime to well outside."""


def least_squares(
    n: int = 60, d: int = 6, seed: int = 0
) -> tuple[nn.Linear, tuple[Tensor, Tensor], Tensor]:
    """Linear regression with MSE at its least-squares minimum: L is exactly quadratic with
    Hessian H = 2 X~^T X~ / N (X~ = [X, 1]). Returns (model, (X, y), H)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(d, 1, generator=gen, dtype=torch.float64)
    y = y + 0.3 * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    xt = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    sol = torch.linalg.lstsq(xt, y).solution
    model = nn.Linear(d, 1).to(torch.float64)
    with torch.no_grad():
        model.weight.copy_(sol[:d].T)
        model.bias.copy_(sol[d])
    return model, (x, y), 2 * xt.T @ xt / n


_HIDDEN = 4


def _regression_mlp(act: str, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, _HIDDEN), getattr(nn, act)(), nn.Linear(_HIDDEN, 1)).double()


@functools.cache
def _teacher_problem(act: str) -> tuple[tuple[Tensor, Tensor], dict[str, Tensor]]:
    """Targets of a teacher network plus noise, and the teacher polished by L-BFGS: a point
    near a minimum of the student's loss (the teacher alone is already close to one)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=gen, dtype=torch.float64)
    model = _regression_mlp(act, seed=1)
    with torch.no_grad():
        y = model(x) + 0.1 * torch.randn(128, 1, generator=gen, dtype=torch.float64)
    opt = torch.optim.LBFGS(
        model.parameters(),
        max_iter=100,
        history_size=20,
        tolerance_grad=1e-10,
        tolerance_change=0,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    return (x, y), copy.deepcopy(model.state_dict())


def regression_data(act: str = "Tanh") -> tuple[Tensor, Tensor]:
    """``(x, y)``: 128 samples of 4 features, targets of a 4-4-1 teacher with ``act`` plus noise."""
    return _teacher_problem(act)[0]


def regression_net(act: str = "Tanh", trained: bool = True) -> nn.Module:
    """A 4-4-1 MLP: near a minimum of the regression loss, or at a random initialization."""
    if not trained:
        return _regression_mlp(act, seed=0)
    model = _regression_mlp(act, seed=1)
    model.load_state_dict(_teacher_problem(act)[1])
    return model


def nonlinear_cases() -> list[tuple[str, Any]]:
    """(name, objective): away from a minimum (classification at init) and near one."""
    from flatlens import Objective

    x, y = classification_data(40, 4, 3, seed=1)
    away = Objective(tiny_mlp(4, 5, 3, seed=1), nn.CrossEntropyLoss(), (x, y))
    near_tanh = Objective(regression_net("Tanh"), nn.MSELoss(), regression_data("Tanh"))
    near_relu = Objective(regression_net("ReLU"), nn.MSELoss(), regression_data("ReLU"))
    return [("away", away), ("near-tanh", near_tanh), ("near-relu", near_relu)]


def relu_rescaled(model: nn.Sequential, c: float) -> nn.Sequential:
    """ReLU(c (W x + b)) = c ReLU(W x + b): scale layer 0 by c and layer 2's weight by 1/c.

    The copy computes the same function, so scale-invariant measures must not change.
    """
    out = copy.deepcopy(model)
    with torch.no_grad():
        out[0].weight.mul_(c)
        out[0].bias.mul_(c)
        out[2].weight.div_(c)
    return out


class InterruptingLoss(nn.Module):
    """A cross-entropy loss that raises KeyboardInterrupt on its k-th call (never for k < 1)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k, self.calls = k, 0

    def forward(self, out: Tensor, target: Tensor) -> Tensor:
        self.calls += 1
        if self.calls == self.k:
            raise KeyboardInterrupt
        return nn.functional.cross_entropy(out, target)


# ---------------------------------------------------------------------------------- references
@dataclass
class DenseReference:
    """Loss, gradient and Hessian of the full-data risk, in float64."""

    loss: float
    gradient: Tensor
    hessian: Tensor

    @property
    def eigenvalues(self) -> Tensor:
        """Ascending eigenvalues of the (symmetrized) Hessian."""
        return torch.linalg.eigvalsh((self.hessian + self.hessian.T) / 2)


def _concat(batches: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def dense_reference(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    data: tuple[Tensor, Tensor] | Sequence[tuple[Tensor, Tensor]],
    names: Sequence[str] | None = None,
    *,
    train: bool = False,
    at: Tensor | None = None,
) -> DenseReference:
    """Dense float64 loss, gradient and Hessian over ``names`` (default: every parameter).

    Works on a float64 deep copy of ``model`` (so a float32 model gets a float64 reference).
    ``loss_fn`` is called once on all samples; for ``reduction="mean"`` it must return the
    mean over samples, for ``"sum"`` the sum.

    Args:
        model: The network (not modified).
        loss_fn: Per-sample decomposable, mean- or sum-reduced as ``reduction`` says.
        data: One ``(x, y)`` pair or a list of them (concatenated).
        names: Parameter names spanning the flat vector, in this order.
        train: Evaluate in train mode (batch statistics) instead of eval mode.
        at: Flat float64 point; default the model's parameters.
    """
    ref = copy.deepcopy(model).to(torch.float64)
    ref.train(train)
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        x, y = data
    else:
        x, y = _concat(list(data))
    x = x.to(torch.float64) if x.is_floating_point() else x
    y = y.to(torch.float64) if y.is_floating_point() else y
    params = dict(ref.named_parameters())
    names = list(names) if names is not None else list(params)
    shapes = [params[n].shape for n in names]
    numels = [s.numel() for s in shapes]
    theta0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    theta = theta0 if at is None else at.detach().to("cpu", torch.float64)
    buffers = {n: b.clone() for n, b in ref.named_buffers()}

    def risk(flat: Tensor) -> Tensor:
        values = {n: c.view(s) for n, c, s in zip(names, flat.split(numels), shapes, strict=True)}
        values.update({n: b.clone() for n, b in buffers.items()})
        return loss_fn(functional_call(ref, values, (x,), strict=False), y).reshape(())

    loss = float(risk(theta))
    grad = torch.func.jacrev(risk)(theta).detach()
    hess = torch.autograd.functional.hessian(risk, theta).detach()
    return DenseReference(loss, grad, hess)


def dense_hessian(objective: Any, at: Tensor | None = None) -> Tensor:
    """Dense float64 Hessian of an Objective's risk, built without the Objective's HVP.

    Uses only the Objective's model, loss function, reduction, eval-mode flag, parameter
    names and one pass of its batches (concatenated); the loss function must be per-sample
    decomposable.
    """
    return _objective_reference(objective, at).hessian


def _objective_reference(objective: Any, at: Tensor | None = None) -> DenseReference:
    batches = [(x, y) for x, y, _ in objective.batches()]
    x, y = _concat(batches)
    return dense_reference(
        objective.model,
        objective.loss_fn,
        (x, y),
        objective.space.names,
        train=not objective.eval_mode,
        at=at,
    )


def objective_reference(objective: Any, at: Tensor | None = None) -> DenseReference:
    """Dense float64 loss, gradient and Hessian of an Objective's risk (see
    :func:`dense_hessian`)."""
    return _objective_reference(objective, at)


# ---------------------------------------------------------------------------------- state
def _bytes(t: Tensor) -> Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


@dataclass
class ModelSnapshot:
    """Everything about a model that a measurement must leave exactly as it was."""

    tensors: dict[str, Tensor]
    data_ptrs: dict[str, int]
    ids: dict[str, int]
    training: dict[str, bool]
    requires_grad: dict[str, bool]
    grads: dict[str, Tensor | None]

    @classmethod
    def take(cls, model: nn.Module) -> ModelSnapshot:
        """Copy parameters, buffers, storage pointers, flags and ``.grad`` fields."""
        named = [*model.named_parameters(), *model.named_buffers()]
        return cls(
            tensors={n: t.detach().clone() for n, t in named},
            data_ptrs={n: t.data_ptr() for n, t in named},
            ids={n: id(t) for n, t in named},
            training={n: m.training for n, m in model.named_modules()},
            requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
            grads={
                n: None if p.grad is None else p.grad.detach().clone()
                for n, p in model.named_parameters()
            },
        )

    def assert_unchanged(self, model: nn.Module) -> None:
        """Fail unless the model is bit-for-bit what it was when the snapshot was taken."""
        now = ModelSnapshot.take(model)
        assert now.tensors.keys() == self.tensors.keys()
        for name, saved in self.tensors.items():
            live = now.tensors[name]
            assert live.dtype == saved.dtype and live.shape == saved.shape, name
            # Bit-for-bit: compare the raw bytes, so -0.0 vs 0.0 and NaN payloads count too.
            assert torch.equal(_bytes(live), _bytes(saved)), f"{name} changed"
        assert now.data_ptrs == self.data_ptrs, "a parameter or buffer was reallocated"
        assert now.ids == self.ids, "a parameter or buffer object was replaced"
        assert now.training == self.training, "train/eval flags changed"
        assert now.requires_grad == self.requires_grad, "requires_grad flags changed"
        for name, g in self.grads.items():
            h = now.grads[name]
            assert (g is None) == (h is None), f"{name}.grad changed"
            if g is not None:
                assert torch.equal(g, h), f"{name}.grad changed"


# ---------------------------------------------------------------------------------- processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, work: Callable[[int, Path], Any], world: int, port: int, tmp: str):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        result = work(rank, Path(tmp))
        with open(Path(tmp) / f"rank{rank}.pkl", "wb") as fh:
            pickle.dump(result, fh)
    finally:
        dist.destroy_process_group()


def gloo_ranks(
    work: Callable[[int, Path], Any], tmp: Path, *, world: int = 2, timeout_s: float = 60.0
) -> list[Any]:
    """Run ``work(rank, tmp)`` in ``world`` spawned processes joined in a Gloo process group
    (one torch thread each) and return each rank's (pickled) result, in rank order.

    ``work`` must be a module-level function (the processes are spawned). Fails the test when
    the processes outlive ``timeout_s`` (they are killed) or one of them raises.
    """
    import pytest
    import torch.multiprocessing as mp

    context = mp.start_processes(
        _gloo_rank, args=(work, world, _free_port(), str(tmp)), nprocs=world, join=False
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=0.5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world} processes did not finish within {timeout_s} s")
    results = []
    for r in range(world):
        with open(Path(tmp) / f"rank{r}.pkl", "rb") as fh:
            results.append(pickle.load(fh))
    return results


def import_model_library(name: str):
    """``timm``/``transformers``/``torchvision``, or skip the test with a reason.

    torchvision is imported first through :func:`flatlens._compat.import_torchvision`: with
    PyPI's wheel beside the CPU torch its C++ operators do not load, and the libraries that
    import it would fail (see that module).
    """
    import importlib.util

    import pytest

    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed (the 'models' extra)")
    if importlib.util.find_spec("torchvision") is not None:
        from flatlens._compat import import_torchvision

        import_torchvision()
    return importlib.import_module(name)
