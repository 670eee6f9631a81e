"""Where a ModelConfig comes from: a preset name, a tformer checkpoint, an HF model directory,
or a JSON file of ModelConfig fields. One resolver for every command that takes NAME_OR_PATH."""

from __future__ import annotations

import json
from pathlib import Path

from tformer.config import ConfigError, ModelConfig


def resolve_config(spec: str) -> tuple[ModelConfig, str]:
    """The ModelConfig named by `spec`, and a word on where it came from.

    A path that exists wins over a preset of the same name.
    """
    from tformer.presets import UnknownPresetError, find_preset, get_preset

    path = Path(spec).expanduser()
    if path.exists():
        return _config_from_path(path)
    try:
        preset = find_preset(spec)
    except UnknownPresetError as e:
        raise ConfigError(f"{e} (no file or directory {spec!r} either; `tformer params --list` lists the presets)")
    return get_preset(spec), preset.source


def _config_from_path(path: Path) -> tuple[ModelConfig, str]:
    if path.is_dir():
        if (path / "tformer.json").is_file():
            from tformer.checkpoint import read_config

            return read_config(path), "tformer checkpoint"
        if (path / "config.json").is_file():
            from tformer.convert.hf import config_from_hf
            from tformer.io import read_json

            try:
                return config_from_hf(read_json(path / "config.json")), "HF model directory"
            except ConfigError as e:
                raise ConfigError(f"{path / 'config.json'}: {e}") from None
        raise ConfigError(f"{path} has neither tformer.json (tformer checkpoint) nor config.json (HF model)")
    return _config_from_json_file(path), "ModelConfig JSON"


def _config_from_json_file(path: Path) -> ModelConfig:
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not a JSON file of ModelConfig fields ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object of ModelConfig fields, got {type(data).__name__}")
    if data.get("format") == "tformer" and "model" in data:  # a tformer.json given as a file
        data = data["model"]
    try:
        return ModelConfig.from_dict(data)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from None
