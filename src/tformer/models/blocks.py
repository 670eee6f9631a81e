"""Transformer blocks: self-attention and a feed-forward network, each with a residual.

Pre-norm (GPT-2, Llama):               Post-norm (original Transformer, BERT):
  h = x + attn(norm1(x))                 h = norm1(x + attn(x))
  y = h + ffn(norm2(h))                  y = norm2(h + ffn(h))

Decoder blocks of an encoder-decoder add cross-attention to the encoder's output m between the two:
  Pre-norm (T5):                         Post-norm (original Transformer, Marian):
  h = x + attn(attn_norm(x))             h = attn_norm(x + attn(x))
  g = h + cross(cross_norm(h), m)        g = cross_norm(h + cross(h, m))
  y = g + ffn(ffn_norm(g))               y = ffn_norm(g + ffn(g))
"""

from __future__ import annotations

from torch import nn

from tformer.config import ModelConfig
from tformer.nn.approx import make_approx_attention
from tformer.nn.attention import Attention, CrossAttention
from tformer.nn.mla import LatentAttention
from tformer.nn.mlp import make_ffn
from tformer.nn.moe import MoE
from tformer.nn.norm import make_norm
from tformer.nn.ssd import SSD
from tformer.nn.variants import SoftcapAttention


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = make_attention(config, layer)
        self.ffn_norm = make_norm(config)
        self.ffn = MoE(config) if config.is_moe_layer(layer) else make_ffn(config)

    def forward(self, x, rope=None, mask=None, input_pos=None):
        h = x + self.attn(self.attn_norm(x), rope, mask, input_pos)
        return h + self.ffn(self.ffn_norm(h))


class PostNormBlock(Block):
    def forward(self, x, rope=None, mask=None, input_pos=None):
        h = self.attn_norm(x + self.attn(x, rope, mask, input_pos))
        return self.ffn_norm(h + self.ffn(h))


def make_attention(config: ModelConfig, layer: int = 0) -> nn.Module:
    """A decoder layer's attention: MLA, softcapped (explicit scores), or multi-head attention."""
    if config.mla is not None:
        return LatentAttention(config)
    return SoftcapAttention(config) if config.attention.softcap is not None else make_approx_attention(config, layer)


class SSDBlock(nn.Module):
    """A pre-norm block whose token mixer is a Mamba-2 state-space layer (tformer.nn.ssd), not attention:

        h = x + mixer(mixer_norm(x));  y = h + ffn(ffn_norm(h))

    `mask` is the mixer's: (B, T) sequence starts or None (Decoder gives each kind of block its own)."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.mixer_norm = make_norm(config)
        self.mixer = SSD(config)
        self.ffn_norm = make_norm(config)
        self.ffn = MoE(config) if config.is_moe_layer(layer) else make_ffn(config)

    def forward(self, x, rope=None, mask=None, input_pos=None):
        h = x + self.mixer(self.mixer_norm(x), rope, mask, input_pos)
        return h + self.ffn(self.ffn_norm(h))


def make_block(config: ModelConfig, layer: int = 0) -> nn.Module:
    """Block number `layer` (0-based): SSD layers, MoE layers and MLA are chosen from the config here."""
    if config.is_ssd_layer(layer):
        return SSDBlock(config, layer)
    return PostNormBlock(config, layer) if config.norm_placement == "post" else Block(config, layer)


class DecoderBlock(nn.Module):
    """Pre-norm block of an encoder-decoder's decoder: causal self-attention, cross-attention, FFN.

    mask: the self-attention's (causal, or None for SDPA's causal path); cross_mask (B,1,1,S) bool:
    the source keys that are real. memory (B,S,C) or None: read the cross-attention caches."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        self.cross_norm = make_norm(config)
        self.cross = CrossAttention(config)
        self.ffn_norm = make_norm(config)
        self.ffn = make_ffn(config)

    def forward(self, x, memory, mask=None, cross_mask=None, input_pos=None):
        h = x + self.attn(self.attn_norm(x), None, mask, input_pos)
        g = h + self.cross(self.cross_norm(h), memory, cross_mask)
        return g + self.ffn(self.ffn_norm(g))


class PostNormDecoderBlock(DecoderBlock):
    def forward(self, x, memory, mask=None, cross_mask=None, input_pos=None):
        h = self.attn_norm(x + self.attn(x, None, mask, input_pos))
        g = self.cross_norm(h + self.cross(h, memory, cross_mask))
        return self.ffn_norm(g + self.ffn(g))


def make_decoder_block(config: ModelConfig) -> nn.Module:
    return PostNormDecoderBlock(config) if config.norm_placement == "post" else DecoderBlock(config)
