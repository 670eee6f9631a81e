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
        shape = (batch_size, n_kv_heads, n_slots, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at slots input_pos (T,); return the whole cache (B, Hkv, S, D)."""
        n = k.shape[0]
        self.k[:n].index_copy_(2, input_pos, k)
        self.v[:n].index_copy_(2, input_pos, v)
        return self.k[:n], self.v[:n]
