"""The crosscoder model: config, activations, and the sparse training kernels."""

from crosscoders.model.config import CrosscoderConfig
from crosscoders.model.crosscoder import Crosscoder

__all__ = ["Crosscoder", "CrosscoderConfig"]
