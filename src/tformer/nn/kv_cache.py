"""Static, preallocated key/value cache (one per attention layer), updated by index.

Shapes: B batch, Hkv key/value heads, S cache slots, D head_dim. The buffers never change
shape or address, so decode steps can be captured in CUDA graphs.
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self, batch_size: int, n_slots: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.n_slots = n_slots
        shape = (batch_size, n_kv_heads, n_slots, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at slots input_pos (T,); return the whole cache (B, Hkv, S, D)."""
        n = k.shape[0]
        self.k[:n].index_copy_(2, input_pos, k)
        self.v[:n].index_copy_(2, input_pos, v)
        return self.k[:n], self.v[:n]


class LatentCache(nn.Module):
    """Multi-head latent attention's cache (DeepSeek-V2): per slot, the normalised latent c_kv
    (kv_rank) and the rotated key part k_pe shared by all heads (rope_dim), nothing per head.

    Both live in one buffer (B, S, kv_rank + rope_dim), the layout the absorbed attention reads
    as its single key head (values are its first kv_rank dims), so a decode step copies nothing.
    """

    def __init__(self, batch_size: int, n_slots: int, kv_rank: int, rope_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.kv_rank, self.n_slots = kv_rank, n_slots
        shape = (batch_size, n_slots, kv_rank + rope_dim)
        self.register_buffer("kv", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def c_kv(self) -> torch.Tensor:
        return self.kv[..., : self.kv_rank]  # (B, S, kv_rank)

    @property
    def k_pe(self) -> torch.Tensor:
        return self.kv[..., self.kv_rank :]  # (B, S, rope_dim)

    def update(self, input_pos: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """Write kv (B, T, kv_rank + rope_dim) at slots input_pos (T,); return the whole cache (B, S, ...)."""
        n = kv.shape[0]
        self.kv[:n].index_copy_(1, input_pos, kv)
        return self.kv[:n]
