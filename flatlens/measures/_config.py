"""The one public configuration of the worst-case ascent behind R0 and R1."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, TypedDict, TypeVar

import torch
from torch import Tensor

from flatlens.core._checks import (
    check_nonnegative,
    check_positive,
    check_positive_int,
    check_rho,
    floating_dtype,
)
from flatlens.core._renames import REMOVED_IN
from flatlens.measures._apgd import check_momentum
from flatlens.measures._ball import Ball, Norm, check_norm

__all__ = [
    "INIT_KINDS",
    "AscentConfig",
    "AscentSettings",
    "check_init",
    "resolve_config",
    "rho_from_config",
]

F = TypeVar("F", bound=Callable[..., Any])

INIT_KINDS: tuple[str, ...] = ("gradient", "eigen")


class AscentSettings(TypedDict, total=False):
    """The keyword form of :class:`AscentConfig` (every field but ``rho``)."""

    norm: Norm
    adaptive: bool
    adaptive_eta: float
    steps: int
    restarts: int
    init: Sequence[str] | None
    step_size: float
    momentum: float
    num_eigen: int
    eigen_tol: float
    budget: float | None
    basis_device: str | None
    basis_dtype: torch.dtype | None


def _init_kinds(init: object) -> tuple[str, ...]:
    if isinstance(init, str):
        init = (init,)
    try:
        kinds = tuple(init)  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError(f"init must be a sequence of {INIT_KINDS}, not {init!r}") from err
    unknown = [k for k in kinds if k not in INIT_KINDS]
    if unknown:
        raise ValueError(f"unknown init kind(s) {unknown}; choose from {INIT_KINDS}")
    return kinds


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {value!r}")
    return value


@dataclass(frozen=True)
class AscentConfig:
    """Settings of the worst-case ascent: the ball and how it is searched.

    The measures maximize f over B = {delta : ||delta||_B <= rho} (the four norms of
    :class:`~flatlens.measures.Ball`; s = |theta| + adaptive_eta when ``adaptive``) by
    projected steepest ascent with momentum and the Auto-PGD schedule, eta_0 = step_size *
    rho, from several starts on the sphere, keeping the best iterate. Values are checked and
    normalized on construction; ``dataclasses.replace(config, steps=40)`` makes a variant.

    Attributes:
        rho: Radius of the ball, a finite number > 0.
        norm: ``"l2"`` or ``"linf"``.
        adaptive: Use the elementwise-scaled ball ||delta / s|| <= rho (ASAM's geometry;
            invariant to rescaling ReLU layers when ``adaptive_eta = 0``).
        adaptive_eta: eta >= 0 in s = |theta| + eta.
        steps: Ascent steps per start, >= 1.
        restarts: Random starts on the sphere, >= 0.
        init: Deterministic starts, kinds from ``("gradient", "eigen")``; ``None`` means the
            measure's default (``("gradient", "eigen")`` for R0, ``("eigen", "gradient")``
            for R1). A result's ``config`` holds the kinds actually used.
        step_size: eta_0 / rho, > 0 (Auto-PGD: 2).
        momentum: Momentum weight in [0, 1) (Auto-PGD: 0.25).
        num_eigen: Top eigenvectors used by the ``"eigen"`` start, >= 1.
        eigen_tol: Relative tolerance of the Lanczos run behind ``"eigen"``, > 0 (1e-4,
            the tolerance of every eigen solve in flatlens).
        budget: Cap on the measure's cost in HVP-equivalents (an HVP counts 1, a gradient
            1/2, a loss 1/4), or ``None``. The ``"eigen"`` start's Lanczos run gets at most
            30% of it; then the steps per start shrink (never below one, never above
            ``steps``) so the ascent fits what is left, and starts are dropped from the last
            (random, then the ``-eigen`` side) while even one step per start does not fit.
            The result's ``config.steps`` is what ran.
        basis_device: Where the ``"eigen"`` start's Lanczos basis lives (e.g. ``"cpu"``
            for a model on a GPU; as in :func:`~flatlens.measures.hessian_eigenvalues`).
        basis_dtype: The dtype the ``"eigen"`` start's Lanczos basis is stored in.

    Raises:
        TypeError, ValueError: A setting of the wrong type or out of range.
    """

    rho: float
    _: KW_ONLY
    norm: Norm = "l2"
    adaptive: bool = False
    adaptive_eta: float = 0.0
    steps: int = 20
    restarts: int = 1
    init: tuple[str, ...] | None = None
    step_size: float = 2.0
    momentum: float = 0.25
    num_eigen: int = 1
    eigen_tol: float = 1e-4
    budget: float | None = None
    basis_device: str | None = None
    basis_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        checked = {
            "rho": check_rho(self.rho),
            "norm": check_norm(self.norm),
            "adaptive": _check_bool("adaptive", self.adaptive),
            "adaptive_eta": check_nonnegative("adaptive_eta", self.adaptive_eta),
            "steps": check_positive_int("steps", self.steps),
            "restarts": check_positive_int("restarts", self.restarts, minimum=0),
            "init": None if self.init is None else _init_kinds(self.init),
            "step_size": check_positive("step_size", self.step_size),
            "momentum": check_momentum(self.momentum),
            "num_eigen": check_positive_int("num_eigen", self.num_eigen),
            "eigen_tol": check_positive("eigen_tol", self.eigen_tol),
            "budget": None if self.budget is None else check_positive("budget", self.budget),
            "basis_device": None if self.basis_device is None else str(self.basis_device),
            "basis_dtype": floating_dtype(self.basis_dtype, "basis_dtype"),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def ball(self, theta: Tensor) -> Ball:
        """The ball of these settings around ``theta``."""
        return Ball.around(theta, self.rho, self.norm, self.adaptive, self.adaptive_eta)


SETTINGS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(AscentConfig) if f.name != "rho"
)


def resolve_config(
    rho: float,
    config: AscentConfig | None,
    settings: Mapping[str, object],
    *,
    default_init: tuple[str, ...],
    measure: str,
) -> AscentConfig:
    """The :class:`AscentConfig` of one measure call: ``config`` (or the defaults) with its
    radius set to ``rho`` and the keyword ``settings`` applied, ``init=None`` replaced by
    ``default_init``.

    Raises:
        TypeError: An unknown setting, both ``config`` and keyword settings, or a
            ``config`` that is not an :class:`AscentConfig`.
    """
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise TypeError(
            f"{measure}() got unexpected keyword argument(s) {unknown}; the ascent settings "
            f"are {', '.join(SETTINGS)}"
        )
    if config is None:
        config = AscentConfig(rho, **settings)  # type: ignore[arg-type]
    elif not isinstance(config, AscentConfig):
        raise TypeError(f"config must be an AscentConfig, not {type(config).__name__}")
    elif settings:
        raise TypeError(
            f"{measure}() got both config and {sorted(settings)}: pass either keyword "
            "settings or one config (dataclasses.replace(config, ...) changes a setting)"
        )
    else:
        config = dataclasses.replace(config, rho=rho)
    if config.init is None:
        config = dataclasses.replace(config, init=default_init)
    return config


def rho_from_config(measure: F) -> F:
    """Let calls written before ``rho`` became required, ``measure(objective,
    config=AscentConfig(rho, ...))``, keep working for one release (with a warning)."""
    name = measure.__name__

    @functools.wraps(measure)
    def wrapper(objective: Any, *args: Any, **kwargs: Any) -> Any:
        if not args and "rho" not in kwargs:
            config = kwargs.get("config")
            if not isinstance(config, AscentConfig):
                raise TypeError(
                    f"{name}() needs rho, the radius of the ball: {name}(objective, rho, ...)"
                )
            warnings.warn(
                f"{name}(objective, config=...) without rho is deprecated and stops working "
                f"in flatlens {REMOVED_IN}: pass the radius first, {name}(objective, "
                f"{config.rho!r}, config=...)",
                FutureWarning,
                stacklevel=2,
            )
            kwargs["rho"] = config.rho
        return measure(objective, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def check_init(config: AscentConfig, starts: object) -> None:
    """Raise unless ``config`` and the caller's ``starts`` give at least one start point."""
    if not config.init and config.restarts == 0 and not starts:
        raise ValueError("no start points: pass init kinds, restarts >= 1 or starts")
