"""A run's directory: training checkpoints, the best checkpoint, and the outputs of an earlier run.

    out_dir/checkpoints/step-000200/   tformer.json, model.safetensors, tokenizer.json, train_state.pt
    out_dir/best -> best-steps/step-000150   a symlink: the checkpoint with the lowest validation loss
    out_dir/best-steps/step-000150/    tformer.json, model.safetensors, tokenizer.json
    out_dir/metrics.jsonl, loss.png, tb/   written by `tformer.train.logger`

A run that trains LoRA adapters (--method lora|qlora) saves the adapters alone in each of these
directories (adapter_config.json + adapter_model.safetensors, `tformer.adapters`) beside the
tokenizer and train_state.pt; its base is the run's --preset. Every checkpoint also keeps the
run's chat template, so `tformer chat` renders conversations as training did.

Each checkpoint directory is assembled aside, fsynced and renamed into place (`tformer.io.atomic_path`),
so an interrupted or failed run never leaves a partial checkpoint. A new best checkpoint goes to a
directory of its own and `best` is re-pointed at it by one atomic rename of a symlink: a reader of
`best` sees the old checkpoint or the new one, never nothing. The previous best directory is kept
until the next swap, so a reader that resolved `best` just before a swap can finish reading it.
Where symlinks are unavailable (Windows without the privilege) `best` is a plain directory replaced
by `atomic_path`, which leaves it absent for the moment between two renames; a `best/` directory
written by an older tformer becomes a symlink at its next save, with the same moment once.
`train_state.pt` holds tensors and plain values only and is read with `weights_only=True`.

A run under --parallel ddp|fsdp writes its step checkpoints sharded (train/sharded.py):

    out_dir/checkpoints/step-000200/   .metadata, __0_0.distcp, ...   torch.distributed.checkpoint (DCP)
                                       sharded.json (model config), tokenizer.json, train_state.pt
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from tformer.adapters import lora_layers, read_adapter, save_adapter
from tformer.adapters.io import CONFIG_FILE as ADAPTER_FILE
from tformer.checkpoint import CONFIG_FILE, load_tformer, save
from tformer.io import CheckpointError, point_symlink
from tformer.tokenizer import TOKENIZER_FILE, Tokenizer

STATE_FILE = "train_state.pt"
SHARDED_FILE = "sharded.json"  # marks a sharded (DCP) checkpoint and holds its model config
BEST, BEST_VERSIONS = "best", "best-steps"
RUN_OUTPUTS = ("metrics.jsonl", "loss.png", "tb", "checkpoints", BEST, BEST_VERSIONS)  # what a run writes
_STEP_DIR = re.compile(r"step-(\d+)")


def checkpoint_dirs(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints (all files renamed into place), oldest first; not checked for corruption."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and (p / STATE_FILE).is_file()
            and any((p / name).is_file() for name in (CONFIG_FILE, ADAPTER_FILE, SHARDED_FILE))]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def save_model(model, path: Path, tokenizer, template: str | None = None, base: str | None = None,
               extra: dict | None = None, write_extra=None) -> Path:
    """The model as a checkpoint directory, or its LoRA adapters alone (with `base` recorded), with
    the tokenizer and chat template; atomically either way."""
    from tformer.convert.gguf import write_chat_template

    def write(tmp: Path) -> None:
        write_chat_template(tmp, template)
        if write_extra is not None:
            write_extra(tmp)

    if not lora_layers(model):
        return save(model, path, tokenizer=tokenizer, extra=extra, write_extra=write)

    def write_adapter_extra(tmp: Path) -> None:
        tokenizer.save(tmp)
        write(tmp)

    return save_adapter(model, path, base=base, write_extra=write_adapter_extra)


def save_training(out_dir, model, tokenizer, optimizer, step: int, state: dict, keep_last: int,
                  template: str | None = None, base: str | None = None) -> Path:
    """Write checkpoint `step` and prune all but the newest `keep_last`."""
    path = Path(out_dir) / "checkpoints" / f"step-{step:06d}"
    payload = {"optimizer": optimizer.state_dict(), "step": step, **state}

    def write_state(tmp: Path) -> None:
        torch.save(payload, tmp / STATE_FILE)

    save_model(model, path, tokenizer, template, base, write_extra=write_state)
    for old in checkpoint_dirs(out_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def save_best(out_dir, model, tokenizer, step: int, val_loss: float, template: str | None = None,
              base: str | None = None) -> Path:
    """Write a new best checkpoint and point `out_dir/best` at it (see the module docstring)."""
    link = Path(out_dir) / BEST
    versions = Path(out_dir) / BEST_VERSIONS
    new = versions / f"step-{step:06d}"
    for n in range(1, 1000):  # never rewrite a directory `best` may point at (a resumed run repeats steps)
        if not new.exists():
            break
        new = versions / f"step-{step:06d}-{n}"
    extra = {"step": step, "val_loss": val_loss}
    save_model(model, new, tokenizer, template, base, extra)
    previous = link.resolve() if link.is_symlink() else None
    try:
        point_symlink(link, new)
    except IsADirectoryError:  # a best/ directory from an older tformer: moved among the versions
        os.rename(link, versions / "earlier")
        point_symlink(link, new)
    except OSError:  # no symlinks here: a plain directory, replaced by two renames
        shutil.rmtree(versions, ignore_errors=True)
        return save_model(model, link, tokenizer, template, base, extra)
    for old in versions.iterdir():
        if old.resolve() not in (new.resolve(), previous):
            shutil.rmtree(old, ignore_errors=True)
    return link


def load_training_state(path: str | Path) -> dict:
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


@dataclass
class ResumePoint:
    """An intact checkpoint to resume from: its directory, training state and model (on CPU; None
    for an adapter checkpoint, whose adapters go back onto the run's base)."""
    path: Path
    state: dict
    model: torch.nn.Module | None
    sharded: bool = False  # a DCP checkpoint (train/sharded.py): weights and optimiser load after sharding


def latest_intact(out_dir: str | Path) -> tuple[ResumePoint | None, list[tuple[Path, str]]]:
    """The newest checkpoint whose files all read back, and the newer ones skipped with the reason.

    A skipped checkpoint is renamed to `step-N.corrupt` (kept for inspection, no longer listed), so
    the resumed run neither resumes from it again nor keeps it over intact ones when pruning; the
    temporary copies of saves that a killed process left unfinished are deleted.
    Raises CheckpointError when there are checkpoints but none is intact.
    """
    for folder in ("checkpoints", BEST_VERSIONS):
        for tmp in Path(out_dir, folder).glob(".step-*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
    skipped = []
    for path in reversed(checkpoint_dirs(out_dir)):
        try:
            point = _read_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any failure to read back marks the checkpoint unusable
            skipped.append((path, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__))
            continue
        for bad, _ in skipped:
            aside = bad.with_name(bad.name + ".corrupt")
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(bad, aside)
        return point, skipped
    if skipped:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        raise CheckpointError(f"no intact checkpoint in {Path(out_dir) / 'checkpoints'} ({reasons}); "
                              "start the run again with --overwrite")
    return None, []


def _read_checkpoint(path: Path) -> ResumePoint:
    if (path / SHARDED_FILE).is_file():
        from tformer.train.sharded import read_sharded

        return ResumePoint(path, read_sharded(path), None, sharded=True)
    try:
        state = load_training_state(path)
    except Exception as e:  # noqa: BLE001 - torch.load's zip reader raises RuntimeError, EOFError, ...
        first = str(e).strip().split(". ")[0] or type(e).__name__  # the zip reader's advice paragraph left out
        raise CheckpointError(f"{STATE_FILE} is truncated or corrupt ({first})") from e
    missing = [k for k in ("optimizer", "step", "best_val_loss", "torch_rng") if k not in state]
    if missing:
        raise CheckpointError(f"{STATE_FILE} lacks {missing}")
    if (path / ADAPTER_FILE).is_file():
        read_adapter(path)
        model = None
    else:
        model = load_tformer(path)
    if (path / TOKENIZER_FILE).is_file():
        Tokenizer.load(path / TOKENIZER_FILE)
    return ResumePoint(path, state, model)


def earlier_run(out_dir: str | Path) -> list[str]:
    """The outputs of an earlier run found in `out_dir` (an empty checkpoints/ folder does not count)."""
    out = Path(out_dir)
    found = [name for name in RUN_OUTPUTS if (out / name).exists() or (out / name).is_symlink()]
    if "checkpoints" in found and not any((out / "checkpoints").iterdir()):
        found.remove("checkpoints")
    return found


def remove_run(out_dir: str | Path) -> None:
    """Delete an earlier run's outputs (RUN_OUTPUTS only; other files in `out_dir` stay)."""
    for name in earlier_run(out_dir):
        path = Path(out_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
