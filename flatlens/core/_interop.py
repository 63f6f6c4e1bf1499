"""The Objective's ways out: its Hessian as a SciPy operator, and a copy in another dtype."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["InteropMixin"]


class InteropMixin:
    """:meth:`as_linear_operator` and ``_copy_in_dtype`` of :class:`~flatlens.Objective`."""

    def as_linear_operator(self, at: Tensor | None = None):
        """The Hessian at ``theta`` (or ``at``) as a ``scipy.sparse.linalg.LinearOperator``.

        Vectors are NumPy arrays in float64 on the CPU; each ``matvec`` runs one HVP on the
        model's device.
        """
        from scipy.sparse.linalg import LinearOperator

        point = self.point(at)
        n = self.num_params

        def matvec(x: np.ndarray) -> np.ndarray:
            vec = torch.as_tensor(np.ascontiguousarray(x).reshape(-1), dtype=self.dtype)
            hv = self.hvp(vec.to(self.device), at=point)
            return hv.detach().to("cpu", torch.float64).numpy()

        return LinearOperator((n, n), matvec=matvec, rmatvec=matvec, dtype=np.float64)

    def _copy_in_dtype(self, dtype: torch.dtype) -> Any:
        """The same risk over a deep copy of the model in ``dtype`` (floating parameters
        and buffers cast; data cast as it is prepared): for products in float64 that check
        the float32 ones. The check of exact products is not repeated."""
        model = copy.deepcopy(self.model).to(dtype)
        in_memory = isinstance(self._data, list)
        data = [(x, y) for x, y, _ in self._data] if in_memory else self._data
        kwargs = {**self._settings, "check_determinism": False, "check_hvp": False}
        kwargs["targets_key"] = self.targets_key
        if kwargs["hvp_method"] == "finite_difference":
            kwargs["hvp_method"] = "auto"
        return type(self)(model, self.loss_fn, data, params=list(self.space.names), **kwargs)
