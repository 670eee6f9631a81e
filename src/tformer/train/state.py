"""Training checkpoints: model + tokenizer (tformer format) + optimiser, step and RNG states.

    out_dir/checkpoints/step-000200/   tformer.json, model.safetensors, tokenizer.json, train_state.pt
    out_dir/best/                      the checkpoint with the lowest validation loss so far

Each checkpoint directory is assembled aside and renamed into place, so an interrupted or
failed run never leaves a partial checkpoint; only complete ones are listed or resumed.
`train_state.pt` holds tensors and plain values only and is read with `weights_only=True`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tformer.checkpoint import CONFIG_FILE, save

STATE_FILE = "train_state.pt"


def checkpoint_dirs(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file() and (p / CONFIG_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def save_training(out_dir, model, tokenizer, optimizer, step: int, state: dict, keep_last: int) -> Path:
    """Write checkpoint `step` and prune all but the newest `keep_last`."""
    path = Path(out_dir) / "checkpoints" / f"step-{step:06d}"
    payload = {"optimizer": optimizer.state_dict(), "step": step, **state}

    def write_state(tmp: Path) -> None:
        torch.save(payload, tmp / STATE_FILE)

    save(model, path, tokenizer=tokenizer, write_extra=write_state)
    for old in checkpoint_dirs(out_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def save_best(out_dir, model, tokenizer, step: int, val_loss: float) -> Path:
    return save(model, Path(out_dir) / "best", tokenizer=tokenizer, extra={"step": step, "val_loss": val_loss})


def load_training_state(path: str | Path) -> dict:
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
