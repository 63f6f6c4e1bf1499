"""flatlens: Hessian spectra, sharpness, first-order flatness and loss landscapes for PyTorch."""

from flatlens.objective import DataChangedError, Objective
from flatlens.params import ParamSpace, preserved, select_parameters

__version__ = "0.1.0"

__all__ = [
    "DataChangedError",
    "Objective",
    "ParamSpace",
    "__version__",
    "preserved",
    "select_parameters",
]
