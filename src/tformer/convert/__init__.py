"""Checkpoint converters: foreign parameter names appear only in this package, as key maps."""

from tformer.convert.gguf import checkpoint_to_gguf, gguf_to_checkpoint, load_gguf, read_chat_template, save_gguf
from tformer.convert.hf import (
    SUPPORTED_MODEL_TYPES,
    config_from_hf,
    config_to_hf,
    load_hf,
    save_hf,
    state_dict_from_hf,
    state_dict_to_hf,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "checkpoint_to_gguf",
    "config_from_hf",
    "config_to_hf",
    "gguf_to_checkpoint",
    "load_gguf",
    "load_hf",
    "read_chat_template",
    "save_gguf",
    "save_hf",
    "state_dict_from_hf",
    "state_dict_to_hf",
]
