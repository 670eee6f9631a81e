"""Language-model batches from a 1-D token array: random windows for training, fixed ones for eval.

    x: (B, T) int64 tokens[o : o + T]
    y: (B, T) int64 tokens[o + 1 : o + T + 1]   -- the next token at every position of x

Determinism: `Batcher.get(step)` seeds a fresh generator from (seed, rank, step), so the batch of a
step depends on nothing else -- a resumed run reproduces the batches of the run it continues without
saving any sampler state. `Batcher.sample(generator)` draws from a generator you own instead.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def _to_device(windows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T + 1) windows -> contiguous x, y on `device`; pinned + non_blocking for CUDA."""
    buf = torch.from_numpy(windows.astype(np.int64))
    x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def _check_length(tokens: np.ndarray, block_size: int, what: str) -> None:
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be at least 1")
    if len(tokens) < block_size + 1:
        raise ValueError(
            f"{what} has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}: "
            f"lower block_size, add text, or change val_fraction"
        )


class Batcher:
    """Random (B, T) training windows from one split (uniform over start offsets)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, *,
                 device: str | torch.device = "cpu", seed: int = 0, rank: int = 0):
        """`tokens`: e.g. `shards.train.tokens`; `rank` gives each data-parallel rank its own stream."""
        _check_length(tokens, block_size, "this split")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.device = torch.device(device)
        self.seed = seed
        self.rank = rank

    def sample(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch drawn with `generator` (a CPU generator; its state advances)."""
        n_starts = len(self.tokens) - self.block_size  # last start still has its target token
        starts = torch.randint(n_starts, (self.batch_size,), generator=generator).numpy()
        windows = self.tokens[starts[:, None] + np.arange(self.block_size + 1)]
        return _to_device(windows, self.device)

    def generator_for(self, step: int) -> torch.Generator:
        """The generator `get(step)` uses: seeded from (seed, rank, step) by numpy's SeedSequence."""
        state = np.random.SeedSequence([self.seed, self.rank, step]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(state))

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of training step `step`; the same for the same (seed, rank, step)."""
        return self.sample(self.generator_for(step))


def eval_batches(tokens: np.ndarray, batch_size: int, block_size: int, *,
                 device: str | torch.device = "cpu",
                 max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows over the whole split, in order (the last batch may be short).

    Covers every target token except the final `< block_size` leftover; average the loss over all
    targets (not over batches) for the split's loss.
    """
    _check_length(tokens, block_size, "this split")
    device = torch.device(device)
    n_windows = (len(tokens) - 1) // block_size
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    for first in range(0, n_windows, batch_size):
        starts = np.arange(first, min(first + batch_size, n_windows)) * block_size
        yield _to_device(tokens[starts[:, None] + np.arange(block_size + 1)], device)

