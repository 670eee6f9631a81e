"""FlexAttention for decoders (torch.nn.attention.flex_attention), swapped in from outside the model.

`use_flex_attention(decoder)` gives the decoder a `make_mask` that turns each layer rule of
tformer.nn.variants (the mask_mods the dense SDPA masks are evaluated from) into a BlockMask, and
gives every attention layer a `core` that calls `flex_attention` with the variant's score_mod
(ALiBi's bias, Gemma 2's softcap). Layers with the same rule share one mask per forward.

Block masks of forwards that read no per-row data (no cache, padding or packing: pretraining
batches) depend only on the rule and the length: they are built once per (rule, length rounded up
to `bucket`) for the whole batch (B = None). Where no query sees a later key (every rule but
prefix-LM) and no score_mod reads the forward's positions (ALiBi's does), attention runs at the
bucket length: q, k and v are padded with zeros (keys no real query sees) and the output cut back,
so the compiled attention meets one shape per bucket and changing lengths do not recompile every
step (a block mask's lengths are guarded as constants). Otherwise the bucket's mask is cut to the
forward's length. Forwards with per-row data (packed `segments`, padding, cache decode) build one
per rule per forward. FlexAttention is fast only compiled (CUDA); uncompiled it runs everywhere,
slowly.

`use_attention_backend(model, device)` applies `ModelConfig.attention.backend` ("auto": flex on
CUDA for configs that are not plain causal attention, SDPA elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from tformer.models.decoder import Decoder
from tformer.nn.attention import Attention
from tformer.nn.variants import LayerRule, MaskInputs, dense_mask, mask_mod, softcap_score_mod


FLEX_MIN_HEAD_DIM = 16  # the smallest head the CUDA kernels take


@dataclass
class FlexMask:
    """A layer's FlexAttention arguments: which blocks and keys it sees, and how scores change."""

    block_mask: BlockMask
    score_mod: Callable | None = None
    pad_to: int | None = None  # run at this (bucket) length: q, k, v padded with zeros, the output cut back


class DecoderFlex:
    """The state of the swap: the (compiled) attention function and the block masks kept for reuse.

    builds counts the block masks made, so that their reuse can be checked."""

    def __init__(self, softcap: float | None = None, compile: bool = True, bucket: int = 128):
        self.softcap, self.compile, self.bucket = softcap, compile, bucket
        self.attend = torch.compile(flex_attention) if compile else flex_attention
        self.block_masks: dict[tuple, BlockMask] = {}
        self.builds = 0

    def make_mask(self, rule: LayerRule, inputs: MaskInputs, bias=None, n_heads: int = 1) -> FlexMask:
        """`Decoder.make_mask`'s signature: one rule's FlexMask for one forward."""
        score_mod = bias if self.softcap is None else softcap_score_mod(self.softcap, bias)
        if inputs.plain:
            T, device = inputs.q_slots.shape[0], inputs.q_slots.device
            L = -(-T // self.bucket) * self.bucket
            if L != T and rule.pattern != "prefix" and bias is None:  # no query sees a later key, and no
                # score_mod reads the forward's positions (ALiBi's): padded keys stay unseen
                return FlexMask(self._kept(rule, L, device), score_mod, pad_to=L)
            return FlexMask(self._shared(rule, T, device), score_mod)
        self.builds += 1
        T, device = inputs.q_slots.shape[-1], inputs.q_slots.device
        block_mask = create_block_mask(mask_mod(rule, inputs), inputs.rows, None, T, inputs.n_keys, device=device,
                                       _compile=self.compile)
        return FlexMask(block_mask, score_mod)

    def _shared(self, rule: LayerRule, T: int, device) -> BlockMask:
        """The batch-wide block mask of `rule` over T queries and keys, built at T rounded up to `bucket`
        (and cut to T), or at T itself where this torch cannot cut it."""
        L = -(-T // self.bucket) * self.bucket
        block_mask = self._kept(rule, L, device)
        return block_mask if L == T else crop(block_mask, T) or self._kept(rule, T, device)

    def _kept(self, rule: LayerRule, L: int, device) -> BlockMask:
        """`rule`'s block mask over L queries and keys, built once per (rule, L, device)."""
        key = (rule, L, str(device))
        if key not in self.block_masks:
            self.builds += 1
            inputs = MaskInputs(torch.arange(L, device=device), L)
            self.block_masks[key] = create_block_mask(mask_mod(rule, inputs), None, None, L, L, device=device,
                                                      _compile=self.compile)
        return self.block_masks[key]

    def core(self, q, k, v, mask: FlexMask, dropout_p: float = 0.0):
        """`Attention.core`'s signature: q (B, H, T, D), k/v (B, Hkv, S, D) -> (B, H, T, D)."""
        if dropout_p:
            raise ValueError("FlexAttention has no attention dropout: set attn_dropout=0, or use_sdpa(model) to train")
        T = q.shape[2]
        if mask.pad_to is not None:
            q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, mask.pad_to - T)) for t in (q, k, v))
        out = self.attend(q, k, v, score_mod=mask.score_mod, block_mask=mask.block_mask,
                          enable_gqa=q.shape[1] != k.shape[1])
        return out[:, :, :T] if mask.pad_to is not None else out


