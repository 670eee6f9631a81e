"""Decoder-only language model (GPT-2, Llama, Mistral, Qwen2, ...), assembled from `tformer.nn`.

    tokens (B,T) -> tok_emb (+ absolute positions) -> dropout -> n_layers x Block
                 -> final norm (pre-norm models) -> output -> logits (B,T,vocab)

Positions: without padding a token's position is its slot (0..T-1, or `input_pos` with a
KV cache). With a key-padding `attention_mask` (B,S; 1 = real token) positions count real
tokens only, so a left-padded row gives the same logits as the unpadded row alone. With
`segments` (B,T; packed training sequences) each run of equal ids is a sequence of its own:
positions restart at its first token and attention stays inside it, so a packed row gives each
example the logits it has alone.

Attention: each layer's rule (tformer.nn.variants: causal, its window, prefix-LM, sparse or
local + global patterns) gives its mask; layers with the same rule share one, built once per
forward by `make_mask` (dense masks for SDPA; tformer.inference.flex swaps in block masks).
ALiBi and T5's relative bias (`positions`) enter as the variants' score_mods.
"""

from __future__ import annotations

import torch
from torch import nn

from tformer.config import ModelConfig
from tformer.models.blocks import SSDBlock, make_block
from tformer.nn.attention import Attention
from tformer.nn.kv_cache import RollingKVCache
from tformer.nn.masks import segment_positions
from tformer.nn.norm import make_norm
from tformer.nn.position import Alibi, LearnedPositions, NoPositions, RelativePositionBias, SinusoidalPositions
from tformer.nn.rope import RotaryEmbedding
from tformer.nn.ssd import sequence_starts
from tformer.nn.variants import MaskInputs, alibi_score_mod, dense_mask, layer_rules, t5_score_mod


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.pos_emb = _absolute_positions(config)
        self.emb_drop = nn.Dropout(config.emb_dropout)
        self.rope = RotaryEmbedding(config.rope, config.rope_dim) if config.positions == "rope" else None
        self.alibi = Alibi(config.n_heads) if config.positions == "alibi" else None
        self.rel_bias = (RelativePositionBias(config.rel_buckets, config.rel_max_distance, config.n_heads, False)
                         if config.positions == "t5" else None)  # T5's causal relative position bias
        self.layers = nn.ModuleList(make_block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config) if config.norm_placement == "pre" else nn.Identity()
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.tie_weights()
        self.cache_slots = 0  # > 0 while caches are attached (attach_caches)
        self.rules = layer_rules(config)  # which keys each layer's queries see (tformer.nn.variants)
        self.make_mask = dense_mask  # (rule, MaskInputs, bias, n_heads) -> a layer's mask (SDPA's; flex swaps)

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.output.weight = self.tok_emb.weight

    def make_caches(self, batch_size: int, n_slots: int, dtype: torch.dtype | None = None, rolling: bool = False,
                    chunk: int = 1) -> list[nn.Module]:
        """New KV caches, one a layer, for `batch_size` sequences of `n_slots` positions, on the
        model's device, in `dtype` (default: the embeddings').

        rolling: a sliding-window layer keeps only its window's keys (`RollingKVCache`, window + chunk - 1
        slots) where that is fewer than n_slots and its attention reads nothing outside the window
        (plain multi-head attention, causal pattern); other layers keep a slot a position. chunk: the
        most tokens a forward writes in place, and one more than the most positions a forward may go
        back (speculative decoding's k drafts: k + 1). A ring re-reads dense masks only: under
        FlexAttention's block masks every layer keeps a slot a position."""
        dtype = dtype or self.tok_emb.weight.dtype
        device = self.tok_emb.weight.device
        rolling = rolling and self.make_mask is dense_mask
        caches = []
        for i, layer in enumerate(self.layers):
            if isinstance(layer, SSDBlock):  # a constant-size state, not keys and values
                caches.append(layer.mixer.make_cache(batch_size, n_slots, dtype, device))
                continue
            window = rolling_window(self.config, i, layer.attn) if rolling else None
            if window is not None and window + chunk - 1 < n_slots:
                a = layer.attn
                caches.append(RollingKVCache(batch_size, n_slots, window, a.n_kv_heads, a.head_dim, dtype, device,
                                             chunk))
            else:
                caches.append(layer.attn.make_cache(batch_size, n_slots, dtype, device))
        return caches

    def attach_caches(self, caches: list[nn.Module]) -> None:
        """Forwards from now on write keys and values into `caches` (`make_caches`) and attend over
        all their slots; tokens then need `input_pos`."""
        if len(caches) != len(self.layers):
            raise ValueError(f"{len(caches)} caches for {len(self.layers)} layers")
        for layer, cache in zip(self.layers, caches):
            if isinstance(layer, SSDBlock):
                layer.mixer.cache = cache
            else:
                layer.attn.kv_cache = cache
        self.cache_slots = caches[0].n_slots

    def setup_caches(self, batch_size: int, n_slots: int, dtype: torch.dtype | None = None) -> None:
        """Attach new caches (`make_caches`, `attach_caches`)."""
        self.attach_caches(self.make_caches(batch_size, n_slots, dtype))

    def clear_caches(self) -> None:
        """Back to cache-free forwards."""
        for layer in self.layers:
            if isinstance(layer, SSDBlock):
                layer.mixer.cache = None
            else:
                layer.attn.kv_cache = None
        self.cache_slots = 0

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, attention_mask=None,
                segments=None):
        """tokens (B,T) -> logits (B,T,vocab).

        input_pos (T,): cache slots of these tokens (required once caches are set up); (B, T) where each
            row has its own, which a paged cache (tformer.serve) takes.
        attention_mask (B,S): 1 for real tokens, 0 for padding; S = T, or the cache size.
        segments (B,T): ids of the packed sequences each token belongs to (no cache, no attention_mask).
        """
        return self.output(self.features(tokens, input_pos, attention_mask, segments))

    def features(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, attention_mask=None,
                 segments=None):
        """tokens (B,T) -> the final hidden states (B,T,C), normalised: what the output head reads."""
        return self.norm(self.hidden(tokens, input_pos, attention_mask, segments))

    def hidden(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, attention_mask=None,
               segments=None):
        """tokens (B,T) -> the last block's output (B,T,C), before the final norm."""
        B, T = tokens.shape
        inputs = self._mask_inputs(B, T, input_pos, attention_mask, segments, tokens.device)
        positions = inputs.q_slots.expand(B, -1) if inputs.q_pos is None else inputs.q_pos  # (B, T)
        x = self.emb_drop(self.pos_emb(self.tok_emb(tokens), positions))  # (B, T, C)
        masks = self._masks(inputs, x.dtype)
        rope = self.rope(positions, x.dtype) if self.rope is not None else None
        starts = self._starts(inputs) if self.config.ssd is not None else None
        for layer, rule in zip(self.layers, self.rules):
            x = layer(x, rope, starts if isinstance(layer, SSDBlock) else masks[rule], input_pos)
        return x

    def _mask_inputs(self, B: int, T: int, input_pos, attention_mask, segments, device) -> MaskInputs:
        """Slots, key padding, packing and positions of one forward: what every layer's mask reads."""
        slots = self._slots(T, input_pos, device)
        n_keys = self.cache_slots or T  # key slots: the whole cache, or this sequence
        if segments is not None:
            if self.cache_slots or attention_mask is not None:
                raise ValueError("segments (packed sequences) are for cache-free forwards without an attention_mask")
            if self.config.attention.approx != "none":
                raise ValueError(f"segments (packed sequences) need exact attention: attention.approx="
                                 f"{self.config.attention.approx!r} sees causality and key padding only; unpack them")
            if segments.dim() != 2 or segments.shape[1] != T:
                raise ValueError(f"segments must have shape (batch, {T}), got {tuple(segments.shape)}")
            positions = segment_positions(segments)  # (B, T), restarting in each sequence
            return MaskInputs(slots, T, segments=segments, q_pos=positions, k_pos=positions)
        if attention_mask is None:
            return MaskInputs(slots, n_keys, cached=bool(self.cache_slots))
        if attention_mask.shape != (B, n_keys):
            raise ValueError(
                f"attention_mask must have shape (batch, keys) = ({B}, {n_keys}), got {tuple(attention_mask.shape)}"
            )
        k_pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S): count of real tokens before
        return MaskInputs(slots, n_keys, attention_mask, q_pos=k_pos.gather(1, slots.expand(B, -1)), k_pos=k_pos,
                          cached=bool(self.cache_slots))

    @staticmethod
    def _starts(inputs: MaskInputs) -> torch.Tensor | None:
        """An SSD layer's mask: (B, T) bool, where sequences start (after left padding, in packed rows)."""
        return sequence_starts(inputs.q_slots, inputs.key_valid, inputs.segments)

    def _slots(self, T: int, input_pos, device) -> torch.Tensor:
        if self.cache_slots and input_pos is None:
            raise ValueError("caches are set up: pass input_pos (the cache slots of these tokens)")
        if input_pos is None:
            return torch.arange(T, device=device)
        if input_pos.shape[-1:] != (T,) or input_pos.dim() > 2:
            raise ValueError(f"input_pos must have shape ({T},) or (batch, {T}), got {tuple(input_pos.shape)}")
        return input_pos

    def _masks(self, inputs: MaskInputs, dtype: torch.dtype) -> dict:
        """One mask per distinct layer rule (`make_mask`: dense for SDPA, or block masks when swapped)."""
        bias = None  # a score_mod adding a position bias
        if self.alibi is not None:
            bias = alibi_score_mod(self.alibi.slopes, inputs)
        elif self.rel_bias is not None:
            r = self.rel_bias
            bias = t5_score_mod(r.weight, r.n_buckets, r.max_distance, inputs)
        masks = {}
        for rule in dict.fromkeys(self.rules):
            mask = self.make_mask(rule, inputs, bias, self.config.n_heads)
            masks[rule] = mask.to(dtype) if isinstance(mask, torch.Tensor) and mask.is_floating_point() else mask
        return masks


def rolling_window(config: ModelConfig, i: int, attn: nn.Module) -> int | None:
    """Layer i's window when its attention `attn` never reads a key outside it again (plain attention,
    causal pattern: a rolling cache can serve it, `Decoder.make_caches`), else None."""
    a = config.attention
    if not isinstance(attn, Attention) or a.pattern != "causal" or a.approx != "none":
        return None
    return a.window(i, config.sliding_window)


def _absolute_positions(config: ModelConfig) -> nn.Module:
    if config.positions == "learned":
        return LearnedPositions(config.max_seq_len, config.dim)
    if config.positions == "sinusoidal":
        return SinusoidalPositions(config.max_seq_len, config.dim)
    return NoPositions()
