"""Attention maps: each layer's softmax weights, recorded from outside the model.

    with capture_attention(model) as maps:
        model(tokens)
    maps[0]  # (B, H, T, S): the first layer's weights

Inside the context every `Attention` computes `reference_attention` (the textbook formula, which
yields the weights) instead of SDPA, through an instance attribute that shadows `Attention.core`;
on exit the attribute goes and the modules are as before.
"""

from __future__ import annotations

import torch
from torch import nn

from tformer.nn.attention import Attention, reference_attention


class capture_attention:
    """Context manager: collect each attention layer's weights (B, H, T, S), in call order, for
    every forward run inside it."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, Attention)]
        if not self.layers:
            raise ValueError("the model has no multi-head attention layers (tformer.nn.attention.Attention) "
                             "to capture: latent attention (MLA) has no per-head map of its own")
        self.maps: list[torch.Tensor] = []

    def __enter__(self) -> list[torch.Tensor]:
        for layer in self.layers:
            layer.core = self._recording
        return self.maps

    def _recording(self, q, k, v, mask=None, dropout_p: float = 0.0):
        y, weights = reference_attention(q, k, v, mask, dropout_p)
        self.maps.append(weights.detach())
        return y

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            del layer.core
