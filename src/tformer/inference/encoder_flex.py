"""FlexAttention for encoders (torch.nn.attention.flex_attention), swapped in from outside the model.

`use_flex_attention(model)` gives an encoder's forward a `make_mask` that builds FlexAttention
block masks (from `tformer.nn.masks.encoder_mask_mod`, the rule the dense SDPA masks follow) once
per batch and layer kind, and gives every layer's attention a `core` that calls `flex_attention`.
A padding-free batch (`Encoder.forward(tokens (1,N), segments=...)`) then costs attention only in
the blocks on its block diagonal, where a dense (N, N) mask would cost N^2 time and memory; the
sliding-window layers skip the blocks outside their band. The model code is unchanged, so the
dense path (`use_sdpa`) and this one give the same outputs (tests/test_encoder_packed.py).

FlexAttention is fast only compiled (`compile=True`, CUDA); uncompiled it runs everywhere, slowly.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from tformer.models.encoder import Encoder
from tformer.nn.masks import encoder_mask, encoder_mask_mod


class FlexAttention:
    """The state of the swap: the (compiled) attention function, used by `make_mask` and `core`."""

    def __init__(self, compile: bool = True):
        self.compile = compile
        self.attend = torch.compile(flex_attention) if compile else flex_attention

    def make_mask(self, B: int, T: int, key_valid=None, segments=None, window=None, device=None) -> BlockMask:
        """`Encoder.make_mask`'s signature: a BlockMask for one layer kind of one batch."""
        per_row = key_valid is not None or segments is not None
        mask_mod = encoder_mask_mod(key_valid, segments, window)
        return create_block_mask(mask_mod, B if per_row else None, None, T, T, device=device, _compile=self.compile)

    def core(self, q, k, v, mask: BlockMask, dropout_p: float = 0.0):
        """`Attention.core`'s signature: q (B, H, T, D), k/v (B, Hkv, T, D) -> (B, H, T, D)."""
        if dropout_p:
            raise ValueError("FlexAttention has no attention dropout: call model.eval(), or use_sdpa(model) to train")
        return self.attend(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def _encoder(model: nn.Module) -> Encoder:
    encoder = model if isinstance(model, Encoder) else getattr(model, "encoder", None)
    if not isinstance(encoder, Encoder):
        raise TypeError(f"FlexAttention swaps into an Encoder or a model with one (.encoder), got {type(model).__name__}")
    return encoder


def use_flex_attention(model: nn.Module, compile: bool = True) -> FlexAttention:
    """Make `model` (an Encoder, or a model whose `.encoder` is one) attend through FlexAttention."""
    encoder, flex = _encoder(model), FlexAttention(compile)
    encoder.make_mask = flex.make_mask
    for layer in encoder.layers:
        layer.attn.core = flex.core
    return flex


def use_sdpa(model: nn.Module) -> None:
    """Undo `use_flex_attention`: dense masks and torch SDPA again."""
    encoder = _encoder(model)
    encoder.make_mask = encoder_mask
    for layer in encoder.layers:
        layer.attn.__dict__.pop("core", None)
