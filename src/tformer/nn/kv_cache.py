"""Static, preallocated key/value caches (one per attention layer), updated by index: `KVCache` (slot =
position), `LatentCache` (MLA), `RollingKVCache` (a sliding-window layer's ring of its last positions).

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


class RollingKVCache(nn.Module):
    """A sliding-window layer's cache (Mistral's rolling buffer): only the keys its window can read.

    A query at position q sees keys at positions q - window < p <= q (nn.masks.causal_mask), so the
    layer keeps `size = window + chunk - 1` slots, position p in slot p % size, each slot remembering
    its position (`pos`, -1 while empty). It serves `n_slots` positions (what the model's key mask
    and positions count), whatever `size` is.

    A forward of T <= chunk tokens writes them in place and attends over the ring: the positions it
    overwrites lie `size` behind the new ones, out of every new query's window. A longer
    forward (a prompt) attends over the ring and its own new keys side by side, then keeps the
    newest `size`. Because slots are not positions, the cache masks its own keys (`update`): causal
    by the slots' true positions, within the window, empty slots hidden, and each key otherwise as
    the model's mask over positions says (padding, ALiBi's bias). A forward may start again up to
    chunk - 1 positions back (speculative decoding's rejected drafts): slots ahead of a query are
    hidden, and those it needs are still there. The ring holds one sequence a row: `reset()` before
    reusing it for new ones.

    Shapes: B batch, Hkv key/value heads, R = size slots, D head_dim, T new tokens, S' keys read.
    """

    def __init__(self, batch_size: int, n_slots: int, window: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device=None, chunk: int = 1):
        super().__init__()
        if window < 1 or chunk < 1:
            raise ValueError(f"a rolling KV cache needs window >= 1 and chunk >= 1, got {window} and {chunk}")
        self.n_slots, self.window, self.chunk = n_slots, window, chunk
        self.size = window + chunk - 1
        shape = (batch_size, n_kv_heads, self.size, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("pos", torch.full((batch_size, self.size), -1, dtype=torch.long, device=device),
                             persistent=False)  # (B, R): each slot's position; batch first, as beam reordering needs

    def reset(self) -> None:
        """Forget every slot (a new sequence in each row)."""
        self.pos.fill_(-1)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) of positions input_pos (T,); return the keys and values to attend
        over (B, Hkv, S', D) and their mask (B, 1 or H, T, S'), from `mask` (B or 1, 1 or H, T, n_slots),
        the model's mask over positions: bool (True = attend), additive float, or None (causal)."""
        if input_pos.dim() != 1:
            raise ValueError("a rolling KV cache takes one input_pos (T,) for all rows, not one a row: "
                             "make the caches without rolling")
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise ValueError(f"a rolling KV cache reads dense masks (SDPA), not a {type(mask).__name__}: decode "
                             "with the SDPA backend, or make the caches without rolling")
        n, T = k.shape[0], k.shape[2]
        if T <= self.chunk:  # in place: the ring holds every key these queries see
            self._write(input_pos, k, v)
            k, v, key_pos = self.k[:n], self.v[:n], self.pos[:n]
        else:  # the ring's keys, then the new ones; the newest `size` stay
            key_pos = torch.cat([self.pos[:n], input_pos.expand(n, T)], dim=1)  # (B, R + T)
            k_all, v_all = torch.cat([self.k[:n], k], dim=2), torch.cat([self.v[:n], v], dim=2)
            keep = min(T, self.size)
            self._write(input_pos[-keep:], k[:, :, -keep:], v[:, :, -keep:])
            k, v = k_all, v_all
        return k, v, self._mask(input_pos, key_pos, mask)

    def _write(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        n, slots = k.shape[0], input_pos % self.size
        self.k[:n].index_copy_(2, slots, k)
        self.v[:n].index_copy_(2, slots, v)
        self.pos[:n].index_copy_(1, slots, input_pos.expand(n, -1))

    def _mask(self, input_pos: torch.Tensor, key_pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, 1 or H, T, S'): causal by true position, within the window, filled slots only, and
        `mask`'s entry for each key's position."""
        q, p = input_pos[:, None], key_pos[:, None, :]  # (T, 1), (B, 1, S')
        seen = ((p >= 0) & (p <= q) & (p > q - self.window))[:, None]  # (B, 1, T, S')
        if mask is None:
            return seen
        (B, S), T, H = key_pos.shape, q.shape[0], mask.shape[1]  # H: 1, or heads (ALiBi's bias)
        at = key_pos.clamp(min=0)[:, None, None, :].expand(B, H, T, S)
        given = mask.expand(B, H, T, mask.shape[-1]).gather(-1, at)  # (B, H, T, S')
        if mask.dtype == torch.bool:
            return seen & given
        return torch.where(seen, given, torch.full_like(given, torch.finfo(given.dtype).min))
