"""Training with flatness in view: a trainer, published recipes, flatness tracked cheaply,
atomic checkpoints and multi-run studies."""

from flatlens._recipes import RECIPES, Recipe
from flatlens.train._builders import augmentation, build_model, build_optimizer, build_scheduler
from flatlens.train._checkpoint import load_training_checkpoint, save_training_checkpoint
from flatlens.train._compare import StudyResult, compare
from flatlens.train._config import OPTIMIZERS, TrainConfig, train
from flatlens.train._losses import SmoothCrossEntropy
from flatlens.train._measures import MEASURES
from flatlens.train._tracker import FlatnessTracker
from flatlens.train._trainer import Trainer, TrainResult

__all__ = [
    "MEASURES",
    "OPTIMIZERS",
    "RECIPES",
    "FlatnessTracker",
    "Recipe",
    "SmoothCrossEntropy",
    "StudyResult",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "augmentation",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "compare",
    "load_training_checkpoint",
    "save_training_checkpoint",
    "train",
]
