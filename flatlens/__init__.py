"""flatlens: Hessian spectra, sharpness, first-order flatness and loss landscapes for PyTorch."""

from flatlens.core import (
    DataChangedError,
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
    BoundReport,
    DensityResult,
    EigenResult,
    FlatnessResult,
    SharpnessResult,
    TraceResult,
    average_sharpness,
    check_bound,
    first_order_flatness,
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
    zeroth_order_sharpness,
)
from flatlens.optim import GAM, SAM

__version__ = "0.1.0"

__all__ = [
    "GAM",
    "SAM",
    "AscentConfig",
    "AverageSharpnessResult",
    "BoundReport",
    "DataChangedError",
    "DensityResult",
    "EigenResult",
    "FlatnessResult",
    "NonFiniteLossError",
    "Objective",
    "ParamSpace",
    "SharpnessResult",
    "TraceResult",
    "__version__",
    "average_sharpness",
    "causal_lm_loss",
    "check_bound",
    "first_order_flatness",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "preserved",
    "select_parameters",
    "token_count",
    "zeroth_order_sharpness",
]
