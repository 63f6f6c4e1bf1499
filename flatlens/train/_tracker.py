"""Flatness tracked during training at low cost: warm starts, budgets, forward-only λ_c.

A :class:`FlatnessTracker` measures one network again and again on one fixed subset of the
training data (every few epochs or steps of a run), and keeps what makes the next
measurement cheap:

* λ_max warm-starts Lanczos from the previous top eigenvector (the Hessian moves little
  between two measurements), mixed with the cold start's vector so that a top eigenvector
  that rotated away stays in reach; the eigenpair is certified exactly as a cold start's
  is (:func:`~flatlens.measures.hessian_eigenvalues`, ``start=`` a tensor);
* R0 and R1 start their ascents from that eigenvector (their ``"eigen"`` start) and run
  under a budget of HVP-equivalents (40 by default; an HVP counts 1, a gradient 1/2, a loss
  1/4, see :class:`~flatlens.measures.AscentConfig`);
* the critical sharpness λ_c = 2 / η_c along the optimizer's update
  (:func:`~flatlens.measures.critical_sharpness`) costs forward passes only, is taken on the
  loss the optimizer descends (batch statistics, no dropout) and starts its search from the
  last η_c.

Every measurement reports what it cost (products, gradients, losses, seconds). The Trainer
uses one tracker; the Lightning and Hugging Face callbacks can use the same.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flatlens.core._checks import check_positive, check_positive_int, check_rho
from flatlens.core._objective import Objective
from flatlens.core._params import preserved
from flatlens.train._measures import check_measures

__all__ = ["FlatnessTracker"]

_EQUIVALENTS = {"hvp": 1.0, "gradient": 0.5, "loss": 0.25}


@contextlib.contextmanager
def _batch_statistics(model: nn.Module) -> Iterator[None]:
    """Train mode without dropout for the block (the caller restores the modes)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    yield


def _cost(before: dict[str, int], after: dict[str, int], seconds: float) -> dict[str, Any]:
    spent = {k: after[k] - before[k] for k in _EQUIVALENTS}
    return {
        "hvps": spent["hvp"],
        "gradients": spent["gradient"],
        "losses": spent["loss"],
        "hvp_equivalents": sum(_EQUIVALENTS[k] * v for k, v in spent.items()),
        "seconds": seconds,
    }


