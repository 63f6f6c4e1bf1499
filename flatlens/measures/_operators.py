"""Symmetric operators the spectrum measures accept besides an :class:`~flatlens.Objective`.

:func:`as_operator` turns any of these into one counted product ``v -> A v`` on flat torch
vectors:

* an :class:`~flatlens.Objective` (the Hessian at ``at``, one HVP per product);
* a :class:`SymmetricOperator` (a callable ``v -> A v`` plus its size);
* a ``scipy.sparse.linalg.LinearOperator``, a SciPy sparse matrix or a NumPy array, or any
  object with ``shape`` and ``matvec`` (float64 NumPy in and out, on the CPU);
* a square 2-D torch tensor, or a torch operator with ``shape``, ``dtype``, ``device`` and
  ``@`` on a vector and on an (n, b) matrix, such as curvlinops' ``HessianLinearOperator``
  and ``GGNLinearOperator`` (curvlinops 2.x operators are SciPy operators and take the
  SciPy path).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flatlens.core._objective import Objective
from flatlens.core._sharding import random_vector

__all__ = ["Operator", "SymmetricOperator", "as_operator"]


class SymmetricOperator:
    """A symmetric linear operator A on flat torch vectors of length n.

    Args:
        matvec: ``v -> A v`` for a 1-D tensor of length ``n`` on ``device`` in ``dtype``.
        n: The dimension.
        dtype: dtype of the vectors (default float64).
        device: Device of the vectors (default the CPU).
        matmat: Optional ``V -> A V`` for an (n, b) tensor of b columns, used to batch the
            final residual checks; default: one ``matvec`` per column.

    The measures trust that A is symmetric; they do not check it.
    """

    def __init__(
        self,
        matvec: Callable[[Tensor], Tensor],
        n: int,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        matmat: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if not callable(matvec):
            raise TypeError("matvec must be callable as matvec(v) -> A v")
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"n must be an integer >= 2, got {n!r}")
        self._matvec, self._matmat = matvec, matmat
        self.n, self.dtype, self.device = n, dtype, torch.device(device)

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, n)``."""
        return (self.n, self.n)

    def matvec(self, v: Tensor, /) -> Tensor:
        """A v for a flat vector v."""
        return self._matvec(v)

    def matmat(self, x: Tensor, /) -> Tensor:
        """A X for an (n, b) tensor X."""
        if self._matmat is not None:
            return self._matmat(x)
        return torch.stack([self._matvec(x[:, i]) for i in range(x.shape[1])], dim=1)

    def __matmul__(self, x: Tensor) -> Tensor:
        return self.matvec(x) if x.dim() == 1 else self.matmat(x)

    def __repr__(self) -> str:
        return f"SymmetricOperator(n={self.n}, dtype={self.dtype}, device={self.device})"


class Operator:
    """What the solvers use: counted products on flat vectors of one device and dtype.

    Attributes:
        n, dtype, device: The space.
        objective, point: The Objective behind it and the parameters where its Hessian is
            taken, if any (for the gradient start).
        count: Products applied so far (one per vector, batched or not).
        batched: Whether ``matmat`` is one call for many vectors.
    """

    def __init__(
        self,
        matvec: Callable[[Tensor], Tensor],
        n: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        matmat: Callable[[Tensor], Tensor] | None = None,
        objective: Objective | None = None,
        point: Tensor | None = None,
    ) -> None:
        self._matvec, self._matmat = matvec, matmat
        self.point = point
        self.n, self.dtype, self.device = n, dtype, torch.device(device)
        self.objective = objective
        self.fresh = objective is not None  # each product is a new tensor (may be modified)
        self.batched = matmat is not None
        self.count = 0
        self.on_product: Callable[[int], None] | None = None

    def _check(self, out: Any, shape: tuple[int, ...]) -> Tensor:
        out = torch.as_tensor(out)
        if tuple(out.shape) != shape:
            raise ValueError(f"the operator returned shape {tuple(out.shape)}, expected {shape}")
        return out.to(self.device, self.dtype)

    def _counted(self, b: int) -> None:
        self.count += b
        if self.on_product is not None:
            self.on_product(b)

    def matvec(self, v: Tensor) -> Tensor:
        """A v for a flat vector on the operator's device."""
        out = self._check(self._matvec(v), (self.n,))
        self._counted(1)
        return out

    def matmat(self, rows: Tensor) -> Tensor:
        """A applied to each row of a (b, n) tensor; one batched call when supported."""
        if self._matmat is None:
            return torch.stack([self.matvec(r) for r in rows])
        out = self._check(self._matmat(rows.T.contiguous()), (self.n, rows.shape[0]))
        self._counted(rows.shape[0])
        return out.T.contiguous()

    def random(self, generator: torch.Generator, kind: str = "gaussian") -> Tensor:
        """A random flat vector, drawn on the CPU in float64 (the same on every device/rank;
        on a sharded objective this rank's entries of the one-process vector)."""
        return random_vector(self.n, generator, kind, device=self.device, dtype=self.dtype)


