"""flatlens: Hessian spectra, sharpness, first-order flatness and loss landscapes for PyTorch."""

from flatlens.objective import DataChangedError, Objective
from flatlens.optim import GAM, SAM
from flatlens.params import ParamSpace, preserved, select_parameters
from flatlens.spectrum import hessian_density, hessian_eigenvalues, hessian_trace

__version__ = "0.1.0"

__all__ = [
    "GAM",
    "SAM",
    "DataChangedError",
    "Objective",
    "ParamSpace",
    "__version__",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "preserved",
    "select_parameters",
]
