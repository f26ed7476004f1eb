"""crosscoders: train crosscoders and use them to diff models."""

from crosscoders.model import Crosscoder, CrosscoderConfig
from crosscoders.train import TrainConfig, train

__version__ = "0.1.0"
__all__ = ["Crosscoder", "CrosscoderConfig", "TrainConfig", "train", "__version__"]
