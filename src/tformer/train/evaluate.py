"""The language-model loss, and held-out evaluation: loss, perplexity and bits per character.

`evaluate` is the one evaluation of a model on a token split: training's periodic and final
evaluations and `tformer quantize --eval` call it. It reads consecutive windows in order
(`data.eval_batches`) and averages the loss over every target token, not over batches, so a
short last batch weighs what its tokens weigh.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from tformer.data import Split, eval_batches
from tformer.train.objectives import next_token_loss


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets that are not IGNORE (-100); with smoothing the
    target is (1 - e) onehot + e / K."""
    return next_token_loss(logits, targets, label_smoothing)


@torch.no_grad()
def evaluate_objective(model, objective, batches, autocast=None) -> dict[str, float]:
    """The objective's outputs on `batches`, each weighted by `objective.weight` (its targets or
    pairs), prefixed val_; val_ppl from val_loss as `evaluate` gives it, and val_tokens (or val_pairs): what
    the mean is over. Training's evaluations."""
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    total = 0
    try:
        for batch in batches:
            weight = objective.weight(batch)
            with autocast or nullcontext():
                out = objective(batch)
            for key, value in out.items():  # summed on device: one sync at the end
                sums[key] = sums.get(key, 0) + value.detach().double() * weight
            total += weight
    finally:
        model.train(was_training)
    if not total:
        raise ValueError("the validation split has no trained target to evaluate")
    metrics = {f"val_{key}": value.item() / total for key, value in sums.items()}
    metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50))
    metrics[f"val_{objective.unit}"] = total  # what the mean is over: target tokens, or pairs
    return metrics


@torch.no_grad()
def evaluate(model, split: Split, batch_size: int, seq_len: int, *, max_batches: int | None = None,
             device="cpu", autocast=None) -> dict[str, float]:
    """Loss of `model` on `split`'s consecutive (batch_size, seq_len) windows.

    max_batches: the first batches only (None: the whole split). autocast: a context entered for
    each forward (default none). Returns val_loss (nats/token), val_ppl, val_bpc (bits per
    character of the split's text) and val_tokens (targets counted); val_ppl caps the loss at 50
    nats so a diverged model reports e^50 rather than overflowing. The model is put in eval mode
    for the pass and returned to the mode it was in.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches={max_batches} evaluates nothing: pass a positive number, "
                         "or None for the whole split")
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    try:
        for x, y in eval_batches(split, batch_size, seq_len, device=device, max_batches=max_batches):
            with autocast or nullcontext():
                total += lm_loss(model(x), y).double() * y.numel()  # summed on device: one sync at the end
            count += y.numel()
    finally:
        model.train(was_training)
    loss = total.item() / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_bpc": split.bits_per_char(loss),
            "val_tokens": count}
