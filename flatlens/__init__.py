"""flatlens: Hessian spectra, sharpness, first-order flatness and loss landscapes for PyTorch."""

from flatlens.allocator import tune_cpu_allocator
from flatlens.bounds import BoundReport, check_bound
from flatlens.flatness import FlatnessResult, first_order_flatness
from flatlens.objective import DataChangedError, Objective
from flatlens.optim import GAM, SAM
from flatlens.params import ParamSpace, preserved, select_parameters
from flatlens.sharpness import (
    AverageSharpnessResult,
    SharpnessResult,
    average_sharpness,
    zeroth_order_sharpness,
)
from flatlens.spectrum import (
    DensityResult,
    EigenResult,
    TraceResult,
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
)

__version__ = "0.1.0"

__all__ = [
    "GAM",
    "SAM",
    "AverageSharpnessResult",
    "BoundReport",
    "DataChangedError",
    "DensityResult",
    "EigenResult",
    "FlatnessResult",
    "Objective",
    "ParamSpace",
    "SharpnessResult",
    "TraceResult",
    "__version__",
    "average_sharpness",
    "check_bound",
    "first_order_flatness",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "preserved",
    "select_parameters",
    "tune_cpu_allocator",
    "zeroth_order_sharpness",
]
