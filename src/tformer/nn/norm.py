"""Normalisation layers. Shapes: (..., C)."""

from __future__ import annotations

import torch
from torch import nn

from tformer.config import ModelConfig


class RMSNorm(nn.Module):
    """Zhang & Sennrich 2019: x / rms(x) * weight, computed in fp32 (as Llama does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.dim
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.norm_bias)
