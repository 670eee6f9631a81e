"""Multi-head attention with grouped key/value heads (MHA, GQA, MQA): self-attention and cross-attention.

Shapes: B batch, T queries, S keys, C dim, H query heads, Hkv key/value heads, D head_dim.

    self:  x (B,T,C) -> wqkv -> q (B,T,H,D), k/v (B,T,Hkv,D) -> RoPE -> (B,H,T,D)
             -> [KV cache: write at input_pos, read all S slots] -> softmax(q k^T * scale + mask) v
                (a RollingKVCache reads its ring of a window's keys, under a mask it builds from the model's)
             -> (B,T,H*D) -> wo -> (B,T,C)
    cross: x (B,T,C) -> wq -> q;  memory (B,S,C) -> wkv -> k/v (B,Hkv,S,D), or read from a cache
             filled once per source (`fill_cache`) -> softmax(q k^T * scale + mask) v -> wo

scale is 1/sqrt(D) unless `ModelConfig.attn_scale` sets it (T5 folds it into its init: 1.0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tformer.config import ModelConfig
from tformer.nn.kv_cache import KVCache, RollingKVCache
from tformer.nn.rope import apply_rope


def reference_attention(q, k, v, mask=None, dropout_p: float = 0.0, scale: float | None = None,
                        softcap: float | None = None):
    """The textbook formula, one head group at a time; returns (output, weights (B,H,T,S)).

    Used to check the kernels and to capture attention maps (tformer.viz). mask: None (causal),
    bool (True = attend) or additive float, broadcastable to (B, H, T, S). scale: None = 1/sqrt(D).
    softcap: scores -> softcap * tanh(scores / softcap) before the mask (Gemma 2; SDPA has no such step).
    """
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    scores = (q @ k.transpose(-2, -1)).float()  # (B, H, T, S)
    scores = scores / math.sqrt(q.shape[-1]) if scale is None else scores * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is None:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask
    weights = scores.softmax(dim=-1)
    out = F.dropout(weights, dropout_p, training=dropout_p > 0).to(v.dtype) @ v
    return out, weights


def scaled_dot_product(q, k, v, mask=None, dropout_p: float = 0.0, scale: float | None = None):
    """softmax(q k^T * scale + mask) v through torch SDPA (flash / memory-efficient kernels on GPU).

    q (B, H, T, D), k/v (B, Hkv, S, D) with H a multiple of Hkv; mask and scale as `reference_attention`'s."""
    if mask is None:  # plain causal: the flash kernel handles grouped heads natively
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=q.shape[1] != k.shape[1], scale=scale
        )
    (B, H, T, D), (Hkv, S) = q.shape, k.shape[1:3]
    n_rep = H // Hkv
    if n_rep > 1 and mask.dim() == 4 and mask.shape[1] == 1:
        # the mask is the same for every head: a group's query heads become extra queries of its
        # key/value head, q (B, Hkv, n_rep * T, D), instead of copying k and v n_rep times
        mask = mask.expand(mask.shape[0], 1, T, S)[:, :, None].expand(-1, -1, n_rep, -1, -1)
        y = F.scaled_dot_product_attention(q.reshape(B, Hkv, n_rep * T, D), k, v, dropout_p=dropout_p,
                                           attn_mask=mask.reshape(mask.shape[0], 1, n_rep * T, S), scale=scale)
        return y.reshape(B, H, T, D)
    if n_rep > 1:  # masked kernels take equal head counts
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


class Attention(nn.Module):
    """Self-attention (one fused wqkv), or with `cross` the projections of `CrossAttention`:
    wq for the queries and wkv for the keys and values of another sequence."""

    def __init__(self, config: ModelConfig, cross: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        if cross:
            self.wq = nn.Linear(config.dim, q_size, bias=config.qkv_bias)
            self.wkv = nn.Linear(config.dim, 2 * kv_size, bias=config.qkv_bias)
        else:
            self.wqkv = nn.Linear(config.dim, q_size + 2 * kv_size, bias=config.qkv_bias)
        self.scale = config.attn_scale
        self.wo = nn.Linear(q_size, config.dim, bias=config.out_bias)
        self.attn_dropout = config.attn_dropout
        self.resid_drop = nn.Dropout(config.resid_dropout)
        self.kv_cache: KVCache | RollingKVCache | None = None

    def make_cache(self, batch_size: int, n_slots: int, dtype: torch.dtype, device=None) -> KVCache:
        return KVCache(batch_size, n_slots, self.n_kv_heads, self.head_dim, dtype, device)

    def forward(self, x, rope=None, mask=None, input_pos=None):
        return self.resid_drop(self.wo(self.attend(self.wqkv(x), rope, mask, input_pos)))

    def attend(self, qkv, rope=None, mask=None, input_pos=None):
        """The projected q|k|v (B, T, (H + 2 Hkv) D) -> attention output (B, T, H*D), before wo."""
        B, T, _ = qkv.shape
        q, k, v = self.heads(qkv, rope)  # (B, H|Hkv, T, D)
        if isinstance(self.kv_cache, RollingKVCache):  # slots are not positions: the cache masks its keys
            k, v, mask = self.kv_cache.update(input_pos, k, v, mask)  # (B, Hkv, S', D), (B, 1, T, S')
        elif self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, Hkv, S, D)
        y = self.core(q, k, v, mask, self.attn_dropout if self.training else 0.0)  # (B, H, T, D)
        return y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)

    def heads(self, qkv, rope=None):
        """The projected q|k|v (B, T, (H + 2 Hkv) D) -> q (B, H, T, D), k, v (B, Hkv, T, D), RoPE applied."""
        B, T, _ = qkv.shape
        q, k, v = qkv.split(self.split_sizes, dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return tuple(t.transpose(1, 2) for t in (q, k, v))

    def core(self, q, k, v, mask=None, dropout_p: float = 0.0):
        """Attention proper: q (B, H, T, D), k/v (B, Hkv, S, D) -> (B, H, T, D). An instance may
        replace it (tformer.viz.capture_attention records the weights this way)."""
        return scaled_dot_product(q, k, v, mask, dropout_p, self.scale)


class CrossAttention(Attention):
    """Queries from x (B,T,C), keys and values from `memory` (B,S,C), the encoder's output.

    No positions and no causality: `mask` (B,1,1,S) bool hides padding keys (never None, which
    SDPA would read as causal). For decoding, `fill_cache(memory)` projects the memory once into
    `kv_cache`; forwards with memory=None read it.
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config, cross=True)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (B,S,C) -> k, v (B,Hkv,S,D) each."""
        B, S, _ = memory.shape
        kv = self.wkv(memory).view(B, S, 2 * self.n_kv_heads, self.head_dim).transpose(1, 2)
        return kv.split(self.n_kv_heads, dim=1)

    def fill_cache(self, memory: torch.Tensor) -> None:
        """Project memory (B,S,C) into `kv_cache` (a KVCache of exactly S slots, from `make_cache`)."""
        k, v = self.project_memory(memory)
        self.kv_cache.update(torch.arange(k.shape[2], device=k.device), k, v)

    def forward(self, x, memory=None, mask=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        if memory is None:  # decoding: the keys and values `fill_cache` computed
            k, v = self.kv_cache.k[:B], self.kv_cache.v[:B]
        else:
            k, v = self.project_memory(memory)  # (B, Hkv, S, D)
        y = self.core(q, k, v, mask, self.attn_dropout if self.training else 0.0)  # (B, H, T, D)
        return self.resid_drop(self.wo(y.transpose(1, 2).reshape(B, T, -1)))
