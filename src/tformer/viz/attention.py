"""Attention maps: each layer's softmax weights, recorded from outside the model.

    with capture_attention(model) as maps:
        model(tokens)
    maps[0]  # (B, H, T, S): the first layer's weights

Inside the context every `Attention` (self- or cross-attention, with its own scale) computes
`reference_attention` (the textbook formula, which yields the weights) instead of SDPA, through an
instance attribute that shadows `Attention.core`; every `LatentAttention` (MLA) runs its naive path
(per-head keys rebuilt from the latent) through the same formula, shadowing `LatentAttention._naive`.
On exit the attributes go and the modules are as before. Cache-free forwards only: an MLA layer
with a KV cache attends over the latent instead.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from tformer.nn.attention import Attention, reference_attention
from tformer.nn.mla import LatentAttention


class capture_attention:
    """Context manager: collect each attention layer's weights (B, H, T, S), in call order, for
    every forward run inside it."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, (Attention, LatentAttention))]
        if not self.layers:
            raise ValueError("the model has no attention layers (tformer.nn.attention.Attention or "
                             "tformer.nn.mla.LatentAttention) to capture")
        self.maps: list[torch.Tensor] = []

    def __enter__(self) -> list[torch.Tensor]:
        for layer in self.layers:
            if isinstance(layer, LatentAttention):
                layer._naive = partial(self._recording_latent, layer)
            else:
                layer.core = partial(self._recording, scale=layer.scale,  # T5's 1.0, or None: 1/sqrt(D)
                                     softcap=getattr(layer, "softcap", None))  # nn.variants.SoftcapAttention
        return self.maps

    def _recording(self, q, k, v, mask=None, dropout_p: float = 0.0, scale: float | None = None,
                   softcap: float | None = None):
        y, weights = reference_attention(q, k, v, mask, dropout_p, scale, softcap)
        self.maps.append(weights.detach())
        return y

    def _recording_latent(self, layer: LatentAttention, q_nope, q_pe, kv, mask, dropout_p):
        """`LatentAttention._naive` through `reference_attention`: q_* (B,T,H,N|R), kv (B,S,r+R) -> (B,T,H,V)."""
        B, S, _ = kv.shape
        c_kv, k_pe = kv.split([layer.kv_rank, layer.rope_dim], dim=-1)
        k_nope, v = layer.wkv_b(c_kv).view(B, S, layer.n_heads, -1).split([layer.nope_dim, layer.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(-1, -1, layer.n_heads, -1)), dim=-1)  # (B, S, H, N+R)
        q = torch.cat((q_nope, q_pe), dim=-1)  # (B, T, H, N+R)
        q = q * (layer.scale * math.sqrt(q.shape[-1]))  # reference_attention divides by sqrt(N+R)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T|S, D)
        return self._recording(q, k, v, mask, dropout_p).transpose(1, 2)  # (B, T, H, V)

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            if isinstance(layer, LatentAttention):
                del layer._naive
            else:
                del layer.core
