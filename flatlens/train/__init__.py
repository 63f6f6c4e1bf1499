"""Training with flatness in view: a trainer, atomic checkpoints and multi-run studies."""

from flatlens.train._checkpoint import load_training_checkpoint, save_training_checkpoint
from flatlens.train._compare import StudyResult, compare
from flatlens.train._config import (
    OPTIMIZERS,
    TrainConfig,
    build_model,
    build_optimizer,
    build_scheduler,
    train,
)
from flatlens.train._measures import MEASURES
from flatlens.train._trainer import Trainer, TrainResult

__all__ = [
    "MEASURES",
    "OPTIMIZERS",
    "StudyResult",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "compare",
    "load_training_checkpoint",
    "save_training_checkpoint",
    "train",
]
