"""Training: :class:`Trainer` and its :class:`TrainConfig`."""

from promptdelta.train.trainer import Trainer, TrainConfig, compute_metrics

__all__ = ["Trainer", "TrainConfig", "compute_metrics"]
