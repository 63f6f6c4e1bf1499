"""flatlens: Hessian spectra, sharpness, first-order flatness and loss landscapes for PyTorch.

The public names below are imported on first use (PEP 562), so ``import flatlens`` is
instant and the ``flatlens`` command can answer a Ctrl-C while torch is still loading.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_HOMES = {
    "flatlens.core": (
        "DataChangedError",
        "HVPCheckError",
        "NonFiniteLossError",
        "Objective",
        "ParamSpace",
        "causal_lm_loss",
        "preserved",
        "select_parameters",
        "token_count",
    ),
    "flatlens.measures": (
        "AscentConfig",
        "AverageSharpnessResult",
        "BlockSpectraResult",
        "BoundReport",
        "CriticalSharpnessResult",
        "DensityResult",
        "EigenResult",
        "FlatnessResult",
        "SharpnessResult",
        "SymmetricOperator",
        "TraceResult",
        "average_sharpness",
        "block_spectra",
        "check_bound",
        "critical_sharpness",
        "first_order_flatness",
        "hessian_density",
        "hessian_eigenvalues",
        "hessian_trace",
        "zeroth_order_sharpness",
    ),
    "flatlens.optim": ("GAM", "SAM"),
}
_HOME_OF = {name: home for home, names in _HOMES.items() for name in names}

__all__ = [
    "GAM",
    "SAM",
    "AscentConfig",
    "AverageSharpnessResult",
    "BlockSpectraResult",
    "BoundReport",
    "CriticalSharpnessResult",
    "DataChangedError",
    "DensityResult",
    "EigenResult",
    "FlatnessResult",
    "HVPCheckError",
    "NonFiniteLossError",
    "Objective",
    "ParamSpace",
    "SharpnessResult",
    "SymmetricOperator",
    "TraceResult",
    "__version__",
    "average_sharpness",
    "block_spectra",
    "causal_lm_loss",
    "check_bound",
    "critical_sharpness",
    "first_order_flatness",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "preserved",
    "select_parameters",
    "token_count",
    "zeroth_order_sharpness",
]


def __getattr__(name: str) -> Any:
    home = _HOME_OF.get(name)
    if home is None:
        raise AttributeError(f"module 'flatlens' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from flatlens.core import (
        DataChangedError,
        HVPCheckError,
        NonFiniteLossError,
        Objective,
        ParamSpace,
        causal_lm_loss,
        preserved,
        select_parameters,
        token_count,
    )
    from flatlens.measures import (
        AscentConfig,
        AverageSharpnessResult,
        BlockSpectraResult,
        BoundReport,
        CriticalSharpnessResult,
        DensityResult,
        EigenResult,
        FlatnessResult,
        SharpnessResult,
        SymmetricOperator,
        TraceResult,
        average_sharpness,
        block_spectra,
        check_bound,
        critical_sharpness,
        first_order_flatness,
        hessian_density,
        hessian_eigenvalues,
        hessian_trace,
        zeroth_order_sharpness,
    )
    from flatlens.optim import GAM, SAM
