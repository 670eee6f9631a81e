"""Sharded training checkpoints (torch.distributed.checkpoint, DCP) of runs under --parallel ddp|fsdp.

    step-000200/  .metadata, __<rank>_0.distcp   {"model": ..., "optimizer": ...}, each rank its shards
                  sharded.json                   {"format": "tformer-sharded", "model": ModelConfig, "world_size"}
                  train_state.pt                 step, best_val_loss, torch_rngs (one a rank)
                  tokenizer.json, chat template

Every rank writes its shards into `.step-000200.tmp`; after a barrier rank 0 adds the rest and renames
the folder into place, so a run killed mid-save (any rank) leaves the previous checkpoint the newest
complete one. The state dicts come from `torch.distributed.checkpoint.state_dict`, whose keys are the
model's own (no FSDP/DDP/activation-checkpointing prefixes), and tensor parallelism's permuted wqkv rows
are put back in the model's order (train/tensor_parallel.py), so a checkpoint loads on any number of
ranks, with or without FSDP or tensor parallelism, and on one process without a process group. `consolidate` turns one
into an ordinary tformer checkpoint (model.safetensors).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict,
)

from tformer.config import ModelConfig
from tformer.io import CheckpointError
from tformer.tokenizer import TOKENIZER_FILE, Tokenizer
from tformer.train.state import SHARDED_FILE, STATE_FILE, checkpoint_dirs, load_training_state
from tformer.train.tensor_parallel import to_model_layout, to_shard_layout

FORMAT = "tformer-sharded"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def save_sharded(out_dir, model, optimizer, step: int, best_val_loss: float, keep_last: int, tokenizer,
                 template: str | None = None) -> Path:
    """Write checkpoint `step` from every rank (collective) and prune all but the newest `keep_last`."""
    from tformer.convert.gguf import write_chat_template

    root = Path(out_dir) / "checkpoints"
    path = root / f"step-{step:06d}"
    tmp = root / f".{path.name}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    to_model_layout(model, model_sd, optim_sd)  # tensor parallelism's permuted rows in the model's order
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp)
    rngs = _gather(torch.get_rng_state())
    if _rank() == 0:
        torch.save({"step": step, "best_val_loss": best_val_loss, "torch_rngs": rngs}, tmp / STATE_FILE)
        meta = {"format": FORMAT, "model": model.config.to_dict(), "world_size": len(rngs)}
        (tmp / SHARDED_FILE).write_text(json.dumps(meta, indent=2))
        tokenizer.save(tmp)
        write_chat_template(tmp, template)
        _replace(tmp, path)
        for old in checkpoint_dirs(out_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def _replace(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`; an existing `path` (a resumed run saving a step again) is set aside first."""
    if path.exists():
        aside = path.with_name(f".{path.name}.old")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(path, aside)
        os.rename(tmp, path)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_sharded(path: Path) -> dict:
    """The training state of sharded checkpoint `path`, after checking that its files read back."""
    try:
        state = load_training_state(path)
    except Exception as e:  # noqa: BLE001 - torch.load's zip reader raises RuntimeError, EOFError, ...
        raise CheckpointError(f"{STATE_FILE} is truncated or corrupt ({type(e).__name__})") from e
    missing = [k for k in ("step", "best_val_loss", "torch_rngs") if k not in state]
    if missing:
        raise CheckpointError(f"{STATE_FILE} lacks {missing}")
    sharded_config(path)
    for info in dcp.FileSystemReader(str(path)).read_metadata().storage_data.values():  # every shard whole
        file = path / info.relative_path
        if not file.is_file() or file.stat().st_size < info.offset + info.length:
            raise CheckpointError(f"shard {info.relative_path} is missing or truncated")
    if (path / TOKENIZER_FILE).is_file():
        Tokenizer.load(path / TOKENIZER_FILE)
    return state


def sharded_config(path: Path) -> ModelConfig:
    """The ModelConfig a sharded checkpoint holds (sharded.json)."""
    meta = json.loads((Path(path) / SHARDED_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{Path(path) / SHARDED_FILE} is not a {FORMAT} checkpoint description")
    return ModelConfig.from_dict(meta["model"])


def load_sharded(path: Path, state: dict, model, optimizer, rank: int = 0, world: int = 1) -> None:
    """Load checkpoint `path` into `model` and `optimizer` as this run shards them (collective), and
    this rank's RNG state when the checkpoint had as many ranks."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    to_model_layout(model, model_sd, optim_sd)
    loaded = {"model": model_sd, "optimizer": optim_sd}
    with _one_process_quiet():
        dcp.load(loaded, checkpoint_id=path, no_dist=not dist.is_initialized())
    to_shard_layout(model, loaded["model"], loaded["optimizer"])
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    rngs = state["torch_rngs"]  # one a process
    if dist.is_initialized():  # under tensor parallelism rank and world count replicas, not processes
        rank, world = dist.get_rank(), dist.get_world_size()
    if len(rngs) == world:
        torch.set_rng_state(rngs[rank])
    else:
        print(f"{path} was written by {len(rngs)} ranks, this run has {world}: dropout draws differ from "
              "the original run's from here on")


def load_full_optimizer(model, optimizer, state_dict: dict) -> None:
    """Load a one-process optimiser state dict (`optimizer.state_dict()`, parameters by position) into
    `optimizer` over `model`'s parameters, sharded or not; both list the parameters in the same order."""
    from torch.distributed.checkpoint.state_dict import _get_fqns, set_optimizer_state_dict

    names = {id(p): next(iter(_get_fqns(model, n))) for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {
        "state": {order[i]: s for i, s in state_dict["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state_dict["param_groups"]],
    }
    to_shard_layout(model, {}, by_name, whole=True)
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


@contextmanager
def _one_process_quiet():
    """DCP warns that it loads "in a single process" without a process group: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def full_model(model):
    """The whole model on CPU, gathered from every rank (collective); on ranks other than 0, None."""
    from tformer.models import build_model

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    tensors = get_model_state_dict(model, options=options)
    if _rank() != 0:
        return None
    to_model_layout(model, tensors)
    whole = build_model(model.config, init=False)
    whole.load_state_dict(tensors)
    return whole.eval()


def consolidate(path: str | Path):
    """(model, tokenizer or None, chat template or None) of sharded checkpoint `path`, on CPU and
    without a process group: what `tformer convert CKPT OUT --to tformer` writes as one checkpoint."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    from tformer.convert.gguf import read_chat_template
    from tformer.models import build_model

    path = Path(path)
    model = build_model(sharded_config(path), init=False)
    tensors = model.state_dict()
    stored = {k.removeprefix("model.") for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
              if k.startswith("model.")}
    missing = set(tensors) - stored - ({"output.weight"} if model.config.tie_embeddings else set())
    if missing:
        raise CheckpointError(f"{path} lacks the weights {sorted(missing)[:5]}: is it this model's checkpoint?")
    loaded = {"model": {k: v for k, v in tensors.items() if k in stored}}
    with _one_process_quiet():
        dcp.load(loaded, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
    model.load_state_dict({**tensors, **loaded["model"]})
    if model.config.tie_embeddings:
        model.tie_weights()
    tokenizer = Tokenizer.load(path / TOKENIZER_FILE) if (path / TOKENIZER_FILE).is_file() else None
    return model.eval(), tokenizer, read_chat_template(path)


def is_sharded(path: str | Path) -> bool:
    return (Path(path) / SHARDED_FILE).is_file()
