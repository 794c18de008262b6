"""Training: run configuration, optimizer groups, schedule, trainer, checkpoints/resume, metrics, plots."""

from .config import RunConfig, build_config
from .memory import MemoryEstimate, available_bytes, check_training_memory, estimate_training_bytes
from .trainer import Trainer, TrainingDiverged

__all__ = ["MemoryEstimate", "RunConfig", "Trainer", "TrainingDiverged", "available_bytes", "build_config",
           "check_training_memory", "estimate_training_bytes"]
