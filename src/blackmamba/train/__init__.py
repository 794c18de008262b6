"""Training: run configuration, optimizer groups, schedule, trainer, checkpoints/resume, metrics, plots."""

from .config import RunConfig, build_config
from .trainer import Trainer, TrainingDiverged

__all__ = ["RunConfig", "Trainer", "TrainingDiverged", "build_config"]