def crop(block_mask: BlockMask, T: int) -> BlockMask | None:
    """The top-left T x T of a square block mask, for T queries and keys; None where this torch cannot
    say the new lengths. `BlockMask._adjust` crops the blocks; before torch 2.13 it kept the old
    lengths, which flex_attention then refuses."""
    cropped = block_mask._adjust(T, T)
    if tuple(cropped.seq_lengths) == (T, T):
        return cropped
    try:
        return BlockMask.from_kv_blocks(cropped.kv_num_blocks, cropped.kv_indices, cropped.full_kv_num_blocks,
                                        cropped.full_kv_indices, BLOCK_SIZE=cropped.BLOCK_SIZE,
                                        mask_mod=cropped.mask_mod, seq_lengths=(T, T))
    except TypeError:  # from_kv_blocks without seq_lengths
        return None


def _decoder(model: nn.Module) -> Decoder:
    if not isinstance(model, Decoder):
        raise TypeError(f"decoder FlexAttention swaps into a Decoder, got {type(model).__name__} "
                        "(encoders: tformer.inference.encoder_flex)")
    return model


def _flex_layers(decoder: Decoder) -> list[Attention]:
    """The attention modules the swap serves: multi-head attention (softcapped or not) in every layer
    that attends. MLA and the approximations compute their own attention and are refused."""
    c = decoder.config
    if c.mla is not None or c.attention.approx != "none":
        raise ValueError("FlexAttention serves exact multi-head attention: set attention.backend='sdpa' for "
                         "MLA or an attention approximation")
    return [layer.attn for layer in decoder.layers if isinstance(getattr(layer, "attn", None), Attention)]


def use_flex_attention(model: nn.Module, compile: bool = True, bucket: int = 128) -> DecoderFlex:
    """Make a Decoder attend through FlexAttention (module docstring); `use_sdpa` undoes it."""
    decoder = _decoder(model)
    layers = _flex_layers(decoder)
    flex = DecoderFlex(decoder.config.attention.softcap, compile, bucket)
    decoder.make_mask = flex.make_mask
    for attn in layers:
        attn.core = flex.core
    return flex


def use_sdpa(model: nn.Module) -> None:
    """Undo `use_flex_attention`: dense masks and torch SDPA (or explicit scores for a softcap) again."""
    decoder = _decoder(model)
    decoder.make_mask = dense_mask
    for layer in decoder.layers:
        getattr(layer, "attn", nn.Module()).__dict__.pop("core", None)


def wants_flex(model: nn.Module, device: torch.device | str) -> bool:
    """Whether `model`'s attention.backend asks for FlexAttention on `device`: "flex"; or "auto" on CUDA
    for a decoder whose attention is more than plain causal (FlashAttention serves that through SDPA),
    with no attention dropout, MLA or approximation, and heads of at least 16 dimensions."""
    c = getattr(model, "config", None)
    if not isinstance(model, Decoder) or c is None:
        return False
    a = c.attention
    if a.backend != "auto":
        return a.backend == "flex"
    plain = all(rule.plain for rule in model.rules) and model.alibi is None and a.softcap is None
    exact = c.mla is None and a.approx == "none" and c.attn_dropout == 0
    return torch.device(device).type == "cuda" and exact and not plain and c.head_dim >= FLEX_MIN_HEAD_DIM


def use_attention_backend(model: nn.Module, device: torch.device | str, compile: bool = True,
                          training: bool = False) -> DecoderFlex | None:
    """Apply `model.config.attention.backend` (`wants_flex`); returns the swap's state, or None for SDPA.
    compile=False when the blocks are compiled from outside (they compile flex_attention with them);
    off CUDA FlexAttention runs uncompiled, and cannot train (torch has no CPU backward for it)."""
    if not wants_flex(model, device):
        return None
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda and model.config.head_dim < FLEX_MIN_HEAD_DIM:
        raise ValueError(f"FlexAttention on CUDA needs head_dim >= {FLEX_MIN_HEAD_DIM}, the model has "
                         f"{model.config.head_dim}: set attention.backend to 'auto' or 'sdpa'")
    if training and not on_cuda:
        raise ValueError(f"attention.backend='flex' trains on CUDA only (FlexAttention has no backward on "
                         f"{torch.device(device).type}): set attention.backend to 'auto' or 'sdpa'")
    return use_flex_attention(model, compile=compile and on_cuda)
