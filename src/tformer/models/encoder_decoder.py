"""Encoder-decoder transformer (T5, the original Transformer, Marian), assembled from `tformer.nn`.

    src (B,S) -> tok_emb * emb_scale (+ absolute positions) -> dropout -> n_layers x Block
              -> enc_norm (pre-norm models) -> memory (B,S,C)
    tgt (B,T) -> tok_emb * emb_scale (+ absolute positions) -> dropout
              -> decoder_layers x DecoderBlock(causal self-attention, cross-attention to memory, FFN)
              -> dec_norm (pre-norm models) -> * out_scale -> output -> logits (B,T,vocab)

Source and target share one token embedding (T5, Vaswani et al. 3.4, Marian); `tie_embeddings` ties
the output head to it too. Positions are absolute (sinusoidal, learned) or T5's relative bias
(`positions="t5"`): each stack computes its (1,H,T,S) bias once, bidirectional in the encoder and
causal in the decoder, and every layer of the stack adds it to its self-attention logits.

Masks: `src_mask` (B,S; 1 = real token) hides padded source keys from the encoder's self-attention
and from every cross-attention; the target is causal only (right padding never reaches a real token).

Incremental decoding: `setup_caches(memory, n_slots, src_mask)` attaches a self-attention KV cache of
n_slots per decoder layer and fills each layer's cross-attention cache from the memory, once;
`decode_step(tokens, input_pos)` then reads both. `clear_caches()` returns to cache-free forwards.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tformer.config import ModelConfig
from tformer.models.blocks import make_block, make_decoder_block
from tformer.nn.masks import as_additive, causal_mask
from tformer.nn.norm import make_norm
from tformer.nn.position import LearnedPositions, NoPositions, RelativePositionBias, SinusoidalPositions


class EncoderDecoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.dim)  # source and target
        self.pos_emb = _positions(c)
        self.emb_drop = nn.Dropout(c.emb_dropout)
        self.emb_scale = math.sqrt(c.dim) if c.scale_embeddings else 1.0
        self.out_scale = c.dim**-0.5 if c.scale_output else 1.0
        t5 = c.positions == "t5"
        self.enc_bias = RelativePositionBias(c.rel_buckets, c.rel_max_distance, c.n_heads, True) if t5 else None
        self.dec_bias = RelativePositionBias(c.rel_buckets, c.rel_max_distance, c.n_heads, False) if t5 else None
        self.enc_layers = nn.ModuleList(make_block(c, i) for i in range(c.n_layers))
        self.enc_norm = make_norm(c) if c.norm_placement == "pre" else nn.Identity()
        self.dec_layers = nn.ModuleList(make_decoder_block(c) for _ in range(c.decoder_layers))
        self.dec_norm = make_norm(c) if c.norm_placement == "pre" else nn.Identity()
        self.output = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.tie_weights()
        self.cache_slots = 0  # > 0 while caches are attached (setup_caches)
        self.cross_mask: torch.Tensor | None = None  # (B,1,1,S) while caches are attached

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.output.weight = self.tok_emb.weight

    def forward(self, src_tokens: torch.Tensor, tgt_tokens: torch.Tensor, src_mask=None) -> torch.Tensor:
        """src_tokens (B,S), tgt_tokens (B,T) (teacher-forced decoder inputs) -> logits (B,T,vocab).

        src_mask (B,S): 1 for real source tokens, 0 for padding; None: all real."""
        if self.cache_slots:
            raise ValueError("caches are attached: call decode_step, or clear_caches() first")
        memory = self.encode(src_tokens, src_mask)
        return self.logits(self.decode(tgt_tokens, memory, src_mask))

    def embed(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """tokens (B,T) at positions slots (T,) -> (B,T,C) inputs of a stack."""
        x = self.tok_emb(tokens) * self.emb_scale
        return self.emb_drop(self.pos_emb(x, slots.expand(tokens.shape[0], -1)))

    def encode(self, src_tokens: torch.Tensor, src_mask=None) -> torch.Tensor:
        """src_tokens (B,S) -> memory (B,S,C), the encoder's output that cross-attention reads."""
        B, S = src_tokens.shape
        self._check_length(S, "source")
        keys = _key_mask(src_mask, B, S, src_tokens.device)  # (B, 1, 1, S)
        slots = torch.arange(S, device=src_tokens.device)
        x = self.embed(src_tokens, slots)
        mask = keys if self.enc_bias is None else as_additive(keys, self.enc_bias(slots, S), x.dtype)
        for layer in self.enc_layers:
            x = layer(x, None, mask)
        return self.enc_norm(x)

    def decode(self, tgt_tokens: torch.Tensor, memory: torch.Tensor, src_mask=None) -> torch.Tensor:
        """tgt_tokens (B,T), memory (B,S,C) -> the decoder's final hidden states (B,T,C), cache-free."""
        B, T = tgt_tokens.shape
        self._check_length(T, "target")
        cross_mask = _key_mask(src_mask, B, memory.shape[1], memory.device)
        slots = torch.arange(T, device=tgt_tokens.device)
        x = self.embed(tgt_tokens, slots)
        mask = None  # SDPA's causal path
        if self.dec_bias is not None:
            mask = as_additive(causal_mask(slots, T), self.dec_bias(slots, T), x.dtype)
        for layer in self.dec_layers:
            x = layer(x, memory, mask, cross_mask)
        return self.dec_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's final hidden states (B,T,C) -> logits (B,T,vocab)."""
        return self.output(hidden * self.out_scale if self.out_scale != 1.0 else hidden)

    def setup_caches(self, memory: torch.Tensor, n_slots: int, src_mask=None, dtype: torch.dtype | None = None):
        """Attach self-attention caches of n_slots target positions and fill the cross-attention caches
        from memory (B,S,C), once; `decode_step` then reads them."""
        B, S, _ = memory.shape
        self._check_length(n_slots, "n_slots (target positions)")
        dtype = dtype or self.tok_emb.weight.dtype
        device = self.tok_emb.weight.device
        for layer in self.dec_layers:
            layer.attn.kv_cache = layer.attn.make_cache(B, n_slots, dtype, device)
            layer.cross.kv_cache = layer.cross.make_cache(B, S, dtype, device)
            layer.cross.fill_cache(memory.to(dtype))
        self.cross_mask = _key_mask(src_mask, B, S, device)
        self.cache_slots = n_slots

    def clear_caches(self) -> None:
        for layer in self.dec_layers:
            layer.attn.kv_cache = layer.cross.kv_cache = None
        self.cache_slots, self.cross_mask = 0, None

    def decode_step(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """tokens (B,T) at target positions input_pos (T,) -> logits (B,T,vocab), reading and
        extending the caches of `setup_caches`."""
        if not self.cache_slots:
            raise ValueError("decode_step reads caches: call setup_caches(memory, n_slots) first")
        if input_pos.shape != (tokens.shape[1],):
            raise ValueError(f"input_pos must have shape ({tokens.shape[1]},), got {tuple(input_pos.shape)}")
        x = self.embed(tokens, input_pos)
        mask = causal_mask(input_pos, self.cache_slots)  # (1, 1, T, n_slots)
        if self.dec_bias is not None:
            mask = as_additive(mask, self.dec_bias(input_pos, self.cache_slots), x.dtype)
        for layer in self.dec_layers:
            x = layer(x, None, mask, self.cross_mask, input_pos)
        return self.logits(self.dec_norm(x))

    def reorder_caches(self, index: torch.Tensor) -> None:
        """Keep the cached rows `index` (B',) in that order (beam search's surviving hypotheses)."""
        for layer in self.dec_layers:
            for cache in (layer.attn.kv_cache, layer.cross.kv_cache):
                n = len(index)
                cache.k[:n].copy_(cache.k.index_select(0, index))
                cache.v[:n].copy_(cache.v.index_select(0, index))
        self.cross_mask = self.cross_mask.index_select(0, index)

    def _check_length(self, n: int, what: str) -> None:
        """Absolute positions exist up to max_seq_len; T5's relative bias has no limit."""
        if self.config.positions in ("learned", "sinusoidal") and n > self.config.max_seq_len:
            raise ValueError(f"{what} length {n} exceeds the model's max_seq_len {self.config.max_seq_len}: "
                             "shorten it (or build the model with a larger max_seq_len)")


def _key_mask(src_mask, B: int, S: int, device) -> torch.Tensor:
    """src_mask (B,S), 1 = real, or None (all real) -> (B,1,1,S) bool; always a tensor, since
    attention reads a None mask as causal."""
    if src_mask is None:
        return torch.ones(B, 1, 1, S, dtype=torch.bool, device=device)
    if src_mask.shape != (B, S):
        raise ValueError(f"src_mask must have shape (batch, source length) = ({B}, {S}), got {tuple(src_mask.shape)}")
    return src_mask.bool()[:, None, None, :]


def _positions(config: ModelConfig) -> nn.Module:
    if config.positions == "learned":
        return LearnedPositions(config.max_seq_len, config.dim)
    if config.positions == "sinusoidal":
        return SinusoidalPositions(config.max_seq_len, config.dim, config.sinusoid_split)
    return NoPositions()
