"""Training: config, losses (dense reference and sparse fast path), the loop."""

from crosscoders.train.config import TrainConfig
from crosscoders.train.trainer import Trainer, train

__all__ = ["TrainConfig", "Trainer", "train"]
