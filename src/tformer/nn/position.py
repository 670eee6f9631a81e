"""Absolute position embeddings (added to token embeddings) and ALiBi slopes.

Shapes: B batch, T length, C dim, H heads.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tformer.nn.buffers import DerivedBuffers


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """Vaswani et al. 2017, 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...)."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)
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

    def __init__(self, max_seq_len: int, dim: int):
        super().__init__()
        self.register_buffer("table", torch.empty(max_seq_len, dim), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        with torch.no_grad():
            self.table.copy_(sinusoidal_table(*self.table.shape).to(self.table.device))

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
