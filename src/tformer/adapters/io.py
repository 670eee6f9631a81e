"""Adapters on disk, apart from their base: a directory of

    adapter_config.json          {"format": "tformer-adapter", "version": 1,
                                  "lora": LoRAConfig fields (targets: the adapted layers' full names),
                                  "scale": alpha / r (or / sqrt(r)),
                                  "base": {"path": the base checkpoint as given to save_adapter or null,
                                           "fingerprint": base_fingerprint(model),
                                           "config": the base's ModelConfig fields}}
    adapter_model.safetensors    "<layer>.lora_a" (r, in) and "<layer>.lora_b" (out, r)

The base's identity is its fingerprint: sha256 over every base tensor's name, shape and an evenly
spaced sample of 1024 values rounded to bf16 (`tensor_digest`). It is cheap (no pass over the
weights), survives moving the checkpoint, NF4 quantization (an NF4Linear keeps the digest of the
weight it was quantized from) and reading it in fp32 or bf16; further training of the base or another
model changes it. `load_adapter` refuses a base whose fingerprint or layer shapes differ, naming the
differing config fields; the recorded path is only reported.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from tformer.adapters.lora import LoRAConfig, adaptable_layers, apply_lora, lora_config, lora_layers, lora_state_dict
from tformer.adapters.nf4 import NF4Linear, tensor_digest
from tformer.config import ConfigError
from tformer.io import CheckpointError, atomic_path, atomic_write_text, read_json, write_safetensors

FORMAT = "tformer-adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterError(CheckpointError):
    """An adapter directory is missing, corrupt, or was trained on another base; the message says which."""


def base_fingerprint(model: nn.Module) -> str:
    """The identity of the model's base weights (adapters left out; see the module docstring)."""
    digests = {id(m.weight): m.weight_digest for m in model.modules() if isinstance(m, NF4Linear)}
    wrapped = [f"{name}.base." for name in lora_layers(model)]
    entries = []
    for key, t in model.state_dict(keep_vars=True).items():
        if key.endswith((".lora_a", ".lora_b")):
            continue
        for prefix in wrapped:
            if key.startswith(prefix):
                key = prefix[: -len("base.")] + key[len(prefix):]
        entries.append(f"{key}={digests.get(id(t)) or tensor_digest(t)}\n")
    h = hashlib.sha256(b"tformer base fingerprint 1\n")
    for entry in sorted(entries):
        h.update(entry.encode())
    return h.hexdigest()


def save_adapter(model: nn.Module, path: str | Path, base: str | Path | None = None,
                 fingerprint: str | None = None, write_extra=None) -> Path:
    """Write the model's adapters (not its base) to the directory `path`, atomically (tformer.io).

    base: the checkpoint the base was loaded from, recorded for error messages. fingerprint: the
    base's `base_fingerprint`, computed here when not given; a trainer that shards the model
    (FSDP2) computes it once before sharding and passes it to every save. `write_extra(tmp_dir)`
    may add files (tokenizer, optimiser state) before the directory goes into place.
    """
    path = Path(path)
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: its parameter names
    config = lora_config(model)
    model_config = getattr(model, "config", None)
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "lora": config.to_dict(), "scale": config.scale,
        "base": {
            "path": None if base is None else str(Path(base).resolve()),
            "fingerprint": fingerprint or base_fingerprint(model),
            "config": model_config.to_dict() if model_config is not None else None,
        },
    }
    with atomic_path(path, directory=True) as tmp:
        write_safetensors(lora_state_dict(model), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        atomic_write_text(tmp / CONFIG_FILE, json.dumps(meta, indent=2))
        if write_extra is not None:
            write_extra(tmp)
    return path


def read_adapter(path: str | Path) -> tuple[dict, LoRAConfig]:
    """(adapter_config.json's contents, its LoRAConfig), checked."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise AdapterError(f"{path} is not a tformer adapter directory: {CONFIG_FILE} is missing")
    meta = read_json(path / CONFIG_FILE)
    if meta.get("format") != FORMAT or not isinstance(meta.get("lora"), dict) or not isinstance(meta.get("base"), dict):
        raise AdapterError(f"{path / CONFIG_FILE} is not a tformer adapter config")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise AdapterError(f"{path} was written by a newer tformer (adapter format {meta['version']}): upgrade tformer")
    try:
        return meta, LoRAConfig.from_dict(meta["lora"])
    except (ConfigError, TypeError) as e:
        raise AdapterError(f"{path / CONFIG_FILE}: invalid LoRA config: {e}") from e


def load_adapter(model: nn.Module, path: str | Path, check_base: bool = True, quantize: bool = True) -> nn.Module:
    """Apply the adapter saved at `path` to `model` (its base), in place; returns the model.

    Everything is checked before the model is touched: the adapted layers exist with the saved
    shapes and, unless check_base=False, the base's fingerprint is the one recorded at saving.
    A QLoRA adapter quantizes the base to NF4 as in training; quantize=False applies it to the
    full-precision base instead (what PEFT's merge into a 16-bit base does). Merge it for
    inference with `merge_lora(model)`.
    """
    path = Path(path)
    meta, config = read_adapter(path)
    if not quantize:
        config.quantize = None
    try:
        tensors = load_file(path / WEIGHTS_FILE)
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{path / WEIGHTS_FILE} is missing or not a readable safetensors file ({e})") from e
    if lora_layers(model):
        raise AdapterError(f"cannot load {path}: the model already has LoRA adapters; load onto the base")
    _check_shapes(model, config, tensors, path)
    if check_base:
        _check_identity(model, meta["base"], path)
    apply_lora(model, config)
    with torch.no_grad():
        for name, m in lora_layers(model).items():
            m.lora_a.copy_(tensors[f"{name}.lora_a"])
            m.lora_b.copy_(tensors[f"{name}.lora_b"])
    return model


def _check_shapes(model: nn.Module, config: LoRAConfig, tensors: dict, path: Path) -> None:
    candidates = adaptable_layers(model)
    expected = {}
    for name in config.targets:
        if name not in candidates:
            raise AdapterError(
                f"{path} adapts layer {name!r}, which this model does not have (layers look like "
                f"{list(candidates)[:3]}): load it onto the base it was trained on"
            )
        m = candidates[name]
        expected[f"{name}.lora_a"] = (config.r, m.in_features)
        expected[f"{name}.lora_b"] = (m.out_features, config.r)
    if set(tensors) != set(expected):
        odd = sorted(set(tensors) ^ set(expected))
        raise AdapterError(f"{path / WEIGHTS_FILE} does not match its {CONFIG_FILE}: tensors {odd[:4]} differ")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise AdapterError(
                f"{path}: {key} has shape {tuple(tensors[key].shape)} but this base needs {shape}: "
                "the adapter was trained on a base of another shape"
            )


def _check_identity(model: nn.Module, base: dict, path: Path) -> None:
    if base.get("fingerprint") == base_fingerprint(model):
        return
    saved, ours = base.get("config") or {}, getattr(model, "config", None)
    ours = json.loads(json.dumps(ours.to_dict())) if ours is not None else {}
    fields = [f"{k}: {saved.get(k)!r} there, {ours.get(k)!r} here"
              for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)]
    what = "config fields differ: " + "; ".join(fields[:6]) if fields else "the configs agree but the weights differ"
    raise AdapterError(
        f"{path} was trained on another base ({what}); it was saved from {base.get('path') or 'an unrecorded path'}. "
        "Load that base, or pass check_base=False if this is the same checkpoint read in float16"
    )
