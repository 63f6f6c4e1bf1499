"""Gradient norm Aware Minimization (GAM, Zhang et al., CVPR 2023) in the closure style.

GAM minimizes L(theta) + alpha * R1_rho(theta), where R1_rho(theta) = rho * max over the ball
||zeta|| <= rho of ||grad L(theta + zeta)|| is the first-order flatness. Two ways to follow it:

* ``mode="accelerated"`` (the paper's appendix, the authors' released code): the gradient of
  the gradient norm is a finite difference of gradients, and the final direction combines
  four gradients with a GSAM-style decomposition. Four forward-backward passes per step.
* ``mode="exact"`` (the paper's main algorithm): true Hessian-vector products. Two
  forward-backward passes with double backward per step (three with the SAM term); with
  ``hvp_method="finite_difference"`` each product is a central difference of two gradients
  instead (six plain passes, seven with the SAM term), for models autograd cannot
  differentiate twice (fused kernels, sharded models).

See ``docs/optimizers.md`` for usage and ``docs/paper-vs-code.md`` for every difference
between the paper and the released code; :meth:`GAM.from_official` reproduces the latter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatlens.core._checks import check_finite, check_fraction, check_nonnegative
from flatlens.core._derivatives import second_order
from flatlens.optim._perturbation import PerturbationOptimizer, Perturbations
from flatlens.optim._vectors import _ascent, _combine, _dot, _norm

__all__ = ["GAM"]

Mode = Literal["accelerated", "exact"]

_ACCELERATED_DEFAULTS = {
    "perturb_rho": 0.03,
    "plus_weight": 0.1,
    "minus_weight": 0.1,
    "orthogonal_weight": 0.05,
}
_EXACT_DEFAULTS = {"perturb_rho": 0.0, "flatness_weight": 0.1}


def _decompose(
    h_plus: list[Tensor | None],
    h_minus: list[Tensor | None],
    weight: float,
    eps: float,
    device: torch.device,
) -> list[Tensor | None]:
    """d = h+ - gamma * (h- - cos * ||h-|| * h+ / (||h+|| + eps)),
    cos = <h-, h+> / (||h+|| ||h-|| + eps): subtract the part of h- orthogonal to h+."""
    n_plus = _norm(h_plus, device)
    n_minus = _norm(h_minus, device)
    cosine = _dot(h_minus, h_plus, device) / (n_plus * n_minus + eps)
    along = cosine * n_minus / (n_plus + eps)
    orthogonal = _combine([1.0, -along], [h_minus, h_plus])
    return _combine([1.0, -weight], [h_plus, orthogonal])


class GAM(PerturbationOptimizer):
    """Gradient norm Aware Minimization around any base optimizer.

    Accelerated mode (default). With eps-guarded normalizations n(v) = v / (||v|| + eps)
    (adaptive: w^2 v / (||w v|| + eps), w the parameters at the point where v is taken)::

        g0 = grad L(theta)
        g1 = grad L(theta + perturb_rho n(g0))             # SAM gradient at theta
        theta_adv = theta + rho n(g1 - g0)                 # ascent on ||grad L||, by finite diff.
        g2 = grad L(theta_adv)
        g3 = grad L(theta_adv + perturb_rho n(g2))         # SAM gradient at theta_adv
        h+ = alpha g1 + (1 - alpha) g3                     # alpha = plus_weight
        h- = beta g0 + (1 - beta) g2                       # beta = minus_weight (paper's form)
        d  = h+ - gamma (h- - cos(h-, h+) ||h-|| h+ / ||h+||)   # gamma = orthogonal_weight
        theta <- base_optimizer.step() with theta.grad = d

    :meth:`from_official` uses the released code's h- = g0 + |1 - beta| g2 instead.

    Exact mode (``mode="exact"``), the paper's main algorithm with g = grad L(theta)::

        f = H(theta) g / (||g|| + eps)                     # grad ||grad L||, one HVP
        theta_adv = theta + rho f / (||f|| + eps)
        h_norm = rho H(theta_adv) g_adv / (||g_adv|| + eps),  g_adv = grad L(theta_adv)
        h_loss = g, or grad L(theta + perturb_rho g / (||g|| + eps)) when perturb_rho > 0
        d = h_loss + flatness_weight * h_norm

    Its closure must accept ``create_graph`` and pass it to ``backward``; the first step
    checks that the gradients carry a graph and raises otherwise (the products would
    silently be zero). With ``hvp_method="finite_difference"`` no graph is needed:
    H v ~ (g(theta + h v) - g(theta - h v)) / (2 h) for a unit v, h = sqrt(eps)
    max(||theta||, 1), eps that of the parameters' dtype.

    Args:
        params: Parameters (or param-group dicts) to optimize.
        base_optimizer: An optimizer instance over the same parameters, or a class built as
            ``base_optimizer(params, **base_kwargs)``.
        model: The network. When given, BatchNorm running statistics (all buffers) are
            updated by the first pass only.
        mode: ``"accelerated"`` or ``"exact"``.
        rho: Radius of the ascent on the gradient norm (the rho of R1_rho), >= 0.
        perturb_rho: Accelerated: the SAM radius and finite-difference step (rho' in the
            paper; default 0.03). Exact: the SAM radius of h_loss, 0 (default) for plain
            gradient h_loss.
        plus_weight: Accelerated only: alpha in [0, 1], weight of g1 against g3 in h+
            (default 0.1).
        minus_weight: Accelerated only: beta in [0, 1], weight of g0 against g2 in h-
            (default 0.1).
        orthogonal_weight: Accelerated only: gamma >= 0, how much of h-'s component
            orthogonal to h+ is subtracted (default 0.05).
        flatness_weight: Exact only: alpha >= 0, the weight of R1 in L + alpha R1 (default
            0.1; the paper gives no default for it).
        adaptive: Accelerated only: scale each ascent elementwise by the parameters, as ASAM.
        eps: Guard added to every norm in a denominator.
        grad_scaler: A ``torch.amp.GradScaler`` for float16 training (see :class:`SAM`).
        perturbations: ``"per_rank"`` (the released code's DDP scheme: every pass inside
            ``no_sync``, one all-reduce of the final direction per step) or
            ``"synchronized"`` (every gradient and HVP averaged over the ranks); used when
            ``model`` is a ``DistributedDataParallel`` module (see :class:`SAM`).
        hvp_method: Exact only: ``"double_backward"`` (default) or ``"finite_difference"``
            (two plain passes per Hessian-vector product, no ``create_graph``).
        **base_kwargs: Settings of the base optimizer when it is passed as a class.

    The accelerated defaults are the released code's CIFAR-10 ResNet settings
    (``main_cifar.py``).
    """

    _HYPERPARAMETERS = (
        "mode",
        "official",
        "rho",
        "perturb_rho",
        "plus_weight",
        "minus_weight",
        "orthogonal_weight",
        "flatness_weight",
        "adaptive",
        "eps",
    )
    _KIND = "GAM"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: Optimizer | type[Optimizer],
        *,
        model: nn.Module | None = None,
        mode: Mode = "accelerated",
        rho: float = 0.2,
        perturb_rho: float | None = None,
        plus_weight: float | None = None,
        minus_weight: float | None = None,
        orthogonal_weight: float | None = None,
        flatness_weight: float | None = None,
        adaptive: bool = False,
        eps: float = 1e-12,
        grad_scaler: torch.amp.GradScaler | None = None,
        perturbations: Perturbations = "per_rank",
        hvp_method: Literal["double_backward", "finite_difference"] = "double_backward",
        **base_kwargs: Any,
    ) -> None:
        if hvp_method not in ("double_backward", "finite_difference"):
            raise ValueError(
                f"hvp_method must be 'double_backward' or 'finite_difference', not {hvp_method!r}"
            )
        if hvp_method != "double_backward" and mode != "exact":
            raise ValueError("hvp_method applies to mode='exact' (accelerated takes no HVP)")
        self.hvp_method = hvp_method
        settings = self._resolve(
            mode=mode,
            official=False,
            rho=rho,
            perturb_rho=perturb_rho,
            plus_weight=plus_weight,
            minus_weight=minus_weight,
            orthogonal_weight=orthogonal_weight,
            flatness_weight=flatness_weight,
            adaptive=adaptive,
            eps=eps,
        )
        super().__init__(
            params,
            base_optimizer,
            model=model,
            eps=eps,
            grad_scaler=grad_scaler,
            base_kwargs=base_kwargs,
            perturbations=perturbations,
        )
        self._apply(settings)

    @classmethod
    def from_official(
        cls,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: Optimizer | type[Optimizer],
        *,
        model: nn.Module | None = None,
        grad_rho: float,
        grad_norm_rho: float,
        grad_beta_0: float,
        grad_beta_1: float,
        grad_gamma: float,
        adaptive: bool = False,
        perturb_eps: float = 1e-12,
        grad_scaler: torch.amp.GradScaler | None = None,
        perturbations: Perturbations = "per_rank",
        **base_kwargs: Any,
    ) -> GAM:
        """The update of the authors' released code (xxgege/GAM, ``gam/gam.py``).

        Arguments carry the names of ``main_cifar.py``; as there, grad_beta_2 = 1 -
        grad_beta_0 and grad_beta_3 = 1 - grad_beta_1, and the decomposition uses
        h+ = grad_beta_1 g1 + grad_beta_3 g3 and h- = g0 + |grad_beta_2| g2 (coefficient 1 on
        g0), with eps in the same places. The settings ``main_cifar.py`` uses
        (grad_norm_rho, grad_rho, grad_beta_0, grad_beta_1, grad_gamma):

        * CIFAR-10 ResNet: 0.2, 0.03, 0.1, 0.1, 0.05
        * CIFAR-10 PyramidNet: 0.2, 0.03, 0.1, 0.1, 0.03
        * CIFAR-100 ResNet: 0.2, 0.02, 0.5, 0.6, 0.03
        * CIFAR-100 PyramidNet: 0.2, 0.04, 0.3, 0.5, 0.05

        Args:
            grad_rho: Radius of the two SAM-style perturbations (rho').
            grad_norm_rho: Radius of the ascent on the gradient norm (rho).
            grad_beta_0: beta; g2's coefficient in h- is |1 - beta|.
            grad_beta_1: alpha; h+ = alpha g1 + (1 - alpha) g3.
            grad_gamma: Weight of the orthogonal component removed.
            adaptive: ASAM-style elementwise scaling of the three ascents.
            perturb_eps: The eps of every denominator.
            perturbations: See :class:`GAM`.
        """
        optimizer = cls(
            params,
            base_optimizer,
            model=model,
            rho=grad_norm_rho,
            perturb_rho=grad_rho,
            plus_weight=0.0,
            minus_weight=0.0,
            orthogonal_weight=0.0,
            adaptive=adaptive,
            eps=perturb_eps,
            grad_scaler=grad_scaler,
            perturbations=perturbations,
            **base_kwargs,
        )
        settings = optimizer.hyperparameters()
        settings.update(
            official=True,
            plus_weight=grad_beta_1,
            minus_weight=grad_beta_0,
            orthogonal_weight=grad_gamma,
        )
        optimizer._set_hyperparameters(settings)
        return optimizer

    # ------------------------------------------------------------------ settings
    @staticmethod
    def _resolve(**kw: Any) -> dict[str, Any]:
        mode = kw["mode"]
        if mode not in ("accelerated", "exact"):
            raise ValueError(f"mode must be 'accelerated' or 'exact', not {mode!r}")
        defaults = _ACCELERATED_DEFAULTS if mode == "accelerated" else _EXACT_DEFAULTS
        unused = [
            k
            for k in ("plus_weight", "minus_weight", "orthogonal_weight", "flatness_weight")
            if k not in defaults and kw[k] is not None
        ]
        if unused:
            raise ValueError(
                f"{', '.join(unused)} only apply to mode="
                f"{'exact' if mode == 'accelerated' else 'accelerated'}; "
                f"mode={mode!r} does not use them"
            )
        for key, value in defaults.items():
            if kw[key] is None:
                kw[key] = value
        if not isinstance(kw["adaptive"], bool):
            raise TypeError(f"adaptive must be True or False, not {kw['adaptive']!r}")
        if mode == "exact" and kw["adaptive"]:
            raise ValueError("adaptive=True is only available in mode='accelerated'")
        kw["official"] = bool(kw["official"])
        if kw["official"] and mode != "accelerated":
            raise ValueError("the official update is the accelerated algorithm")
        kw["rho"] = check_nonnegative("rho", kw["rho"])
        kw["perturb_rho"] = check_nonnegative("perturb_rho", kw["perturb_rho"])
        kw["eps"] = check_nonnegative("eps", kw["eps"])
        if mode == "accelerated":
            # The released code accepts any beta (it takes |1 - beta_0|); the paper's form
            # mixes two gradients, so its weights are fractions.
            check = check_finite if kw["official"] else check_fraction
            kw["plus_weight"] = check("plus_weight", kw["plus_weight"])
            kw["minus_weight"] = check("minus_weight", kw["minus_weight"])
            kw["orthogonal_weight"] = check_finite("orthogonal_weight", kw["orthogonal_weight"])
            if not kw["official"]:
                check_nonnegative("orthogonal_weight", kw["orthogonal_weight"])
        else:
            kw["flatness_weight"] = check_nonnegative("flatness_weight", kw["flatness_weight"])
        return kw

    def _apply(self, settings: dict[str, Any]) -> None:
        for key in self._HYPERPARAMETERS:
            setattr(self, key, settings[key])

    def _set_hyperparameters(self, values: dict[str, Any]) -> None:
        self._apply(self._resolve(**values))

    def _needs_graph(self) -> bool:
        return self.mode == "exact" and self.hvp_method == "double_backward"

    # ------------------------------------------------------------------ the passes
    def _direction(self, run, theta, device):
        if self.mode == "exact":
            return self._exact(run, theta, device)
        return self._accelerated(run, theta, device)

    def _accelerated(self, run, theta, device):
        eps = self.eps
        weights = theta if self.adaptive else None
        g0 = run().grads
        self._move(theta, _ascent(g0, self.perturb_rho, eps, device, weights))
        g1 = run().grads
        difference = _combine([1.0, -1.0], [g1, g0])
        ascent = _ascent(difference, self.rho, eps, device, weights)
        theta_adv = self._move(theta, ascent)
        g2 = run().grads
        weights_adv = theta_adv if self.adaptive else None
        self._move(theta_adv, _ascent(g2, self.perturb_rho, eps, device, weights_adv))
        g3 = run().grads

        alpha, beta = self.plus_weight, self.minus_weight
        h_plus = _combine([alpha, 1.0 - alpha], [g1, g3])
        if self.official:
            h_minus = _combine([1.0, abs(1.0 - beta)], [g0, g2])
        else:
            h_minus = _combine([beta, 1.0 - beta], [g0, g2])
        return _decompose(h_plus, h_minus, self.orthogonal_weight, eps, device)

    def _exact(self, run, theta, device):
        if self.hvp_method == "finite_difference":
            return self._exact_difference_step(run, theta, device)
        # Differentiated twice: attention runs on its math backend (core.second_order).
        with second_order():
            return self._exact_step(run, theta, device)

    def _difference(self, run, base, unit, device):
        """H(base) unit ~ (g(base + h unit) - g(base - h unit)) / (2 h), h = sqrt(eps)
        max(||base||, 1): two plain passes."""
        eps = torch.finfo(base[0].dtype).eps
        h = math.sqrt(eps) * max(float(_norm(base, device)), 1.0)
        self._move(base, _combine([h], [unit]))
        plus = run().grads
        self._move(base, _combine([-h], [unit]))
        minus = run().grads
        return _combine([0.5 / h, -0.5 / h], [plus, minus])

    def _exact_difference_step(self, run, theta, device):
        """The exact step with difference products (see :meth:`_exact_step`)."""
        eps = self.eps
        g = run().grads
        g_unit = _combine([1.0 / (_norm(g, device) + eps)], [g])
        f = self._difference(run, theta, g_unit, device)
        theta_adv = self._move(theta, _ascent(f, self.rho, eps, device))
        g_adv = run().grads
        g_adv_unit = _combine([1.0 / (_norm(g_adv, device) + eps)], [g_adv])
        h_norm = _combine([self.rho], [self._difference(run, theta_adv, g_adv_unit, device)])
        if self.perturb_rho > 0:
            self._move(theta, _ascent(g, self.perturb_rho, eps, device))
            h_loss = run().grads
        else:
            h_loss = g
        return _combine([1.0, self.flatness_weight], [h_loss, h_norm])

    def _exact_step(self, run, theta, device):
        eps = self.eps
        start = run(create_graph=True)
        g = start.grads
        g_unit = _combine([1.0 / (_norm(g, device) + eps)], [g])
        f = self._hvp(start, g_unit)
        self._move(theta, _ascent(f, self.rho, eps, device))
        adv = run(create_graph=True)
        g_adv_unit = _combine([1.0 / (_norm(adv.grads, device) + eps)], [adv.grads])
        h_norm = _combine([self.rho], [self._hvp(adv, g_adv_unit)])
        if self.perturb_rho > 0:
            self._move(theta, _ascent(g, self.perturb_rho, eps, device))
            h_loss = run().grads
        else:
            h_loss = g
        return _combine([1.0, self.flatness_weight], [h_loss, h_norm])
