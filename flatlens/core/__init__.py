"""Core: the parameter space, the :class:`Objective` every measure goes through, results and files.

* :class:`Objective`: the empirical risk L(theta) over a fixed data set, its gradient and
  Hessian-vector products, evaluated through ``torch.func.functional_call``;
* :class:`ParamSpace`, :func:`select_parameters`, :func:`preserved`: flat parameter vectors
  and exact restoration of a model;
* :class:`Result` and :func:`to_jsonable`: the base of every measure's result;
* atomic file writes and safe (``weights_only=True``) checkpoint loading.
"""

from flatlens.core._data import token_count
from flatlens.core._derivatives import second_order
from flatlens.core._difference import HVPCheckError
from flatlens.core._errors import DataChangedError, NonFiniteLossError
from flatlens.core._io import (
    CheckpointError,
    atomic_path,
    load_checkpoint,
    load_trusted_tensors,
    save_torch,
    write_bytes,
    write_figure,
    write_json,
    write_text,
)
from flatlens.core._losses import causal_lm_loss
from flatlens.core._memory import PeakMemory, tracks_peak_memory
from flatlens.core._objective import Objective
from flatlens.core._params import ModelState, ParamSpace, eval_mode, preserved, select_parameters
from flatlens.core._results import MeasureResult, Result, to_jsonable

__all__ = [
    "CheckpointError",
    "DataChangedError",
    "HVPCheckError",
    "MeasureResult",
    "ModelState",
    "NonFiniteLossError",
    "Objective",
    "ParamSpace",
    "PeakMemory",
    "Result",
    "atomic_path",
    "causal_lm_loss",
    "eval_mode",
    "load_checkpoint",
    "load_trusted_tensors",
    "preserved",
    "save_torch",
    "second_order",
    "select_parameters",
    "to_jsonable",
    "token_count",
    "tracks_peak_memory",
    "write_bytes",
    "write_figure",
    "write_json",
    "write_text",
]
