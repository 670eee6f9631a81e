"""Named model configurations, looked up by exact name.

Each family module (gpt2.py, llama.py, ...) lists `PRESETS`: a `Preset` is a name, the
provenance of its numbers (the HF repo whose config.json it mirrors) and a `ModelConfig`.
Nothing outside this package may branch on a preset's name: a quirk is a config field.

    >>> get_preset("llama-3-8b").n_kv_heads
    8
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass

from tformer.config import ModelConfig


@dataclass(frozen=True)
class Preset:
    name: str
    source: str  # "org/repo" on the HF hub whose config.json this mirrors, or where it comes from
    config: ModelConfig


class UnknownPresetError(KeyError):
    """No preset has this name; the message lists the closest names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _collect(*modules) -> dict[str, Preset]:
    registry: dict[str, Preset] = {}
    for module in modules:
        for preset in module.PRESETS:
            if preset.name in registry:
                raise RuntimeError(f"preset {preset.name!r} is defined twice (in {module.__name__})")
            registry[preset.name] = preset
    return registry


# Family modules import `Preset` from here, so they are imported once it exists.
from tformer.presets import bert, gpt2, llama, mistral, moe, qwen, recipes, smollm, t5, tiny  # noqa: E402

PRESETS: dict[str, Preset] = _collect(gpt2, llama, mistral, qwen, moe, smollm, tiny, recipes, bert, t5)


def list_presets() -> list[str]:
    """All preset names, sorted."""
    return sorted(PRESETS)


def find_preset(name: str) -> Preset:
    """The `Preset` called exactly `name` (its config is shared: use `get_preset` to get a copy)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPresetError(_unknown_message(name)) from None


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of the config of the preset called exactly `name`."""
    return copy.deepcopy(find_preset(name).config)


def preset_source(name: str) -> str:
    """Where the preset's numbers come from (an HF repo id for the published models)."""
    return find_preset(name).source


def _unknown_message(name: str) -> str:
    names = list_presets()
    lowered = {n.lower(): n for n in names}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.6)
    if close:
        quoted = [repr(lowered[c]) for c in close]
        options = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
        return f"unknown preset {name!r}: did you mean {options}?"
    return f"unknown preset {name!r}; known presets: {', '.join(names)}"
