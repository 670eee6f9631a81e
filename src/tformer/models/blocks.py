"""Transformer blocks: self-attention and a feed-forward network, each with a residual.

Pre-norm (GPT-2, Llama):               Post-norm (original Transformer, BERT):
  h = x + attn(norm1(x))                 h = norm1(x + attn(x))
  y = h + ffn(norm2(h))                  y = norm2(h + ffn(h))
"""

from __future__ import annotations

from torch import nn

from tformer.config import ModelConfig
from tformer.nn.attention import Attention
from tformer.nn.mla import LatentAttention
from tformer.nn.mlp import make_ffn
from tformer.nn.moe import MoE
from tformer.nn.norm import make_norm


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = LatentAttention(config) if config.mla is not None else Attention(config)
        self.ffn_norm = make_norm(config)
        self.ffn = MoE(config) if config.is_moe_layer(layer) else make_ffn(config)

    def forward(self, x, rope=None, mask=None, input_pos=None):
        h = x + self.attn(self.attn_norm(x), rope, mask, input_pos)
        return h + self.ffn(self.ffn_norm(h))


class PostNormBlock(Block):
    def forward(self, x, rope=None, mask=None, input_pos=None):
        h = self.attn_norm(x + self.attn(x, rope, mask, input_pos))
        return self.ffn_norm(h + self.ffn(h))


def make_block(config: ModelConfig, layer: int = 0) -> nn.Module:
    """Block number `layer` (0-based): MoE layers and MLA are chosen from the config here."""
    return PostNormBlock(config, layer) if config.norm_placement == "post" else Block(config, layer)
