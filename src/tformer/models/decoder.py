"""Decoder-only language model (GPT-2, Llama, Mistral, Qwen2, ...), assembled from `tformer.nn`.

    tokens (B,T) -> tok_emb (+ absolute positions) -> dropout -> n_layers x Block
                 -> final norm (pre-norm models) -> output -> logits (B,T,vocab)

Positions: without padding a token's position is its slot (0..T-1, or `input_pos` with a
KV cache). With a key-padding `attention_mask` (B,S; 1 = real token) positions count real
tokens only, so a left-padded row gives the same logits as the unpadded row alone. With
`segments` (B,T; packed training sequences) each run of equal ids is a sequence of its own:
positions restart at its first token and attention stays inside it, so a packed row gives each
example the logits it has alone.
"""

from __future__ import annotations

import torch
from torch import nn

from tformer.config import ModelConfig
from tformer.models.blocks import make_block
from tformer.nn.masks import as_additive, causal_mask, segment_mask, segment_positions
from tformer.nn.norm import make_norm
from tformer.nn.position import Alibi, LearnedPositions, NoPositions, SinusoidalPositions
from tformer.nn.rope import RotaryEmbedding


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.pos_emb = _absolute_positions(config)
        self.emb_drop = nn.Dropout(config.emb_dropout)
        self.rope = RotaryEmbedding(config.rope, config.rope_dim) if config.positions == "rope" else None
        self.alibi = Alibi(config.n_heads) if config.positions == "alibi" else None
        self.layers = nn.ModuleList(make_block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config) if config.norm_placement == "pre" else nn.Identity()
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.tie_weights()
        self.cache_slots = 0  # > 0 while caches are attached (attach_caches)

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.output.weight = self.tok_emb.weight

    def make_caches(self, batch_size: int, n_slots: int, dtype: torch.dtype | None = None) -> list[nn.Module]:
        """New KV caches, one a layer, for `batch_size` sequences of `n_slots` positions, on the
        model's device, in `dtype` (default: the embeddings')."""
        dtype = dtype or self.tok_emb.weight.dtype
        device = self.tok_emb.weight.device
        return [layer.attn.make_cache(batch_size, n_slots, dtype, device) for layer in self.layers]

    def attach_caches(self, caches: list[nn.Module]) -> None:
        """Forwards from now on write keys and values into `caches` (`make_caches`) and attend over
        all their slots; tokens then need `input_pos`."""
        if len(caches) != len(self.layers):
            raise ValueError(f"{len(caches)} caches for {len(self.layers)} layers")
        for layer, cache in zip(self.layers, caches):
            layer.attn.kv_cache = cache
        self.cache_slots = caches[0].n_slots

    def setup_caches(self, batch_size: int, n_slots: int, dtype: torch.dtype | None = None) -> None:
        """Attach new caches (`make_caches`, `attach_caches`)."""
        self.attach_caches(self.make_caches(batch_size, n_slots, dtype))

    def clear_caches(self) -> None:
        """Back to cache-free forwards."""
        for layer in self.layers:
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
        slots = self._slots(T, input_pos, tokens.device)
        n_keys = self.cache_slots or T  # key slots: the whole cache, or this sequence
        if segments is not None:
            positions, mask = self._packed(slots, segments, attention_mask)
        else:
            positions = self._positions(slots, attention_mask, B, n_keys)  # (B, T)
            mask = self._mask(slots, attention_mask, n_keys)
        x = self.emb_drop(self.pos_emb(self.tok_emb(tokens), positions))  # (B, T, C)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(x.dtype)
        rope = self.rope(positions, x.dtype) if self.rope is not None else None
        for layer in self.layers:
            x = layer(x, rope, mask, input_pos)
        return x

    def _slots(self, T: int, input_pos, device) -> torch.Tensor:
        if self.cache_slots and input_pos is None:
            raise ValueError("caches are set up: pass input_pos (the cache slots of these tokens)")
        if input_pos is None:
            return torch.arange(T, device=device)
        if input_pos.shape[-1:] != (T,) or input_pos.dim() > 2:
            raise ValueError(f"input_pos must have shape ({T},) or (batch, {T}), got {tuple(input_pos.shape)}")
        return input_pos

    def _positions(self, slots: torch.Tensor, attention_mask, B: int, n_keys: int) -> torch.Tensor:
        if attention_mask is None:
            return slots.expand(B, -1)  # (B, T), also when each row has its own slots
        if attention_mask.shape != (B, n_keys):
            raise ValueError(
                f"attention_mask must have shape (batch, keys) = ({B}, {n_keys}), got {tuple(attention_mask.shape)}"
            )
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S): count of real tokens before
        return pos.gather(1, slots.expand(B, -1))

    def _packed(self, slots: torch.Tensor, segments: torch.Tensor, attention_mask):
        """Positions (B, T) and mask of packed sequences (`segments`)."""
        if self.cache_slots or attention_mask is not None:
            raise ValueError("segments (packed sequences) are for cache-free forwards without an attention_mask")
        if segments.dim() != 2 or segments.shape[1] != slots.shape[0]:
            raise ValueError(f"segments must have shape (batch, {slots.shape[0]}), got {tuple(segments.shape)}")
        positions = segment_positions(segments)
        mask = segment_mask(segments, self.config.sliding_window)
        if self.alibi is not None:
            return positions, as_additive(mask, self.alibi(slots, slots.shape[0]), torch.float32)
        return positions, mask

    def _mask(self, slots: torch.Tensor, attention_mask, n_keys: int) -> torch.Tensor | None:
        c = self.config
        plain = self.alibi is None and c.sliding_window is None and attention_mask is None
        if plain and not self.cache_slots:
            return None  # SDPA's is_causal path
        mask = causal_mask(slots, n_keys, attention_mask, c.sliding_window)
        if self.alibi is not None:
            return as_additive(mask, self.alibi(slots, n_keys), torch.float32)
        return mask


def _absolute_positions(config: ModelConfig) -> nn.Module:
    if config.positions == "learned":
        return LearnedPositions(config.max_seq_len, config.dim)
    if config.positions == "sinusoidal":
        return SinusoidalPositions(config.max_seq_len, config.dim)
    return NoPositions()
