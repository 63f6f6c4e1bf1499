"""Measures: Hessian spectra, zeroth-order sharpness R0, first-order flatness R1 and the bound.

Each is a plain function ``measure(objective, ...) -> Result`` that leaves the model exactly
as it was; the spectrum measures also take any symmetric operator (a
:class:`SymmetricOperator`, a SciPy ``LinearOperator``, a curvlinops operator), and the
eigensolvers (:func:`lanczos_eigsh`, :func:`power_iteration`) a matrix-vector product. The
critical sharpness λ_c (:func:`critical_sharpness`) needs forward passes only.
"""

from flatlens.measures._ascent import WorstCaseResult
from flatlens.measures._ball import Ball
from flatlens.measures._blocks import (
    BlockSpectraResult,
    BlockSpectrum,
    block_spectra,
    parameter_blocks,
)
from flatlens.measures._bounds import BoundReport, BoundRow, check_bound
from flatlens.measures._config import AscentConfig
from flatlens.measures._critical import CriticalSharpnessResult, critical_sharpness
from flatlens.measures._density import DensityResult, hessian_density
from flatlens.measures._flatness import FlatnessResult, first_order_flatness
from flatlens.measures._krylov import lanczos_tridiagonal
from flatlens.measures._lanczos import EigshOutput, lanczos_eigsh
from flatlens.measures._operators import SymmetricOperator
from flatlens.measures._power import power_iteration
from flatlens.measures._sharpness import (
    AverageSharpnessResult,
    SharpnessResult,
    average_sharpness,
    zeroth_order_sharpness,
)
from flatlens.measures._spectrum import EigenResult, TraceResult, hessian_eigenvalues, hessian_trace

__all__ = [
    "AscentConfig",
    "AverageSharpnessResult",
    "Ball",
    "BlockSpectraResult",
    "BlockSpectrum",
    "BoundReport",
    "BoundRow",
    "CriticalSharpnessResult",
    "DensityResult",
    "EigenResult",
    "EigshOutput",
    "FlatnessResult",
    "SharpnessResult",
    "SymmetricOperator",
    "TraceResult",
    "WorstCaseResult",
    "average_sharpness",
    "block_spectra",
    "check_bound",
    "critical_sharpness",
    "first_order_flatness",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "lanczos_eigsh",
    "lanczos_tridiagonal",
    "parameter_blocks",
    "power_iteration",
    "zeroth_order_sharpness",
]
