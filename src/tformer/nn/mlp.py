"""Position-wise feed-forward networks. Shapes: (B, T, C) -> (B, T, C), F = ffn_dim."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tformer.config import GATED_ACTIVATIONS, ModelConfig

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"
    "silu": F.silu,
}


class FeedForward(nn.Module):
    """w2(act(w1 x)): the original Transformer / GPT-2 / BERT FFN."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_dim, bias=config.ffn_bias)
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=config.ffn_bias)
        self.act = ACTIVATIONS[config.activation]
        self.drop = nn.Dropout(config.resid_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.w2(self.act(self.w1(x))))


class GatedFeedForward(nn.Module):
    """w2(act(w1 x) * w3 x): GLU variants (Shazeer 2020); SwiGLU uses SiLU, GeGLU GELU.

    ffn_dim: the width F, if not config.ffn_dim (an MoE's shared experts).
    """

    def __init__(self, config: ModelConfig, ffn_dim: int | None = None):
        super().__init__()
        ffn_dim = ffn_dim or config.ffn_dim
        self.w1 = nn.Linear(config.dim, ffn_dim, bias=config.ffn_bias)  # gate
        self.w3 = nn.Linear(config.dim, ffn_dim, bias=config.ffn_bias)  # up
        self.w2 = nn.Linear(ffn_dim, config.dim, bias=config.ffn_bias)  # down
        self.act = ACTIVATIONS[GATED_ACTIVATIONS[config.activation]]
        self.drop = nn.Dropout(config.resid_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.w2(self.act(self.w1(x)) * self.w3(x)))


def make_ffn(config: ModelConfig) -> nn.Module:
    return GatedFeedForward(config) if config.gated else FeedForward(config)