class FlatnessTracker:
    """Repeated flatness measures of one network on one fixed data subset.

    Args:
        model: The network (read, never changed: every measure restores it exactly).
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced.
        data: The fixed subset: an ``(inputs, targets)`` pair of tensors, or batches as
            :class:`~flatlens.Objective` takes them. Evaluated in eval mode.
        measures: Which of ``"lambda_max"``, ``"trace"``, ``"r0"``, ``"r1"``
            :meth:`measure` takes (λ_c has its own :meth:`critical`).
        measure_rho: Radius of R0 and R1.
        measure_steps: Ascent steps per start of R0 and R1 (before the budget).
        measure_budget: Cap on each of R0 and R1 in HVP-equivalents (None: no cap).
        trace_probes: Probes of the Hutch++ trace.
        tol: Relative tolerance of λ_max (1e-4, as every eigen solve in flatlens).
        warm_start: Start λ_max from the previous eigenvector and λ_c from the previous η_c.
        bracket_width: Relative width of λ_c's bracket (1/16).
        seed: Seeds every random start (the same for every measurement).
        batch_size: Examples per batch of the subset.
        distributed: Sum over the ranks of ``torch.distributed`` (each passes its shard).

    Example::

        tracker = FlatnessTracker(model, loss_fn, (x_subset, y_subset), measures=["lambda_max"])
        for epoch in range(epochs):
            ...  # train
            values = tracker.measure()   # {"lambda_max": ..., "cost": {...}}
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        *,
        measures: Sequence[str] = ("lambda_max",),
        measure_rho: float = 0.05,
        measure_steps: int = 20,
        measure_budget: float | None = 40.0,
        trace_probes: int = 30,
        tol: float = 1e-4,
        warm_start: bool = True,
        bracket_width: float = 1 / 16,
        seed: int = 0,
        batch_size: int = 512,
        distributed: bool = False,
    ) -> None:
        self.model, self.loss_fn = model, loss_fn
        self.measures = check_measures(measures)
        self.measure_rho = check_rho(measure_rho, "measure_rho")
        self.measure_steps = check_positive_int("measure_steps", measure_steps)
        self.measure_budget = (
            None if measure_budget is None else check_positive("measure_budget", measure_budget)
        )
        self.trace_probes = check_positive_int("trace_probes", trace_probes, 3)
        self.tol = check_positive("tol", tol)
        self.warm_start = bool(warm_start)
        self.bracket_width = check_positive("bracket_width", bracket_width)
        self.seed = check_positive_int("seed", seed, 0)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.distributed = distributed
        self._data = self._batches(data)
        self._checked = False
        self.eigenvector: Tensor | None = None
        self.eta: float | None = None
        self.totals: dict[str, dict[str, float]] = {}

    def _batches(self, data: Any) -> Any:
        if isinstance(data, tuple | list) and len(data) == 2 and torch.is_tensor(data[1]):
            x, y = data
            return [
                (x[i : i + self.batch_size], y[i : i + self.batch_size])
                for i in range(0, len(y), self.batch_size)
            ]
        return data

    def objective(self) -> Objective:
        """The risk over the subset at the model's current parameters (eval mode)."""
        obj = Objective(
            self.model,
            self.loss_fn,
            self._data,
            eval_mode=True,
            distributed=self.distributed,
            check_determinism=not self._checked,
        )
        self._checked = True
        return obj

    def _add(self, name: str, cost: dict[str, Any]) -> None:
        total = self.totals.setdefault(name, {"count": 0})
        total["count"] += 1
        for key, value in cost.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value

    # ------------------------------------------------------------------ the measures
    def measure(self) -> dict[str, Any]:
        """λ_max, tr(H), R0 and R1 (those in ``measures``) now.

        Returns:
            ``{name: value}`` for each measure, plus ``"cost"``: ``{name: {"hvps",
            "gradients", "losses", "hvp_equivalents", "seconds", ...}}`` (λ_max also
            ``"start"``: ``"given"`` for a warm start, and ``"converged"``).
        """
        from flatlens.measures._config import AscentConfig
        from flatlens.measures._flatness import first_order_flatness
        from flatlens.measures._sharpness import zeroth_order_sharpness
        from flatlens.measures._spectrum import hessian_eigenvalues, hessian_trace

        obj = self.objective()
        out: dict[str, Any] = {}
        costs: dict[str, dict[str, Any]] = {}

        def timed(name: str, fn):
            before, start = dict(obj.counts), time.perf_counter()
            result = fn()
            costs[name] = _cost(before, obj.counts, time.perf_counter() - start)
            return result

        eigen = None
        if {"lambda_max", "r0", "r1"} & set(self.measures):
            warm = self.warm_start and self.eigenvector is not None

            def solve():
                start = self._warm_start(obj) if warm else "gradient"
                return hessian_eigenvalues(obj, k=1, tol=self.tol, seed=self.seed, start=start)

            eigen = timed("lambda_max", solve)
            costs["lambda_max"].update(start=eigen.start, converged=bool(eigen.converged.all()))
            self.eigenvector = eigen.eigenvectors[0].detach().clone()
            if "lambda_max" in self.measures:
                out["lambda_max"] = eigen.value
        if "trace" in self.measures:
            trace = timed(
                "trace", lambda: hessian_trace(obj, num_probes=self.trace_probes, seed=self.seed)
            )
            out["trace"] = float(trace.value)
        config = AscentConfig(
            self.measure_rho, steps=self.measure_steps, budget=self.measure_budget
        )
        for name, fn in (("r0", zeroth_order_sharpness), ("r1", first_order_flatness)):
            if name in self.measures:
                result = timed(
                    name,
                    lambda fn=fn: fn(
                        obj, self.measure_rho, config=config, eigen=eigen, seed=self.seed
                    ),
                )
                costs[name]["steps"] = result.config.steps
                out[name] = float(result.value)
        if "lambda_max" not in self.measures and "lambda_max" in costs:
            costs["eigen_start"] = costs.pop("lambda_max")
        for name, cost in costs.items():
            self._add(name, cost)
        out["cost"] = costs
        return out

    def _warm_start(self, obj: Objective) -> Tensor:
        """u / (2 ||u||) + c / ||c||, c = r / ||r|| + g / ||g||, with u the previous
        eigenvector and r, g the cold start's Gaussian vector and gradient. The previous
        direction shortens the solve when the top eigenvector moved little; the cold start's
        larger share keeps a top eigenvector that rotated away in reach: started from u
        alone, Lanczos can certify a lower eigenvalue when u has turned into its eigenvector
        (``tests/train/test_tracker.py``). One gradient, counted."""
        u = self.eigenvector.to(obj.device, obj.dtype)
        g = torch.Generator().manual_seed(self.seed)
        r = torch.randn(u.numel(), generator=g, dtype=torch.float64).to(obj.device, obj.dtype)
        cold = r / torch.linalg.vector_norm(r)
        grad = obj.gradient()
        norm = torch.linalg.vector_norm(grad)
        if bool(torch.isfinite(norm)) and norm > 0:
            cold = cold + grad / norm
        return 0.5 * u / torch.linalg.vector_norm(u) + cold / torch.linalg.vector_norm(cold)

    def critical(self, direction: Tensor, at: Tensor | None = None) -> dict[str, Any]:
        """The critical sharpness λ_c = 2 / η_c along ``direction`` (the optimizer's update
        before the learning rate), from the last η_c when warm.

        It is taken on the loss the optimizer descends: normalization layers use the
        subset's batch statistics (train mode; running statistics can lag so far behind
        early in training that the update does not lower the eval-mode loss at all), dropout
        is off, and the model (buffers and modes included) is restored afterwards.

        Args:
            direction: Δ, flat over the model's trainable parameters.
            at: Where (default: the model's parameters), e.g. the point before the step.

        Returns:
            ``{"lambda_c": value, "eta_c": η_c, "lambda_c_lower", "lambda_c_upper",
            "cost": {"lambda_c": {"forward", "seconds", "converged"}}}``.
        """
        from flatlens.measures._critical import critical_sharpness

        obj = Objective(
            self.model,
            self.loss_fn,
            self._data,
            eval_mode=False,
            distributed=self.distributed,
            check_determinism=False,
        )
        start = self.eta if self.warm_start and self.eta else None
        began = time.perf_counter()
        with preserved(self.model), _batch_statistics(self.model):
            result = critical_sharpness(
                obj, direction, eta_start=start, bracket_width=self.bracket_width, at=at
            )
        cost = {
            "forward": result.num_forward,
            "seconds": time.perf_counter() - began,
            "converged": result.converged,
        }
        if result.converged and math.isfinite(result.eta) and result.eta > 0:
            self.eta = result.eta
        self._add("lambda_c", cost)
        return {
            "lambda_c": result.value,
            "eta_c": result.eta,
            "lambda_c_lower": result.lower,
            "lambda_c_upper": result.upper,
            "cost": {"lambda_c": cost},
        }

    # ------------------------------------------------------------------ warm-start state
    def state_dict(self) -> dict[str, Any]:
        """The warm-start state (the last eigenvector and η_c) and the cost totals."""
        return {
            "eigenvector": None if self.eigenvector is None else self.eigenvector.cpu(),
            "eta": self.eta,
            "totals": {k: dict(v) for k, v in self.totals.items()},
            "checked": self._checked,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a resumed run then measures as the uninterrupted one)."""
        state = state_dict
        vec = state.get("eigenvector")
        device = next(self.model.parameters()).device
        self.eigenvector = None if vec is None else vec.to(device)
        self.eta = state.get("eta")
        self.totals = {k: dict(v) for k, v in (state.get("totals") or {}).items()}
        self._checked = bool(state.get("checked", False))