def _square(shape: Any) -> int:
    try:
        rows, cols = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise TypeError(f"an operator needs a 2-D shape, got {shape!r}") from None
    if rows != cols or rows < 2:
        raise ValueError(f"the operator must be square with n >= 2, got shape {shape!r}")
    return rows


def _from_scipy(op: Any) -> Operator:
    from scipy.sparse.linalg import aslinearoperator

    lin = aslinearoperator(op)
    n = _square(lin.shape)

    def matvec(v: Tensor) -> Tensor:
        x = v.detach().to("cpu", torch.float64).numpy()
        return torch.from_numpy(np.asarray(lin.matvec(x), dtype=np.float64).reshape(-1))

    def matmat(x: Tensor) -> Tensor:
        out = lin.matmat(x.detach().to("cpu", torch.float64).numpy())
        return torch.from_numpy(np.asarray(out, dtype=np.float64).reshape(n, -1))

    return Operator(matvec, n, torch.float64, torch.device("cpu"), matmat=matmat)


def as_operator(op: Any, at: Tensor | None = None) -> Operator:
    """The counted operator behind an Objective (its Hessian at ``at``) or any operator above.

    Raises:
        TypeError: ``op`` is none of the supported kinds (a bare callable needs its size:
            wrap it in :class:`SymmetricOperator`).
        ValueError: ``at`` with something other than an Objective; a non-square operator.
    """
    if isinstance(op, Operator):
        if at is not None:
            raise ValueError("at= applies to an Objective only")
        return op
    if isinstance(op, Objective):
        theta = op.point(at)
        return Operator(
            lambda v: op.hvp(v, at=theta),
            op.num_params,
            op.dtype,
            op.device,
            objective=op,
            point=theta,
        )
    if at is not None:
        raise ValueError("at= applies to an Objective only; an operator has one fixed point")
    if isinstance(op, SymmetricOperator):
        return Operator(op.matvec, op.n, op.dtype, op.device, matmat=op.matmat)
    if isinstance(op, Tensor):
        if op.dim() != 2:
            raise ValueError(f"a tensor operator must be a square matrix, got {tuple(op.shape)}")
        n = _square(op.shape)
        return Operator(op.__matmul__, n, op.dtype, op.device, matmat=op.__matmul__)
    dtype, device = getattr(op, "dtype", None), getattr(op, "device", None)
    if isinstance(dtype, torch.dtype) and hasattr(op, "shape") and hasattr(op, "__matmul__"):
        n = _square(op.shape)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return Operator(op.__matmul__, n, dtype, dev, matmat=op.__matmul__)
    import scipy.sparse

    if isinstance(op, np.ndarray) or scipy.sparse.issparse(op):
        return _from_scipy(op)
    if hasattr(op, "shape") and hasattr(op, "matvec"):
        return _from_scipy(op)
    if callable(op):
        raise TypeError(
            "a bare callable has no size: wrap it as SymmetricOperator(matvec, n, dtype=..., "
            "device=...)"
        )
    raise TypeError(
        f"expected an Objective or a symmetric operator (SymmetricOperator, a SciPy "
        f"LinearOperator, a torch operator with @), not {type(op).__name__}"
    )
