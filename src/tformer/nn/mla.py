"""Multi-head latent attention (MLA) of DeepSeek-V2 (Liu et al. 2024, arXiv:2405.04434, §2.1) and V3.

Shapes: B batch, T queries, S keys, C dim, H heads, r kv_rank, N nope_dim (q/k dims without
positions), R rope_dim (q/k dims with RoPE), V v_dim, Q q_rank.

    x (B,T,C) -> wq (or wq_a -> q_norm -> wq_b) -> q (B,T,H,N+R) = [q_nope (N) | q_pe (R), RoPE]
    x (B,T,C) -> wkv_a -> [c_kv (r) -> kv_norm | k_pe (R), RoPE, one head shared by all]
      naive:    c_kv -> wkv_b -> k_nope (B,S,H,N), v (B,S,H,V); k = [k_nope | k_pe]
                softmax(q k^T * scale + mask) v                          -> (B,T,H,V)
      absorbed: q_lat = q_nope W_uk (B,T,H,r)  (W_uk: wkv_b's k_nope rows, per head)
                softmax([q_lat | q_pe] [c_kv | k_pe]^T * scale + mask) c_kv -> (B,T,H,r)
                -> W_uv (wkv_b's v rows, per head)                     -> (B,T,H,V)
    -> (B,T,H*V) -> wo -> (B,T,C)

Only the latent is cached: per token and layer kv_rank + rope_dim values (DeepSeek-V3: 512 + 64)
instead of 2 * H * head_dim (V3's 128 heads x 192/128 dims would be 40,960).
Without a cache the naive path runs (fewest FLOPs for long sequences); with a cache the absorbed
path (§2.1.2: W_uk folds into the query, W_uv into the output), so attention reads r + R values a
slot instead of H * (N + V) rebuilt ones, and all heads share one key/value head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tformer.config import ModelConfig
from tformer.nn.kv_cache import LatentCache
from tformer.nn.masks import causal_mask
from tformer.nn.norm import RMSNorm
from tformer.nn.rope import apply_rope


class LatentAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        m = config.mla
        self.n_heads, self.kv_rank = config.n_heads, m.kv_rank
        self.nope_dim, self.rope_dim, self.v_dim = m.nope_dim, m.rope_dim, m.v_dim
        qk_size = self.n_heads * (m.nope_dim + m.rope_dim)
        if m.q_rank is None:  # full-rank query (DeepSeek-V2-Lite)
            self.wq = nn.Linear(config.dim, qk_size, bias=False)
        else:  # low-rank query (DeepSeek-V2/V3)
            self.wq = None
            self.wq_a = nn.Linear(config.dim, m.q_rank, bias=config.qkv_bias)
            self.q_norm = RMSNorm(m.q_rank, config.norm_eps)
            self.wq_b = nn.Linear(m.q_rank, qk_size, bias=False)
        self.wkv_a = nn.Linear(config.dim, m.kv_rank + m.rope_dim, bias=config.qkv_bias)
        self.kv_norm = RMSNorm(m.kv_rank, config.norm_eps)
        self.wkv_b = nn.Linear(m.kv_rank, self.n_heads * (m.nope_dim + m.v_dim), bias=False)
        self.wo = nn.Linear(self.n_heads * m.v_dim, config.dim, bias=config.out_bias)
        self.scale = m.softmax_scale or 1.0 / math.sqrt(m.nope_dim + m.rope_dim)
        self.attn_dropout = config.attn_dropout
        self.resid_drop = nn.Dropout(config.resid_dropout)
        self.kv_cache: LatentCache | None = None
        self.absorb = True  # cached forwards attend over the latent (False: rebuild k/v, same result)

    def make_cache(self, batch_size: int, n_slots: int, dtype: torch.dtype, device=None) -> LatentCache:
        return LatentCache(batch_size, n_slots, self.kv_rank, self.rope_dim, dtype, device)

    def forward(self, x, rope=None, mask=None, input_pos=None):
        B, T, _ = x.shape
        q = self.wq(x) if self.wq is not None else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_pe = q.view(B, T, self.n_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_pe = self.wkv_a(x).split([self.kv_rank, self.rope_dim], dim=-1)  # (B,T,r), (B,T,R)
        k_pe = k_pe.unsqueeze(2)  # (B, T, 1, R): one key head for all query heads
        if rope is not None:
            q_pe, k_pe = apply_rope(q_pe, *rope), apply_rope(k_pe, *rope)
        kv = torch.cat((self.kv_norm(c_kv), k_pe.squeeze(2)), dim=-1)  # (B, T, r+R)
        dropout_p = self.attn_dropout if self.training else 0.0
        if self.kv_cache is None:
            y = self._naive(q_nope, q_pe, kv, mask, dropout_p)
        else:
            kv = self.kv_cache.update(input_pos, kv)  # (B, S, r+R)
            if self.absorb and isinstance(self.wkv_b, nn.Linear):  # a quantized wkv_b has no float weight
                if mask is None:  # heads are folded into the queries below: SDPA's is_causal would misalign
                    mask = causal_mask(input_pos, kv.shape[1])
                y = self._absorbed(q_nope, q_pe, kv, mask, dropout_p)
            else:
                y = self._naive(q_nope, q_pe, kv, mask, dropout_p)
        return self.resid_drop(self.wo(y.reshape(B, T, -1)))  # y (B, T, H, V)

    def _naive(self, q_nope, q_pe, kv, mask, dropout_p):
        """Rebuild per-head keys and values from the latent; q_* (B,T,H,N|R), kv (B,S,r+R) -> (B,T,H,V)."""
        B, S, _ = kv.shape
        c_kv, k_pe = kv.split([self.kv_rank, self.rope_dim], dim=-1)
        k_nope, v = self.wkv_b(c_kv).view(B, S, self.n_heads, -1).split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)), dim=-1)  # (B, S, H, N+R)
        q = torch.cat((q_nope, q_pe), dim=-1)  # (B, T, H, N+R)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T|S, D)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None, scale=self.scale
        )
        return y.transpose(1, 2)  # (B, T, H, V)

    def _absorbed(self, q_nope, q_pe, kv, mask, dropout_p):
        """Attend over the latent itself; q_* (B,T,H,N|R), kv (B,S,r+R), mask (B|1,1,T,S) -> (B,T,H,V).

        q_nope . k_nope = q_nope . (W_uk c_kv) = (q_nope W_uk) . c_kv, and sum_s p_s W_uv c_s =
        W_uv sum_s p_s c_s: the per-head up-projections move off the S keys onto the T queries.
        """
        B, T, H, _ = q_nope.shape
        w_uk, w_uv = self.wkv_b.weight.view(H, -1, self.kv_rank).split([self.nope_dim, self.v_dim], dim=1)
        q_lat = torch.einsum("bthn,hnr->bhtr", q_nope, w_uk)  # (B, H, T, r)
        q = torch.cat((q_lat, q_pe.transpose(1, 2)), dim=-1)  # (B, H, T, r+R)
        # One key/value head serves all H: fold heads into the query axis (B, 1, H*T, r+R).
        q = q.reshape(B, 1, H * T, -1)
        mask = mask.expand(-1, H, -1, -1).reshape(mask.shape[0], 1, H * T, -1)  # (B|1, 1, H*T, S)
        kv = kv.unsqueeze(1)  # (B, 1, S, r+R); values are the latent part
        y = F.scaled_dot_product_attention(
            q, kv, kv[..., : self.kv_rank], attn_mask=mask, dropout_p=dropout_p, scale=self.scale
        )
        return torch.einsum("bhtr,hvr->bthv", y.view(B, H, T, -1), w_uv)  # (B, T, H, V)
