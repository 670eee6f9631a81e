"""Files: atomic writes, safetensors directories (single file or sharded index), strict loading.

Nothing here unpickles: weights are safetensors only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not match the model; the message says which."""


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """Atomic: a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # safetensors refuses shared storage (tied weights): the caller drops ties; copies make views safe
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt: re-export it") from e


def read_safetensors_dir(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a directory: `model.safetensors.index.json` shards, or every *.safetensors."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'; the index is corrupt")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"no *.safetensors files in {directory}; tformer reads safetensors only "
            "(convert .bin/.pt checkpoints with HF transformers' save_pretrained(safe_serialization=True))"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{file} is listed in the shard index but missing")
        try:
            tensors.update(load_file(file))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file ({e}); the checkpoint is corrupt") from e
    return tensors


def load_state_dict_strict(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy `tensors` into `model` (possibly on meta) or fail naming the bad keys or shapes."""
    expected = {k: v for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the model config: missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(value.shape)}, "
                f"the config expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(tensors, strict=True, assign=True)


def replace_dir(new: Path, dst: Path) -> None:
    """Put the finished directory `new` at `dst`, replacing what was there (old kept until the swap)."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
        new.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(dst)
