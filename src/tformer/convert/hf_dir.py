"""Writing an HF model directory: safetensors weights (sharded as transformers shards them), config.json and
the tokenizer files, all at once through `tformer.io.atomic_path`. Every `save_hf*` writer goes through here."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tformer.io import atomic_path, atomic_write_text, write_safetensors


def write_hf_dir(path: str | Path, tensors: dict[str, torch.Tensor], hf_config: dict, tokenizer=None,
                 max_shard_bytes: int | None = None, extra_files: dict[str, dict] | None = None) -> Path:
    """`path` holds the weights, config.json, the tokenizer's files (when given) and each of `extra_files`
    (name -> JSON dict), or is left as it was if anything fails."""
    path = Path(path)
    with atomic_path(path, directory=True) as tmp:
        write_weights(tensors, tmp, max_shard_bytes)
        atomic_write_text(tmp / "config.json", json.dumps(hf_config, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)  # tokenizer.json, tokenizer_config.json, special_tokens_map.json
        for name, content in (extra_files or {}).items():
            atomic_write_text(tmp / name, json.dumps(content, indent=2))
    return path


def write_weights(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int | None) -> None:
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if max_shard_bytes is not None and shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    if len(shards) == 1:
        write_safetensors(tensors, directory / "model.safetensors", metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"  # the names transformers writes
        write_safetensors(shard, directory / file, metadata=meta)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_text(directory / "model.safetensors.index.json", json.dumps(index, indent=2))
