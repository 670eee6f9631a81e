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

from tformer.data.shards import Split


def _to_device(windows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T + 1) windows -> contiguous x, y on `device`; pinned + non_blocking for CUDA."""
    buf = torch.from_numpy(windows.astype(np.int64))
    x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def _split_tokens(split: Split | np.ndarray, seq_len: int) -> np.ndarray:
    """The tokens of `split`, refused when they hold less than one window: seq_len tokens and the
    next-token target of the last. A `Split` is named in the error (train or val)."""
    if isinstance(split, Split):
        tokens, name = split.tokens, f"the {split.name} split"
        fixes = ["lower --seq_len", "add text"] + (["raise --val_fraction"] if split.name == "val" else [])
    else:
        tokens, name, fixes = split, "the token array", ["lower seq_len", "pass more tokens"]
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be at least 1")
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"{name} has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1} (one window and its "
            f"next-token target): {', '.join(fixes[:-1])} or {fixes[-1]}"
        )
    return tokens


class Batcher:
    """Random (B, T) training windows from one split (uniform over start offsets)."""

    def __init__(self, split: Split | np.ndarray, batch_size: int, seq_len: int, *,
                 device: str | torch.device = "cpu", seed: int = 0, rank: int = 0):
        """`split`: e.g. `shards.train`, or a 1-D token array; `rank` gives each data-parallel rank its
        own stream."""
        self.tokens = _split_tokens(split, seq_len)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.device = torch.device(device)
        self.seed = seed
        self.rank = rank

    def sample(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch drawn with `generator` (a CPU generator; its state advances)."""
        n_starts = len(self.tokens) - self.seq_len  # last start still has its target token
        starts = torch.randint(n_starts, (self.batch_size,), generator=generator).numpy()
        windows = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)]
        return _to_device(windows, self.device)

    def generator_for(self, step: int) -> torch.Generator:
        """The generator `get(step)` uses: seeded from (seed, rank, step) by numpy's SeedSequence."""
        state = np.random.SeedSequence([self.seed, self.rank, step]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(state))

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of training step `step`; the same for the same (seed, rank, step)."""
        return self.sample(self.generator_for(step))


def eval_batches(split: Split | np.ndarray, batch_size: int, seq_len: int, *,
                 device: str | torch.device = "cpu",
                 max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows over the whole split, in order (the last batch may be short).

    `split`: e.g. `shards.val`, or a 1-D token array. Covers every target token except the final
    `< seq_len` leftover; average the loss over all targets (not over batches) for the split's loss.
    """
    tokens = _split_tokens(split, seq_len)
    device = torch.device(device)
    n_windows = (len(tokens) - 1) // seq_len
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    for first in range(0, n_windows, batch_size):
        starts = np.arange(first, min(first + batch_size, n_windows)) * seq_len
        yield _to_device(tokens[starts[:, None] + np.arange(seq_len + 1)], device)

