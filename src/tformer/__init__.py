"""tformer: transformer language models on PyTorch, readable and fast."""

from tformer.checkpoint import load, save
from tformer.config import ConfigError, ModelConfig, RopeConfig
from tformer.models import Decoder, build_model

__version__ = "0.1.0"
__all__ = ["ConfigError", "Decoder", "ModelConfig", "RopeConfig", "build_model", "load", "save"]
