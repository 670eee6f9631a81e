"""Checkpoint converters: foreign parameter names appear only in this package, as key maps."""

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
    "config_from_hf",
    "config_to_hf",
    "load_hf",
    "save_hf",
    "state_dict_from_hf",
    "state_dict_to_hf",
]
