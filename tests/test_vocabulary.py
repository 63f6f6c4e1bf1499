"""One name, one meaning: every public parameter and command-line option is classified here.

``TABLE`` holds one row per parameter name: the name, its one meaning, and every public
function, class, method or command that takes it. A flag is its long option with dashes as
underscores (``--num-points`` is ``num_points``), so a flag and a library parameter of the
same name must mean the same thing. The tests fail when

* a public parameter or flag is missing from the table (a new one must be classified),
* the table lists a parameter that no longer exists,
* one name carries two meanings (two rows with the same name),
* a renamed parameter stops working or stops warning before its release.

Outputs (result dataclasses, which users read rather than build) and positional-only
parameters (which have no name in a call) are not parameters in this sense.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib
import inspect
import warnings

import pytest

MODULES = [
    "flatlens",
    "flatlens.core",
    "flatlens.measures",
    "flatlens.landscape",
    "flatlens.optim",
    "flatlens.train",
    "flatlens.report",
    "flatlens.data",
    "flatlens.zoo",
    "flatlens.distributed",
    "flatlens.integrations.lightning",
    "flatlens.integrations.transformers",
]

# Methods that implement another framework's hook keep that framework's parameter names.
FRAMEWORK_HOOKS = {
    "SharpnessAwareMixin.backward",
    "SharpnessAwareMixin.on_train_batch_start",
    "SharpnessAwareMixin.optimizer_step",
    "SharpnessAwareTrainer",
    "SharpnessAwareTrainerMixin.training_step",
    "FlatnessMonitorHooks.on_train_batch_start",
    "FlatnessMonitorHooks.on_train_batch_end",
    "FlatnessMonitorHooks.on_train_epoch_end",
    "FlatnessCallbackHooks.on_step_begin",
    "FlatnessCallbackHooks.on_step_end",
    "FlatnessCallbackHooks.on_epoch_end",
}

# Dataclasses the library returns; their fields are outputs, their methods' parameters count.
OUTPUTS = {
    "BlockSpectrum",
    "BoundRow",
    "EigshOutput",
    "ModelState",
    "PCADirections",
    "Recipe",
    "StudyResult",
    "TrainResult",
}

# The flatness callbacks of the frameworks share the trainer's measure settings.
MONITORS = ("FlatnessMonitor", "FlatnessMonitorHooks", "FlatnessCallback", "FlatnessCallbackHooks")

CMD = "flatlens "
ALL_COMMANDS = tuple(
    CMD + c for c in ("diagnose", "train", "compare", "bound", "landscape", "demo")
)
MEASURING = (CMD + "diagnose", CMD + "bound", CMD + "landscape")
TRAINING = (CMD + "train", CMD + "compare")
MEASURES_AT = (
    "average_sharpness",
    "check_bound",
    "first_order_flatness",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "zeroth_order_sharpness",
)
PROGRESS = (
    *MEASURES_AT,
    "block_spectra",
    "lanczos_eigsh",
    "power_iteration",
    "curvature_map",
    "eigen_directions",
    "line",
    "plane",
    "Trainer",
    "compare",
    "train",
)
GAM_SETTING = ("TrainConfig", *TRAINING)

# (name, meaning, where it is taken)
TABLE: list[tuple[str, str, tuple[str, ...]]] = [
    # ------------------------------------------------------------------ the ball and ascent
    (
        "rho",
        "radius ρ of the ball B(θ, ρ) around the parameters: of R0 and R1 and the measures' "
        "ball, and of SAM's and GAM's own ascent (GAM: the ρ of R1_ρ it regularizes)",
        (
            "GAM",
            "SAM",
            "AscentConfig",
            "Ball",
            "average_sharpness",
            "first_order_flatness",
            "zeroth_order_sharpness",
        ),
    ),
    ("rhos", "several radii ρ, one measurement per radius", ("check_bound",)),
    (
        "measure_rho",
        "radius ρ (or radii) of the R0/R1 measures of a command or a training run, "
        "independent of the optimizers' radii",
        (
            "TrainConfig",
            "Trainer",
            "FlatnessTracker",
            CMD + "diagnose",
            CMD + "bound",
            *TRAINING,
            *MONITORS,
        ),
    ),
    ("sam_rho", "SAM's radius ρ when training by name", GAM_SETTING),
    ("sam_adaptive", "SAM's adaptive (ASAM) ascent when training by name", GAM_SETTING),
    ("gam_adaptive", "GAM's adaptive ascents when training by name", GAM_SETTING),
    (
        "gam_official",
        "build GAM as the authors' code does (GAM.from_official) when training by name",
        GAM_SETTING,
    ),
    ("gam_rho", "GAM's gradient-norm radius ρ when training by name", GAM_SETTING),
    ("gam_perturb_rho", "GAM's SAM radius ρ′ when training by name", GAM_SETTING),
    ("gam_plus_weight", "GAM's α (weight of g1 in h+) when training by name", GAM_SETTING),
    ("gam_minus_weight", "GAM's β (weight of g0 in h-) when training by name", GAM_SETTING),
    ("gam_orthogonal_weight", "GAM's γ when training by name", GAM_SETTING),
    ("gam_flatness_weight", "GAM-exact's weight of R1 when training by name", GAM_SETTING),
    ("perturb_rho", "GAM's SAM radius ρ′ (and finite-difference step)", ("GAM",)),
    ("plus_weight", "GAM's α: weight of g1 against g3 in h+", ("GAM",)),
    ("minus_weight", "GAM's β: weight of g0 against g2 in h-", ("GAM",)),
    ("orthogonal_weight", "GAM's γ: share of h-'s part orthogonal to h+ removed", ("GAM",)),
    ("flatness_weight", "GAM-exact's α in L + α R1", ("GAM",)),
    ("mode", "GAM's algorithm: accelerated (four gradients) or exact (HVPs)", ("GAM",)),
    ("norm", "the ball's norm: l2 or linf", ("AscentConfig", "Ball", "average_sharpness")),
    (
        "adaptive",
        "use the elementwise-scaled ball ||δ / s|| <= ρ, s = |θ| + η (ASAM's geometry)",
        ("GAM", "SAM", "AscentConfig", "average_sharpness"),
    ),
    (
        "adaptive_eta",
        "η >= 0 in the adaptive scale s = |θ| + η",
        ("AscentConfig", "average_sharpness"),
    ),
    ("scale", "the elementwise scale s of an adaptive ball", ("Ball",)),
    (
        "steps",
        "iterations of an algorithm: ascent steps per start of R0/R1, Lanczos steps",
        ("AscentConfig", "lanczos_tridiagonal", CMD + "diagnose", CMD + "bound"),
    ),
    (
        "restarts",
        "random starts of the R0/R1 ascent on the ball's sphere",
        ("AscentConfig", CMD + "diagnose", CMD + "bound"),
    ),
    ("init", "the deterministic starts of the ascent (gradient, eigen)", ("AscentConfig",)),
    ("step_size", "the ascent's first step as a multiple of ρ", ("AscentConfig",)),
    (
        "momentum",
        "heavy-ball momentum coefficient of the iteration the object configures (the "
        "ascent's in AscentConfig, SGD's in training)",
        ("AscentConfig", "TrainConfig", *TRAINING),
    ),
    ("num_eigen", "top eigenvectors used as starts of the ascent", ("AscentConfig",)),
    (
        "eigen_tol",
        "relative tolerance of the eigen solve inside a measure that also runs an ascent",
        ("AscentConfig", "check_bound"),
    ),
    ("budget", "cap on a measure's cost in HVP-equivalents", ("AscentConfig",)),
    (
        "measure_budget",
        "cap on each of a run's R0/R1 measures in HVP-equivalents",
        ("TrainConfig", "Trainer", "FlatnessTracker", *TRAINING, *MONITORS),
    ),
    (
        "warm_start",
        "start each measurement from the previous one's eigenvector and critical step",
        ("FlatnessTracker",),
    ),
    (
        "bracket_width",
        "relative width of the final bracket of the critical step η_c",
        ("critical_sharpness", "FlatnessTracker"),
    ),
    (
        "eta_start",
        "the first step size the critical-sharpness search tries",
        ("critical_sharpness",),
    ),
    ("max_evals", "cap on the losses a search evaluates", ("critical_sharpness",)),
    (
        "config",
        "the operation's settings as one object: an AscentConfig for the ascent measures, "
        "a TrainConfig (or its dict) for training",
        (
            "average_sharpness",
            "check_bound",
            "first_order_flatness",
            "zeroth_order_sharpness",
            "build_model",
            "build_optimizer",
            "build_scheduler",
            "augmentation",
            "compare",
            "save_training_checkpoint",
            "train",
        ),
    ),
    (
        "starts",
        "extra start perturbations of the ascent",
        ("first_order_flatness", "zeroth_order_sharpness"),
    ),
    (
        "eigen",
        "precomputed eigenvectors for the ascent's eigen start",
        ("first_order_flatness", "zeroth_order_sharpness"),
    ),
    (
        "per_batch",
        "solve the maximum per batch and combine (m-sharpness)",
        ("first_order_flatness", "zeroth_order_sharpness"),
    ),
    (
        "distribution",
        "how random perturbations are drawn: sphere or gaussian",
        ("average_sharpness",),
    ),
    ("delta", "a perturbation δ of the parameters", ("Ball.norm_of",)),
    ("g", "a gradient vector", ("Ball.dual_norm", "Ball.steepest")),
    ("u", "a direction to scale onto the sphere", ("Ball.to_sphere",)),
    ("z", "a point to project onto the ball", ("Ball.project", "Ball.project_scaled")),
    ("theta", "a flat parameter vector θ", ("AscentConfig.ball", "Objective.forward")),
    # ------------------------------------------------------------------ spectra
    (
        "k",
        "number of leading vectors computed: eigenpairs or directions",
        (
            "block_spectra",
            "hessian_eigenvalues",
            "lanczos_eigsh",
            "power_iteration",
            "eigen_directions",
            "pca_directions",
            CMD + "diagnose",
        ),
    ),
    (
        "tol",
        "relative tolerance of the eigenvalues (default 1e-4 everywhere)",
        (
            "block_spectra",
            "hessian_eigenvalues",
            "lanczos_eigsh",
            "power_iteration",
            "curvature_map",
            "eigen_directions",
            "FlatnessTracker",
        ),
    ),
    (
        "max_hvps",
        "cap on Hessian-vector products",
        ("block_spectra", "hessian_eigenvalues", "curvature_map", "eigen_directions"),
    ),
    (
        "max_matvecs",
        "cap on matrix-vector products of a solver",
        ("lanczos_eigsh", "power_iteration"),
    ),
    (
        "which",
        "which end of the spectrum: LA, SA or LM",
        ("hessian_eigenvalues", "lanczos_eigsh", "power_iteration"),
    ),
    (
        "method",
        "the algorithm used (the choices are listed per function)",
        ("Objective.evaluate_points", "hessian_eigenvalues", "hessian_trace", "line", "plane"),
    ),
    (
        "basis_size",
        "Lanczos vectors kept between restarts",
        ("hessian_eigenvalues", "lanczos_eigsh"),
    ),
    (
        "basis_device",
        "device that holds the Lanczos basis",
        (
            "hessian_density",
            "hessian_eigenvalues",
            "lanczos_eigsh",
            "lanczos_tridiagonal",
            "AscentConfig",
            "block_spectra",
            CMD + "bound",
            CMD + "diagnose",
        ),
    ),
    (
        "basis_dtype",
        "dtype that holds the Lanczos basis",
        (
            "hessian_density",
            "hessian_eigenvalues",
            "lanczos_eigsh",
            "lanczos_tridiagonal",
            "AscentConfig",
            "block_spectra",
            CMD + "bound",
            CMD + "diagnose",
        ),
    ),
    (
        "certify",
        "re-evaluate the returned pairs with float64 products so the bounds are certified",
        ("hessian_eigenvalues",),
    ),
    (
        "rounding",
        "a known relative rounding of one product",
        ("hessian_eigenvalues", "lanczos_eigsh"),
    ),
    (
        "start",
        "the Lanczos start vector: gradient, random, or a given vector (a warm start)",
        ("hessian_eigenvalues",),
    ),
    ("make_start", "callable returning a random start vector", ("power_iteration",)),
    ("v0", "the start vector of a Krylov solver", ("lanczos_eigsh", "lanczos_tridiagonal")),
    (
        "matvec",
        "callable v -> A v, the operator's product",
        ("SymmetricOperator", "lanczos_eigsh", "lanczos_tridiagonal", "power_iteration"),
    ),
    (
        "matmat",
        "callable X -> A X, the operator's batched product",
        ("SymmetricOperator", "lanczos_eigsh"),
    ),
    (
        "n",
        "the length n of the vectors (dimension of the space) or of the index range",
        ("SymmetricOperator", "Ball.random_sphere", "power_iteration", "shard_range"),
    ),
    (
        "num_probes",
        "number of random probe vectors",
        ("average_sharpness", "hessian_trace"),
    ),
    (
        "trace_probes",
        "random probes of the trace measure in a run or report",
        ("TrainConfig", "Trainer", "FlatnessTracker", CMD + "diagnose", *TRAINING, *MONITORS),
    ),
    ("num_runs", "independent Lanczos runs of the density", ("hessian_density",)),
    ("density_runs", "independent Lanczos runs of a report's density", (CMD + "diagnose",)),
    ("lanczos_steps", "Lanczos steps per density run", ("hessian_density", CMD + "diagnose")),
    ("kernel_width", "width of the Gaussian kernel of the density", ("hessian_density",)),
    ("density", "also compute the spectral density", ("block_spectra",)),
    ("density_kwargs", "settings of the density per block", ("block_spectra",)),
    (
        "blocks",
        "how the parameters split into diagonal Hessian blocks",
        ("block_spectra", "parameter_blocks", CMD + "diagnose"),
    ),
    # ------------------------------------------------------------------ grids and landscapes
    (
        "num_points",
        "number of points of a grid (per axis)",
        ("hessian_density", "curvature_map", "grid_axis", "line", "plane", CMD + "landscape"),
    ),
    ("line_points", "grid points of a report's 1-D slice (0 skips it)", (CMD + "diagnose",)),
    (
        "plane_points",
        "grid points per axis of a report's 2-D plane (0 skips it)",
        (CMD + "diagnose",),
    ),
    (
        "span",
        "the range of a grid's coordinates: (lo, hi), or s for [-s, s]",
        ("curvature_map", "grid_axis", "line", "plane", CMD + "diagnose", CMD + "landscape"),
    ),
    ("dim", "1 for a line, 2 for a plane", (CMD + "landscape",)),
    (
        "direction",
        "a direction d in parameter space",
        ("as_direction", "line", "critical_sharpness", "FlatnessTracker.critical"),
    ),
    ("d1", "the first direction of a plane", ("cosine", "curvature_map", "plane")),
    ("d2", "the second direction of a plane", ("cosine", "curvature_map", "plane")),
    ("vector", "a flat parameter-space vector", ("normalize_direction",)),
    (
        "normalization",
        "how a direction is scaled: filter, layer or none",
        ("normalize_direction", "random_direction"),
    ),
    (
        "ignore",
        "parameters a direction leaves at zero (biasbn)",
        ("normalize_direction", "random_direction"),
    ),
    ("checkpoints", "a training trajectory's parameter snapshots", ("pca_directions",)),
    ("margin", "extra room around the trajectory's span", ("PCADirections.span",)),
    ("trajectory", "coordinates of a trajectory drawn over a plane", ("plane", "plot_contour")),
    (
        "metrics",
        "what is evaluated besides the loss (names or callables)",
        ("Objective.evaluate_points", "line", "plane", "plot_line"),
    ),
    ("metric", "the one metric drawn", ("plot_contour", "plot_surface", "Landscape.to_vtk")),
    ("zmax", "heights above it are clipped (ParaView surfaces)", ("Landscape.to_vtk",)),
    ("vtk", "also write a ParaView .vtp surface", (CMD + "landscape",)),
    ("chunk_size", "grid points per data pass", ("Objective.evaluate_points", "line", "plane")),
    ("points", "a (P, n) stack of flat parameter vectors", ("Objective.evaluate_points",)),
    ("local", "evaluate on this rank's data only", ("Objective.evaluate_points",)),
    ("store", "file that keeps a grid's progress, for resuming", ("line", "plane")),
    ("save_interval_s", "seconds between writes of the store", ("line", "plane")),
    ("callback", "called as callback(done, total) after each chunk", ("line", "plane")),
    ("distribute", "how ranks share a grid: data, points or auto", ("line", "plane")),
    ("landscape", "a Landscape result", ("plot_contour", "plot_surface", "save")),
    ("landscapes", "Landscapes to draw together", ("plot_line",)),
    ("done", "mask of the grid points already evaluated", ("save",)),
    ("filled", "filled contours", ("plot_contour",)),
    ("levels", "contour levels", ("plot_contour",)),
    (
        "log",
        "log scale of the loss in plots",
        ("plot_contour", "plot_line", "plot_surface", "Landscape.to_vtk", CMD + "landscape"),
    ),
    (
        "other",
        "the second object of a comparison or interpolation",
        ("Landscape.equals", "interpolation_direction"),
    ),
    ("timing", "also compare timings", ("Landscape.equals",)),
    # ------------------------------------------------------------------ the objective
    (
        "objective",
        "the empirical risk L (an Objective), or a symmetric operator where a spectrum takes one",
        (
            *MEASURES_AT,
            "block_spectra",
            "as_direction",
            "curvature_map",
            "eigen_directions",
            "interpolation_direction",
            "line",
            "normalize_direction",
            "pca_directions",
            "plane",
            "random_direction",
            "critical_sharpness",
        ),
    ),
    (
        "at",
        "the flat parameter vector the quantity is taken at (default: the model's own)",
        (
            "Objective.point",
            "Objective.loss",
            "Objective.evaluate",
            *MEASURES_AT,
            "critical_sharpness",
            "FlatnessTracker.critical",
        ),
    ),
    (
        "model",
        "the network: a torch module (by name or spec in configs and on the command line)",
        (
            "GAM",
            "SAM",
            "Objective",
            "PerturbationOptimizer",
            "preserved",
            "select_parameters",
            "ModelState.restore",
            "eval_mode",
            "parameter_blocks",
            "TrainConfig",
            "Trainer",
            "FlatnessTracker",
            "build_optimizer",
            "save_training_checkpoint",
            *MEASURING,
            *TRAINING,
        ),
    ),
    (
        "model_kwargs",
        "keyword arguments of the model's factory",
        ("TrainConfig", *MEASURING, *TRAINING),
    ),
    (
        "loss_fn",
        "the loss function loss_fn(outputs, targets) -> scalar",
        ("Objective", "Trainer", "FlatnessTracker", *MONITORS),
    ),
    ("loss", "the loss function by name or spec", ("TrainConfig", *MEASURING, *TRAINING)),
    (
        "data",
        "the data set (batches, a Dataset, or its name or spec on the command line)",
        (
            "Objective",
            "Objective.replace",
            "Trainer",
            "FlatnessTracker",
            "build_model",
            "compare",
            "train",
            "digest",
            "build",
            "augmentation",
            "with_normalization",
            *MEASURING,
            *TRAINING,
            *MONITORS,
        ),
    ),
    (
        "params",
        "which parameters (tensors, names or groups) are the variables",
        (
            "GAM",
            "SAM",
            "Objective",
            "Objective.replace",
            "PerturbationOptimizer",
            "select_parameters",
        ),
    ),
    ("inputs", "a batch of model inputs", ("Objective.forward",)),
    ("reduction", "how loss_fn reduces a batch: mean or sum", ("Objective",)),
    ("eval_mode", "evaluate the model in eval mode", ("Objective",)),
    (
        "hvp_method",
        "how Hessian-vector products are computed",
        ("Objective", "GAM", CMD + "bound", CMD + "diagnose"),
    ),
    ("cache_graph", "keep the first-order graph between products", ("Objective",)),
    (
        "check_hvp",
        "compare the first product at a point with a gradient difference",
        ("Objective",),
    ),
    ("check_determinism", "check that the model is deterministic", ("Objective",)),
    (
        "distributed",
        "reduce over the ranks of torch.distributed",
        ("Objective", "Trainer", "FlatnessTracker"),
    ),
    ("memory_budget", "bytes the cached graph may take", ("Objective", *MEASURING)),
    (
        "batch_weight",
        "the weight of a batch (default its size)",
        ("Objective", "FlatnessTracker"),
    ),
    ("prefix", "prepended to every name a callback logs", MONITORS),
    ("targets_key", "the key of the targets in mapping batches", ("Objective",)),
    (
        "batch_size",
        "examples per batch",
        (
            "TrainConfig",
            "Trainer",
            "FlatnessTracker",
            "Streams.loader",
            "batches",
            *MEASURING,
            *TRAINING,
            *MONITORS,
        ),
    ),
    (
        "samples",
        "training examples used by a command's measures, or all",
        MEASURING,
    ),
    (
        "measure_samples",
        "training examples of the fixed subset a run measures",
        ("TrainConfig", "Trainer", "Streams.measure_subset", *TRAINING, *MONITORS),
    ),
    (
        "measure_steps",
        "ascent steps of a run's R0/R1 measures",
        ("TrainConfig", "Trainer", "FlatnessTracker", *TRAINING, *MONITORS),
    ),
    (
        "measure_every",
        "epochs between a run's measures",
        ("TrainConfig", "Trainer", CMD + "train", *MONITORS),
    ),
    (
        "measure_every_steps",
        "optimizer steps between a run's measures",
        ("TrainConfig", "Trainer", CMD + "train", *MONITORS),
    ),
    (
        "critical_every_steps",
        "optimizer steps between a run's critical-sharpness measures",
        ("TrainConfig", "Trainer", CMD + "train", *MONITORS),
    ),
    (
        "measures",
        "which measures a run takes",
        ("TrainConfig", "Trainer", "FlatnessTracker", "compare", *MONITORS),
    ),
    ("ignore_index", "target value that is not counted", ("causal_lm_loss", "token_count")),
    ("shift", "targets are the next token", ("token_count",)),
    ("outputs", "the model's outputs", ("causal_lm_loss", "SmoothCrossEntropy.forward")),
    ("targets", "the targets of a batch", ("SmoothCrossEntropy.forward",)),
    ("labels", "the targets of a language model", ("causal_lm_loss",)),
    ("names", "parameter names", ("ParamSpace",)),
    ("shapes", "parameter shapes", ("ParamSpace",)),
    ("flat", "a flat parameter-space vector", ("ParamSpace.unflatten", "ParamSpace.as_dict")),
    ("tensors", "a sequence of tensors", ("ParamSpace.flatten", "all_reduce_mean")),
    ("enabled", "whether the effect is switched on", ("eval_mode", "local_split")),
    ("measure", "a measure function", ("tracks_peak_memory",)),
    # ------------------------------------------------------------------ optimizers
    (
        "base_optimizer",
        "the optimizer SAM/GAM step with (class or instance)",
        ("GAM", "SAM", "PerturbationOptimizer"),
    ),
    (
        "base_kwargs",
        "settings of the base optimizer built from a class",
        ("PerturbationOptimizer",),
    ),
    ("eps", "guard added to a norm in a denominator", ("GAM", "SAM", "PerturbationOptimizer")),
    ("grad_scaler", "a torch.amp.GradScaler for float16", ("GAM", "SAM", "PerturbationOptimizer")),
    (
        "perturbations",
        "per-rank or synchronized perturbations under DDP",
        ("GAM", "SAM", "PerturbationOptimizer"),
    ),
    ("closure", "re-evaluates the loss and its gradient", ("PerturbationOptimizer.step",)),
    ("zero_grad", "drop the gradients afterwards", ("SAM.first_step", "SAM.second_step")),
    ("set_to_none", "drop gradients instead of zeroing them", ("PerturbationOptimizer.zero_grad",)),
    ("param_group", "a param-group dict", ("PerturbationOptimizer.add_param_group",)),
    (
        "state_dict",
        "a saved state (of an optimizer, of a tracker's warm starts)",
        (
            "PerturbationOptimizer.load_state_dict",
            "FlatnessTracker.load_state_dict",
            "FlatnessMonitorHooks.load_state_dict",
        ),
    ),
    # ------------------------------------------------------------------ training
    (
        "optimizer",
        "the optimizer (an instance, or its name in configs and on the command line)",
        (
            "TrainConfig",
            "Trainer",
            "build_scheduler",
            "save_training_checkpoint",
            "unwrap_optimizer",
            CMD + "train",
        ),
    ),
    ("optimizers", "the optimizers a study compares", ("compare", CMD + "compare")),
    ("base", "the base optimizer of SAM/GAM by name: sgd or adamw", ("TrainConfig", *TRAINING)),
    ("lr", "the base learning rate", ("TrainConfig", *TRAINING)),
    ("weight_decay", "the base optimizer's weight decay", ("TrainConfig", *TRAINING)),
    ("nesterov", "Nesterov momentum of SGD", ("TrainConfig", *TRAINING)),
    (
        "label_smoothing",
        "ε of a label-smoothed loss",
        ("TrainConfig", "SmoothCrossEntropy", *TRAINING),
    ),
    (
        "milestones",
        "fractions of the epochs where a step schedule decays",
        ("TrainConfig", *TRAINING),
    ),
    ("lr_decay", "the factor of a step schedule at each milestone", ("TrainConfig", *TRAINING)),
    ("warmup_epochs", "epochs of linear learning-rate warm-up", ("TrainConfig", *TRAINING)),
    (
        "lr_update",
        "when the rate changes: at epoch boundaries or after every step",
        ("TrainConfig", *TRAINING),
    ),
    (
        "steps_per_epoch",
        "optimizer steps in one epoch",
        ("build_scheduler",),
    ),
    (
        "augment",
        "the augmentation of training images: none, crop-flip or crop-flip-cutout",
        ("TrainConfig", "Trainer", "Augmentation", *TRAINING),
    ),
    (
        "augment_on",
        "where augmentation runs: on the device per batch, or in the workers per example",
        ("TrainConfig", "Trainer", *TRAINING),
    ),
    ("fill", "the per-channel value of padded pixels", ("Augmentation",)),
    ("padding", "pixels of padding on each side before a random crop", ("Augmentation",)),
    ("cutout_size", "the side of the Cutout square", ("Augmentation",)),
    ("cutout_prob", "the probability of a Cutout square", ("Augmentation",)),
    (
        "num_workers",
        "DataLoader workers reading the data",
        ("TrainConfig", "Trainer", "Streams.loader", *TRAINING),
    ),
    (
        "data_mean",
        "per-channel normalization means of a run's inputs",
        ("TrainConfig", *TRAINING),
    ),
    (
        "data_std",
        "per-channel normalization standard deviations of a run's inputs",
        ("TrainConfig", *TRAINING),
    ),
    (
        "amp",
        "mixed precision of the training passes: none, bf16 or fp16",
        ("TrainConfig", "Trainer", *TRAINING),
    ),
    ("recipe", "a published training setup by name", ("TrainConfig", *TRAINING)),
    ("print_config", "print the resolved settings and exit", TRAINING),
    ("log_dir", "folder of a run's JSON-lines and TensorBoard logs", ("Trainer", "train")),
    ("log_every", "optimizer steps between log lines", ("TrainConfig", "Trainer", CMD + "train")),
    (
        "tensorboard",
        "also write TensorBoard event files",
        ("TrainConfig", "Trainer", CMD + "train"),
    ),
    ("extra", "more trainer state saved with a checkpoint", ("save_training_checkpoint",)),
    (
        "scheduler",
        "the learning-rate schedule (an instance, or its name)",
        ("TrainConfig", "Trainer", "save_training_checkpoint", *TRAINING),
    ),
    ("epochs", "training epochs", ("TrainConfig", "Trainer.fit", *TRAINING)),
    ("total_epochs", "the epochs a schedule spans", ("Trainer.train_epoch",)),
    ("epoch", "the epoch completed", ("save_training_checkpoint",)),
    ("history", "per-epoch records", ("save_training_checkpoint",)),
    ("rng", "random-generator states", ("save_training_checkpoint",)),
    ("eval_batch_size", "examples per evaluation batch", ("Trainer",)),
    ("checkpoint_dir", "folder of a run's checkpoints", ("TrainConfig", "Trainer")),
    ("checkpoint_every", "epochs between checkpoints", ("Trainer",)),
    ("settings", "extra plain values stored with results", ("Trainer",)),
    (
        "resume",
        "continue what an earlier run left",
        ("train", CMD + "diagnose", CMD + "train", CMD + "landscape"),
    ),
    ("seeds", "one run per seed", ("compare", CMD + "compare")),
    ("on_run", "called after each run of a study", ("compare",)),
    ("gap", "which generalization gap is plotted", ("StudyResult.plot",)),
    ("markdown", "a Markdown table", ("StudyResult.table",)),
    # ------------------------------------------------------------------ data and models
    (
        "x",
        "a batch of inputs (first dimension: examples)",
        (
            "batches",
            "ResNet18.forward",
            "WideResNet.forward",
            "local_split",
            "Augmentation.batch",
            "model_inputs",
        ),
    ),
    (
        "input_names",
        "the model's keyword inputs stacked in x (tokenized data), or None",
        ("Dataset", "model_inputs"),
    ),
    ("state_prefix", "the module prefix stripped from a checkpoint's keys", MEASURING),
    ("y", "the targets of x", ("batches", "local_split")),
    ("shuffle", "shuffle the examples", ("batches",)),
    ("drop_last", "drop a smaller last batch", ("batches",)),
    ("x_train", "training inputs", ("Dataset",)),
    ("y_train", "training targets", ("Dataset",)),
    ("x_test", "test inputs", ("Dataset",)),
    ("y_test", "test targets", ("Dataset",)),
    (
        "num_classes",
        "number of classes",
        (
            "Dataset",
            "Streams",
            "load_cifar",
            "stream_cifar",
            "synthetic_classification",
            "ResNet18",
            "WideResNet",
            "cnn",
            "mlp",
            "resnet18",
            "wrn16_8",
            "wrn28_10",
        ),
    ),
    ("name", "a data set's name", ("Dataset", "Streams", "from_datasets", "stream_datasets")),
    ("datasets", "torch data sets to read", ("from_datasets", "stream_datasets")),
    (
        "test_fraction",
        "share of the examples held out for testing",
        ("from_datasets", "load_digits", "stream_datasets", "stream_imagefolder"),
    ),
    (
        "mean",
        "per-channel normalization means of a data set's inputs",
        (
            "Dataset",
            "Streams",
            "Streams.renormalized",
            "stream_cifar",
            "stream_imagefolder",
            "with_normalization",
        ),
    ),
    (
        "std",
        "per-channel normalization standard deviations of a data set's inputs",
        (
            "Dataset",
            "Streams",
            "Streams.renormalized",
            "stream_cifar",
            "stream_imagefolder",
            "with_normalization",
        ),
    ),
    ("train", "the training set (a data set or DataLoader)", ("Streams",)),
    ("test", "the test set (a data set or DataLoader)", ("Streams",)),
    ("train_eval", "the training set without augmentation", ("Streams",)),
    ("split", "which split: train or test", ("Streams.first", "Streams.loader", "Streams.size")),
    ("count", "how many examples are read", ("Streams.check", "Streams.first")),
    ("image", "8x8 images instead of flat vectors", ("load_digits",)),
    ("root", "folder of a data set on disk", ("load_cifar", "stream_cifar", "stream_imagefolder")),
    ("num_train", "number of training examples", ("synthetic_classification",)),
    ("num_test", "number of test examples", ("synthetic_classification",)),
    ("num_features", "input dimension", ("synthetic_classification",)),
    ("noise", "noise standard deviation", ("synthetic_classification",)),
    ("in_features", "input dimension of an MLP", ("mlp",)),
    ("hidden", "hidden width of an MLP", ("mlp",)),
    (
        "depth",
        "how deep a network is: hidden layers of an MLP, total depth 6n + 4 of a WideResNet",
        ("mlp", "WideResNet"),
    ),
    ("in_channels", "input channels of a CNN", ("cnn", "WideResNet")),
    ("width_factor", "channel multiplier k of a WideResNet", ("WideResNet",)),
    ("dropout", "dropout probability inside the residual units", ("WideResNet",)),
    ("layout", "which WideResNet: the paper's or davda54/sam's", ("WideResNet",)),
    ("channels", "channels of a CNN's first layer", ("cnn",)),
    ("width", "channels of a ResNet's first stage", ("ResNet18", "resnet18")),
    ("spec", "a string naming what to build or import", ("check_spec", "factory", "import_object")),
    ("what", "what is imported, for messages", ("import_object",)),
    # ------------------------------------------------------------------ files and reports
    (
        "path",
        "a file path",
        (
            "BoundReport.plot",
            "atomic_path",
            "load_checkpoint",
            "load_trusted_tensors",
            "save_torch",
            "write_bytes",
            "write_figure",
            "write_json",
            "write_text",
            "Landscape.save",
            "Landscape.to_vtk",
            "load",
            "plot_contour",
            "plot_line",
            "plot_surface",
            "save",
            "StudyResult.plot",
            "Trainer.save_checkpoint",
            "Trainer.load_checkpoint",
            "load_training_checkpoint",
            "save_training_checkpoint",
            "write_report",
        ),
    ),
    ("checkpoint", "the checkpoint file measured", MEASURING),
    (
        "map_location",
        "where loaded tensors go",
        ("load_checkpoint", "load_trusted_tensors", "load_training_checkpoint"),
    ),
    ("suffix", "suffix of a temporary file", ("atomic_path",)),
    ("content", "the bytes written", ("write_bytes",)),
    ("text", "text content", ("write_text", "Section")),
    (
        "obj",
        "any Python object",
        ("save_torch", "write_json", "all_gather_object", "broadcast_object"),
    ),
    ("value", "any value to convert", ("to_jsonable",)),
    ("fig", "a matplotlib figure", ("write_figure",)),
    ("dpi", "figure resolution", ("write_figure",)),
    (
        "title",
        "title of a figure or report",
        (
            "BoundReport.plot",
            "plot_contour",
            "plot_line",
            "plot_surface",
            "Section",
            "render_report",
            "write_report",
            CMD + "diagnose",
        ),
    ),
    ("subtitle", "a report's subtitle", ("render_report",)),
    ("sections", "a report's sections", ("render_report", "write_report")),
    ("table", "rows of a report table", ("Section",)),
    ("images", "figures of a report section", ("Section",)),
    ("plotly", "interactive figures of a report section", ("Section",)),
    ("links", "links of a report section", ("Section",)),
    # ------------------------------------------------------------------ devices and ranks
    (
        "device",
        "the torch device",
        (
            "Objective",
            "SymmetricOperator",
            "PeakMemory",
            "Ball.random_sphere",
            "TrainConfig",
            "init_from_env",
            *ALL_COMMANDS,
        ),
    ),
    (
        "dtype",
        "the floating-point type",
        (
            "SymmetricOperator",
            "Ball.random_sphere",
            "TrainConfig",
            "synthetic_classification",
            *MEASURING,
            *TRAINING,
        ),
    ),
    (
        "generator",
        "a torch random generator",
        ("Ball.random_sphere", "lanczos_eigsh", "batches", "Augmentation.batch"),
    ),
    (
        "seed",
        "seed of every random choice (or a torch.Generator)",
        (
            *MEASURES_AT,
            "block_spectra",
            "curvature_map",
            "eigen_directions",
            "random_direction",
            "TrainConfig",
            "Trainer",
            "FlatnessTracker",
            "from_datasets",
            "load_digits",
            "stream_datasets",
            "synthetic_classification",
            *ALL_COMMANDS,
            *MONITORS,
        ),
    ),
    ("progress", "show a progress bar", PROGRESS),
    ("group", "a torch.distributed process group", ("all_reduce_mean", "rank", "world_size")),
    ("like", "tensors giving the shapes of missing entries", ("all_reduce_mean",)),
    ("tensor", "a tensor", ("all_gather_tensor",)),
    ("module", "a torch module", ("broadcast_buffers",)),
    ("src", "the rank that sends", ("broadcast_buffers", "broadcast_object")),
    ("rank_id", "a rank", ("shard", "shard_range")),
    ("world", "number of ranks", ("shard", "shard_range")),
    ("timeout_s", "seconds before a collective call fails", ("init_from_env",)),
    # ------------------------------------------------------------------ the command line
    ("out", "the output folder", ALL_COMMANDS),
    ("overwrite", "replace an earlier run's outputs", ALL_COMMANDS),
    ("quiet", "no progress bars or summary text", ALL_COMMANDS),
    ("json", "print the result as JSON", ALL_COMMANDS),
    ("threads", "CPU threads of torch", ALL_COMMANDS),
    ("quick", "small settings for a fast look", (CMD + "diagnose", CMD + "demo")),
]


def _public_parameters() -> dict[str, set[str]]:
    """``{parameter name: {owner, ...}}`` over the public API and every command's flags."""
    from flatlens.cli._parser import build_parser
    from flatlens.core import Result

    seen: set[int] = set()
    found: dict[str, set[str]] = collections.defaultdict(set)

    def add(owner: str, fn: object) -> None:
        if owner in FRAMEWORK_HOOKS:
            return
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return
        for p in sig.parameters.values():
            skip = (p.VAR_KEYWORD, p.VAR_POSITIONAL, p.POSITIONAL_ONLY)
            if p.kind not in skip and p.name not in ("self", "cls"):
                found[p.name].add(owner)

    for module in MODULES:
        mod = importlib.import_module(module)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if id(obj) in seen or not callable(obj):
                continue
            seen.add(id(obj))
            if not inspect.isclass(obj):
                add(name, obj)
                continue
            if issubclass(obj, BaseException):
                continue
            result = dataclasses.is_dataclass(obj) and issubclass(obj, Result)
            if not result and name not in OUTPUTS:
                add(name, obj)
            for attr, fn in vars(obj).items():
                # torch.optim patches an inherited step() into the subclass's namespace
                own = getattr(fn, "__qualname__", "").startswith(obj.__name__ + ".")
                if not attr.startswith("_") and inspect.isfunction(fn) and own:
                    add(f"{name}.{attr}", fn)
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, sub in commands.choices.items():
        for action in sub._actions:
            hidden = action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction)
            if action.option_strings and not hidden:
                flag = max(action.option_strings, key=len)
                found[flag.lstrip("-").replace("-", "_")].add(CMD + command)
    return found


