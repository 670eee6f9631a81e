"""Absolute position embeddings (added to token embeddings), ALiBi slopes and T5's relative position bias.

Shapes: B batch, T length (queries), S keys, C dim, H heads.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tformer.nn.buffers import DerivedBuffers


def sinusoidal_table(n_positions: int, dim: int, split: bool = False) -> torch.Tensor:
    """Vaswani et al. 2017, 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...).

    split: the same values laid out [sin of every frequency | cos of every frequency] (Marian)."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim)
    sin, cos = (slice(0, dim // 2), slice(dim // 2, dim)) if split else (slice(0, dim, 2), slice(1, dim, 2))
    table[:, sin] = torch.sin(pos * div)
    table[:, cos] = torch.cos(pos * div)
    return table


class LearnedPositions(nn.Module):
    """GPT-2 / BERT style: a trained (max_seq_len, C) table."""

    def __init__(self, max_seq_len: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_seq_len, dim))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x + self.weight[positions]  # positions (B, T) -> (B, T, C)


class SinusoidalPositions(DerivedBuffers):
    """Fixed sinusoids of the original Transformer; no parameters."""

    def __init__(self, max_seq_len: int, dim: int, split: bool = False):
        super().__init__()
        self.split = split
        self.register_buffer("table", torch.empty(max_seq_len, dim), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        with torch.no_grad():
            self.table.copy_(sinusoidal_table(*self.table.shape, self.split).to(self.table.device))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x + self.table[positions].to(x.dtype)


class NoPositions(nn.Module):
    """RoPE, ALiBi or no positions at all: nothing is added to the embeddings."""

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022): the geometric sequence 2^(-8/n * h), h = 1..n.

    For a head count that is not a power of two, take the slopes of the closest smaller power
    of two, then every other slope of twice that power (the paper's reference implementation).
    """

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(power_of_2(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = power_of_2(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(power_of_2(closest) + extra)


class Alibi(DerivedBuffers):
    """Attention with Linear Biases: an additive (1, H, T, S) bias instead of position embeddings."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.register_buffer("slopes", torch.empty(n_heads), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        with torch.no_grad():
            self.slopes.copy_(alibi_slopes(self.slopes.shape[0]).to(self.slopes.device))

    def forward(self, q_slots: torch.Tensor, n_keys: int) -> torch.Tensor:
        """q_slots (T,) -> (1, H, T, S); per-row q_slots (B, T) -> (B, H, T, S)."""
        k_slots = torch.arange(n_keys, device=q_slots.device)
        distance = (k_slots - q_slots[..., :, None]).float()  # (T, S) or (B, T, S), <= 0 where causal
        distance = distance[None, None] if q_slots.dim() == 1 else distance[:, None]
        return self.slopes[None, :, None, None] * distance  # -slope_h * (i - j)


def relative_bucket(distance: torch.Tensor, bidirectional: bool, n_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket (Raffel et al. 2020, 2.1) of each key - query distance: one bucket per distance
    below half the buckets, then logarithmically wider ones up to max_distance, past which all share
    the last. Bidirectional: the upper half of the buckets is for keys after the query; otherwise
    keys after the query fall in bucket 0 (the causal mask hides them)."""
    bucket = torch.zeros_like(distance)
    if bidirectional:
        n_buckets //= 2
        bucket = (distance > 0).long() * n_buckets
        distance = distance.abs()
    else:
        distance = (-distance).clamp(min=0)
    exact = n_buckets // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    large = (exact + (log_ratio * (n_buckets - exact)).long()).clamp(max=n_buckets - 1)
    return bucket + torch.where(distance < exact, distance, large)


class RelativePositionBias(nn.Module):
    """T5's learned, bucketed relative position bias: one scalar per (bucket, head), added to the
    attention logits. A stack computes it once and every layer adds the same (1, H, T, S) bias."""

    def __init__(self, n_buckets: int, max_distance: int, n_heads: int, bidirectional: bool):
        super().__init__()
        self.n_buckets, self.max_distance, self.bidirectional = n_buckets, max_distance, bidirectional
        self.weight = nn.Parameter(torch.empty(n_buckets, n_heads))

    def forward(self, q_slots: torch.Tensor, n_keys: int) -> torch.Tensor:
        """q_slots (T,): each query's position -> (1, H, T, S) bias for keys at positions 0..S-1."""
        k_slots = torch.arange(n_keys, device=q_slots.device)
        distance = k_slots[None, :] - q_slots[:, None]  # (T, S)
        bucket = relative_bucket(distance, self.bidirectional, self.n_buckets, self.max_distance)
        return self.weight[bucket].permute(2, 0, 1)[None]  # (1, H, T, S)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.weight.shape[1] ** -0.5)
