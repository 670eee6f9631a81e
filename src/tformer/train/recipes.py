"""Training recipes: named sets of `TrainConfig` values for a known job on a known kind of machine.

A recipe is a starting point, not a mode: `tformer train --recipe NAME` takes its values as the
defaults, which a --config file and flags then override (`recipe_config(name, **overrides)` in
Python). The CPU default needs no recipe: `TrainConfig()`'s own defaults are it.
"""

from __future__ import annotations

from tformer.fields import ConfigError
from tformer.train.config import TrainConfig

RECIPES: dict[str, tuple[str, dict]] = {
    # The bundled Shakespeare corpus on one GPU (bench/shakespeare_gpu.py measures it against nanoGPT's
    # shakespeare_char recipe on the same text). Byte-level BPE packs ~3.4 characters into a token, so one pass
    # over the training split is ~77 steps of 64 x 256 tokens: 600 steps are ~8 passes, where validation loss
    # flattens (longer runs overfit: 1,500 steps end worse, a one-minute budget of ~4,400 steps far worse).
    "shakespeare-gpu": (
        "the bundled Shakespeare corpus on one GPU: 6 x 384 Llama-style model, 8192 BPE, B64 x T256, dropout 0.2, "
        "600 steps, compiled, bf16",
        dict(preset="shakespeare-gpu", device="cuda", batch_size=64, seq_len=256, lr=2e-3, min_lr=2e-4,
             warmup=100, beta2=0.99, weight_decay=0.1, dropout=0.2, compile=True, max_steps=600,
             eval_every=100, log_every=100, out_dir="runs/shakespeare-gpu"),
    ),
}


def recipe_config(name: str, **overrides) -> TrainConfig:
    """The TrainConfig of recipe `name`, with `overrides` (TrainConfig fields) on top."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return TrainConfig(**{**RECIPES[name][1], **overrides})