def test_one_name_carries_one_meaning():
    names = collections.Counter(name for name, _, _ in TABLE)
    twice = sorted(name for name, count in names.items() if count > 1)
    assert not twice, f"names with two meanings (two rows each): {twice}"
    for name, meaning, owners in TABLE:
        assert meaning.strip() and owners, name
        assert len(set(owners)) == len(owners), f"{name}: an owner is listed twice"


def test_every_public_parameter_and_flag_is_classified():
    classified = {(owner, name) for name, _, owners in TABLE for owner in owners}
    actual = {(owner, name) for name, owners in _public_parameters().items() for owner in owners}
    missing = sorted(actual - classified)
    stale = sorted(classified - actual)
    assert not missing, f"classify these in tests/test_vocabulary.py's TABLE: {missing}"
    assert not stale, f"the TABLE lists parameters that no longer exist: {stale}"


def test_the_vocabulary_page_uses_the_table_names():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "vocabulary.md").read_text()
    names = {name for name, _, _ in TABLE}
    for name in ("rho", "measure_rho", "sam_rho", "gam_rho", "steps", "num_points", "num_probes"):
        assert name in names and f"`{name}`" in page, name


# ------------------------------------------------------------------ renamed parameters
def _renamed_calls():
    """Each deprecated name, and a call that passes it (old) or its replacement (new)."""
    import torch
    from torch import nn

    from flatlens import Objective, average_sharpness, hessian_eigenvalues, hessian_trace
    from flatlens import landscape as fl
    from flatlens.data import synthetic_classification
    from flatlens.train import TrainConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    obj = Objective(model, nn.CrossEntropyLoss(), [(x, y)])
    d = fl.random_direction(obj, seed=0)
    return [
        (
            "max_iter",
            lambda: hessian_eigenvalues(obj, 1, max_iter=9).eigenvalues,
            lambda: hessian_eigenvalues(obj, 1, max_hvps=9).eigenvalues,
        ),
        (
            "num_samples",
            lambda: hessian_trace(obj, num_samples=6).value,
            lambda: hessian_trace(obj, num_probes=6).value,
        ),
        (
            "num_samples",
            lambda: average_sharpness(obj, 0.1, num_samples=4).value,
            lambda: average_sharpness(obj, 0.1, num_probes=4).value,
        ),
        (
            "steps",
            lambda: fl.line(obj, d, steps=5).values["loss"].tolist(),
            lambda: fl.line(obj, d, num_points=5).values["loss"].tolist(),
        ),
        (
            "max_iter",
            lambda: fl.eigen_directions(obj, 1, max_iter=9)[0].vector,
            lambda: fl.eigen_directions(obj, 1, max_hvps=9)[0].vector,
        ),
        (
            "dim",
            lambda: synthetic_classification(8, dim=3, num_test=4).x_train,
            lambda: synthetic_classification(8, num_features=3, num_test=4).x_train,
        ),
        (
            "rho",
            lambda: TrainConfig(optimizer="sam", rho=0.1).sam_rho,
            lambda: TrainConfig(optimizer="sam", sam_rho=0.1).sam_rho,
        ),
        (
            "gam",
            lambda: TrainConfig(optimizer="gam", gam={"rho": 0.3}).gam_kwargs(),
            lambda: TrainConfig(optimizer="gam", gam_rho=0.3).gam_kwargs(),
        ),
        (
            "trace_samples",
            lambda: TrainConfig(trace_samples=9).trace_probes,
            lambda: TrainConfig(trace_probes=9).trace_probes,
        ),
    ]


def test_old_names_still_work_and_warn_with_the_new_name():
    import torch

    for old, call_old, call_new in _renamed_calls():
        with pytest.warns(FutureWarning, match=old):
            before = call_old()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            after = call_new()
        if isinstance(after, torch.Tensor):
            assert torch.equal(before, after), old
        else:
            assert before == after, old


def test_every_rename_is_in_the_changelog():
    from pathlib import Path

    import flatlens.data
    import flatlens.landscape
    import flatlens.measures
    import flatlens.train  # noqa: F401
    from flatlens.core._renames import RENAMES

    changelog = (Path(__file__).resolve().parents[1] / "CHANGELOG.md").read_text()
    missing = [f"{owner}({old})" for owner, old in RENAMES if f"`{old}`" not in changelog]
    assert not missing, f"CHANGELOG.md does not name these renamed parameters: {missing}"
