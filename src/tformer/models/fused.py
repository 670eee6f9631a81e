"""Decode kernels for a whole model: decode steps through fused Triton kernels, as class swaps.

    with_decode_kernels(model)     # in place; parameters, buffers and state dict unchanged
    without_decode_kernels(model)  # back to the plain classes

At batch 1 a Llama-style block is seven weight reads and a dozen small kernels around them
(norms, residual adds, the SwiGLU product). After the swap a pre-norm block's one-row forward is

    qkv = matvec(x, wqkv, norm=attn_norm)           RMSNorm fused into the product
    a   = cached_attention(qkv, rope, cache)         RoPE, cache write and attention in one kernel
    h   = matvec(a, wo, residual=x)                  + residual in the epilogue
    g   = matvec(h, w1, up=w3, norm=ffn_norm)        silu(w1 h) * (w3 h), one kernel for both weights
    y   = matvec(g, w2, residual=h)

five kernels a layer; each value is rounded where the unfused modules round it. The model's final
RMSNorm runs inside the output head's kernel the same way (`FusedDecoder`). The same five
serve a few rows (up to MAX_ROWS tokens in all, at most 16 new tokens a sequence: a speculative
verify, a small batch), where matvec switches to its tensor-core kernel. Every other call (long
prompts, large batches, training, CPU, layers the kernel cannot read such as tinygemm's int4)
runs the unfused code, so a swapped model stays correct everywhere. Full-precision nn.Linear layers become
`MatvecLinear` (the head included).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from tformer.kernels.fused_attention import cached_attention, use_cached_attention
from tformer.kernels.base import reserve_counters
from tformer.kernels.gemv import matvec, use_matvec
from tformer.kernels.linear import MatvecLinear
from tformer.models.blocks import Block
from tformer.models.decoder import Decoder
from tformer.nn.attention import Attention
from tformer.nn.mlp import GatedFeedForward
from tformer.nn.norm import RMSNorm


def _stored(linear: nn.Module):
    return linear.matvec_weight() if hasattr(linear, "matvec_weight") else None


def _project(linear: nn.Module, x, norm: nn.Module | None = None, residual=None, after_short_kernel=False):
    """residual + linear(norm(x)), in one kernel where the layer and the norm allow it.
    after_short_kernel: x comes from a short kernel (attention), so the weights load whole while it runs
    (`matvec`'s whole_rows). A residual must come from before the kernel before this one (a block's input,
    or its attention output after the FFN's first kernel): it loads before the wait (`residual_early`)."""
    w = _stored(linear)
    if w is not None and not use_matvec(x, x.shape[-1], w.fmt):
        w = None
    if norm is not None and (w is None or not isinstance(norm, RMSNorm)):
        x, norm = norm(x), None
    if w is None:
        y = linear(x)
        return y if residual is None else residual + y
    norm_args = None if norm is None else (norm.weight, norm.eps)
    return matvec(x, *w, norm=norm_args, bias=linear.bias, residual=residual, whole_rows=after_short_kernel,
                  residual_early=True)


def _ffn(ffn: nn.Module, x, norm: nn.Module):
    """x + ffn(norm(x)); a SwiGLU FFN over same-format weights as two kernels: RMSNorm, w1, w3 and
    silu(w1 n) * (w3 n) in one, w2 and the residual in the other."""
    gated = isinstance(ffn, GatedFeedForward) and ffn.act is F.silu and isinstance(norm, RMSNorm)
    gate, up = (_stored(ffn.w1), _stored(ffn.w3)) if gated else (None, None)
    if (gate is None or up is None or gate.fmt != up.fmt or not use_matvec(x, x.shape[-1], gate.fmt)
            or ffn.w1.bias is not None or ffn.w3.bias is not None):
        return x + ffn(norm(x))
    return _project(ffn.w2, matvec(x, *gate, norm=(norm.weight, norm.eps), up=up), residual=x)


def _attend(attn: Attention, qkv, rope, mask, input_pos):
    """attn.attend(...), as one kernel (RoPE, cache write, attention) where it applies."""
    cache = attn.kv_cache
    k, v = (None, None) if cache is None else (cache.k, cache.v)
    if attn.capture or not use_cached_attention(qkv, k, v, mask, rope, attn.n_heads):
        return attn.attend(qkv, rope, mask, input_pos)
    return cached_attention(qkv, rope, k, v, input_pos, mask, attn.n_heads)


class FusedAttention(Attention):
    """Attention whose caches come with the counters the kernels merge split work by (`reserve_counters`),
    made here, eagerly: allocated later, inside a CUDA-graph tree's warm-up, they would land in its pool."""

    def make_cache(self, batch_size: int, n_slots: int, dtype, device=None):
        self.reserve_counters(batch_size, device)
        return super().make_cache(batch_size, n_slots, dtype, device)

    def reserve_counters(self, batch_size: int, device) -> None:
        reserve_counters(device, batch_size * self.n_heads)  # one per (sequence, query head)


class FusedBlock(Block):
    """A pre-norm Block whose few-row eval forward runs through the fused kernels (module docstring)."""

    def forward(self, x, rope=None, mask=None, input_pos=None):
        if self.training or not use_matvec(x, x.shape[-1]):
            return super().forward(x, rope, mask, input_pos)
        attn = self.attn
        qkv = _project(attn.wqkv, x, norm=self.attn_norm)
        h = _project(attn.wo, _attend(attn, qkv, rope, mask, input_pos), residual=x, after_short_kernel=True)
        return _ffn(self.ffn, h, self.ffn_norm)


class FusedDecoder(Decoder):
    """A Decoder whose few-row forward applies the final RMSNorm inside the output head's kernel."""

    def forward(self, tokens, input_pos=None, attention_mask=None):
        return _project(self.output, self.hidden(tokens, input_pos, attention_mask), norm=self.norm)


def with_decode_kernels(model: nn.Module) -> nn.Module:
    """Swap in place: full-precision nn.Linear -> MatvecLinear, pre-norm attention Block -> FusedBlock
    (its Attention -> FusedAttention), Decoder -> FusedDecoder."""
    for m in model.modules():
        if type(m) is Decoder:
            m.__class__ = FusedDecoder
        elif type(m) is nn.Linear:
            m.__class__ = MatvecLinear
        elif type(m) is Block and type(m.attn) is Attention:
            m.__class__, m.attn.__class__ = FusedBlock, FusedAttention
            cache = m.attn.kv_cache
            if cache is not None:  # made before the swap
                m.attn.reserve_counters(cache.k.shape[0], cache.k.device)
    return model


def without_decode_kernels(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if type(m) is FusedDecoder:
            m.__class__ = Decoder
        elif type(m) is MatvecLinear:
            m.__class__ = nn.Linear
        elif type(m) is FusedBlock:
            m.__class__, m.attn.__class__ = Block, Attention
    return model
