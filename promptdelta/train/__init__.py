"""Training: :class:`Trainer` and its :class:`TrainConfig`, the errors training can raise, and ``launch`` for
local data-parallel runs (see :mod:`promptdelta.train.distributed` and :mod:`promptdelta.train.checkpoint`)."""

from promptdelta.train.distributed import launch
from promptdelta.train.config import TrainConfig
from promptdelta.train.trainer import (NonFiniteLossError, Trainer, TrainingError, TrainingOutOfMemoryError,
                                       compute_metrics)

__all__ = ["Trainer", "TrainConfig", "compute_metrics", "launch", "TrainingError", "NonFiniteLossError",
           "TrainingOutOfMemoryError"]
