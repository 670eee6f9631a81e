"""Encoder-only transformer (BERT, MiniLM, ModernBERT), assembled from `tformer.nn`, and its heads.

    tokens (B,T) -> tok_emb + seg_emb(token_types) + pos_emb -> emb_norm -> dropout
                 -> n_layers x block (post-norm for BERT; pre-norm for ModernBERT, layer 0 without
                    attn_norm when first_attn_norm=False) -> final norm (pre-norm models)
                 -> hidden states (B,T,C)

Attention is bidirectional: every query sees every real key; an `attention_mask` (B,T; 1 = real
token) hides padding keys only. Padded queries still get (ignored) outputs. Local layers
(`config.is_local_layer`) see keys within `sliding_window` on either side and take their RoPE from
`rope_local` (rope_local_theta); global layers see the whole sequence.

Padding-free batches: sequences laid end to end in one row, tokens (1,N), with `segments` (1,N)
naming each token's sequence; attention stays within a sequence and positions restart at each.
The masks of a batch are built once per forward by `make_mask` (dense masks for SDPA;
`tformer.inference.encoder_flex` swaps in FlexAttention block masks on CUDA).

Heads read the hidden states:
    MaskedLMHead  (B,T,C) -> dense -> act -> LayerNorm -> tok_emb^T + bias -> (B,T,vocab)
    Pooler        (B,T,C) -> [CLS] (B,C) -> dense -> tanh -> (B,C)
    next sentence (B,C) pooled -> linear -> (B,2)   (`Pretraining`)
    classifiers   pooled [CLS] (or the mean over real tokens) -> linear (B,n_labels); per token
                  (B,T,n_labels); QA start/end (B,T) each
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from tformer.config import GATED_ACTIVATIONS, ModelConfig
from tformer.models.blocks import make_block
from tformer.models.decoder import _absolute_positions
from tformer.nn.masks import encoder_mask, segment_positions
from tformer.nn.mlp import ACTIVATIONS
from tformer.nn.norm import make_norm
from tformer.nn.rope import RotaryEmbedding


class Encoder(nn.Module):
    """tokens (B,T) -> hidden states (B,T,C); `pooler` (default: config.pooler) adds BERT's [CLS]
    pooler (`pooled`)."""

    def __init__(self, config: ModelConfig, pooler: bool | None = None):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.seg_emb = nn.Embedding(config.type_vocab_size, config.dim) if config.type_vocab_size else None
        self.pos_emb = _absolute_positions(config)
        self.emb_norm = make_norm(config)
        self.emb_drop = nn.Dropout(config.emb_dropout)
        self.rope = RotaryEmbedding(config.rope, config.rope_dim) if config.positions == "rope" else None
        self.rope_local = None
        if self.rope is not None and config.rope_local_theta is not None:
            self.rope_local = RotaryEmbedding(replace(config.rope, theta=config.rope_local_theta), config.rope_dim)
        self.layers = nn.ModuleList(make_block(config, i) for i in range(config.n_layers))
        if not config.first_attn_norm:
            self.layers[0].attn_norm = nn.Identity()
        self.local = tuple(config.is_local_layer(i) for i in range(config.n_layers))
        self.norm = make_norm(config) if config.norm_placement == "pre" else nn.Identity()
        self.pooler = Pooler(config) if (config.pooler if pooler is None else pooler) else None
        self.make_mask = encoder_mask  # (B, T, key_valid, segments, window, device) -> a layer's mask

    def tie_weights(self) -> None:
        """Nothing is tied inside the encoder (heads tie to `tok_emb`); kept for `build_model`."""

    def forward(self, tokens: torch.Tensor, attention_mask=None, token_types=None, segments=None) -> torch.Tensor:
        """tokens (B,T) -> hidden states (B,T,C).

        attention_mask (B,T): 1 for real tokens, 0 for padding. token_types (B,T): segment ids
        (0 for sentence A, 1 for B); None: all 0. segments (B,T), for padding-free batches: the
        sequence each token belongs to, an id that differs between neighbouring sequences
        (`pack`); None: one sequence a row. A 1-D tokens (N,) (and segments (N,)) is one packed row.
        """
        if tokens.dim() == 1:
            rows = (t[None] if t is not None else None for t in (tokens, attention_mask, token_types, segments))
            return self(*rows)[0]
        B, T = tokens.shape
        for name, t in (("attention_mask", attention_mask), ("token_types", token_types), ("segments", segments)):
            if t is not None and t.shape != (B, T):
                raise ValueError(f"{name} must have the shape of tokens ({B}, {T}), got {tuple(t.shape)}")
        if segments is not None:
            positions = segment_positions(segments)  # (B, T), restarting at each sequence
        else:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        x = self.pos_emb(self.tok_emb(tokens), positions)  # (B, T, C)
        if self.seg_emb is not None:
            x = x + self.seg_emb(token_types if token_types is not None else torch.zeros_like(tokens))
        x = self.emb_drop(self.emb_norm(x))
        # per layer kind (False: global, True: local): a mask (never None, which Attention reads as
        # causal) and the RoPE (cos, sin), each built once
        window = self.config.sliding_window
        masks = {local: self.make_mask(B, T, attention_mask, segments, window if local else None, tokens.device)
                 for local in set(self.local)}  # fmt: skip
        ropes = {False: None, True: None}
        if self.rope is not None:
            ropes[False] = self.rope(positions, x.dtype)
            ropes[True] = self.rope_local(positions, x.dtype) if self.rope_local is not None else ropes[False]
        for layer, local in zip(self.layers, self.local):
            x = layer(x, ropes[local], masks[local])
        return self.norm(x)

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B,T,C) -> the pooler's (B,C) from the first ([CLS]) token."""
        if self.pooler is None:
            raise ValueError("this encoder was built without a pooler")
        return self.pooler(hidden)


class Pooler(nn.Module):
    """BERT's pooler: tanh(dense(h[CLS])), read by next-sentence and sequence classification heads."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.dim, config.dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # (B, C)


class MaskedLMHead(nn.Module):
    """BERT's (and ModernBERT's) MLM head: dense -> activation -> LayerNorm -> output, plus a bias. The
    output matrix is the token embedding (`tie_embeddings`, as every released BERT), or its own `output`."""

    def __init__(self, config: ModelConfig, tok_emb: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(config.dim, config.dim, bias=config.head_bias)
        self.act = ACTIVATIONS[GATED_ACTIVATIONS.get(config.activation, config.activation)]  # a GLU's gate act
        self.norm = make_norm(config)
        self.tok_emb = [tok_emb]  # a list: not registered twice as a submodule
        self.output = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.act(self.dense(hidden)))
        weight = self.tok_emb[0].weight if self.output is None else self.output.weight
        return h @ weight.t() + self.bias  # (B, T, vocab)


class MaskedLM(nn.Module):
    """An encoder (no pooler) with the masked-LM head: tokens (B,T) -> logits (B,T,vocab)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, pooler=False)
        self.head = MaskedLMHead(config, self.encoder.tok_emb)

    def tie_weights(self) -> None:
        self.head.tok_emb = [self.encoder.tok_emb]

    def forward(self, tokens: torch.Tensor, attention_mask=None, token_types=None, segments=None) -> torch.Tensor:
        return self.head(self.encoder(tokens, attention_mask, token_types, segments))


class Pretraining(nn.Module):
    """BERT's pretraining model: the encoder with its pooler, the masked-LM head, and the
    next-sentence head (a 2-way linear on the pooled [CLS]: 0 = B follows A, 1 = B is random).

    tokens (B,T) -> (MLM logits (B,T,vocab), NSP logits (B,2))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.head = MaskedLMHead(config, self.encoder.tok_emb)
        self.nsp = nn.Linear(config.dim, 2)

    def tie_weights(self) -> None:
        self.head.tok_emb = [self.encoder.tok_emb]

    def forward(self, tokens: torch.Tensor, attention_mask=None, token_types=None):
        hidden = self.encoder(tokens, attention_mask, token_types)
        return self.head(hidden), self.nsp(self.encoder.pooled(hidden))


POOLINGS = ("cls", "mean")


class SequenceClassifier(nn.Module):
    """The encoder with a linear classifier on one vector per sequence: tokens (B,T) -> logits (B, n_labels).

    pooling "cls": BERT's pooler, tanh(dense(h[CLS])) (HF BertForSequenceClassification's);
    "mean": the mean of the real tokens' hidden states, no pooler (the pooling sentence-transformers
    models such as all-MiniLM-L6-v2 were trained with). Either way: -> dropout -> linear."""

    def __init__(self, config: ModelConfig, n_labels: int, pooling: str = "cls"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        self.config = config
        self.pooling = pooling
        self.encoder = Encoder(config, pooler=pooling == "cls")  # "cls" adds BERT's pooler to any encoder
        self.pool = self._cls if pooling == "cls" else self._mean
        self.drop = nn.Dropout(config.resid_dropout)
        self.classifier = nn.Linear(config.dim, n_labels)

    def tie_weights(self) -> None:
        """Nothing is tied."""

    def _cls(self, hidden: torch.Tensor, attention_mask, segments) -> torch.Tensor:
        if segments is not None:
            raise ValueError("pooling='cls' reads one sequence a row: pack sequences (segments) with pooling='mean'")
        return self.encoder.pooled(hidden)  # (B, C)

    def _mean(self, hidden: torch.Tensor, attention_mask, segments) -> torch.Tensor:
        if segments is not None:  # one packed row -> (S, C), one vector per sequence
            return segment_mean(hidden, segments)
        if attention_mask is None:
            return hidden.mean(1)  # (B, C)
        return mean_pool(hidden, attention_mask)  # (B, C)

    def forward(self, tokens: torch.Tensor, attention_mask=None, token_types=None, segments=None) -> torch.Tensor:
        """tokens (B,T) -> (B, n_labels); with `pack`'s segments (mean pooling only): (S, n_labels)."""
        hidden = self.encoder(tokens, attention_mask, token_types, segments)  # (B, T, C)
        return self.classifier(self.drop(self.pool(hidden, attention_mask, segments)))


class TokenClassifier(nn.Module):
    """The encoder (no pooler) with a linear classifier on every token: tokens (B,T) -> (B,T,n_labels)."""

    def __init__(self, config: ModelConfig, n_labels: int):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, pooler=False)
        self.drop = nn.Dropout(config.resid_dropout)
        self.classifier = nn.Linear(config.dim, n_labels)

    def tie_weights(self) -> None:
        """Nothing is tied."""

    def forward(self, tokens: torch.Tensor, attention_mask=None, token_types=None, segments=None) -> torch.Tensor:
        return self.classifier(self.drop(self.encoder(tokens, attention_mask, token_types, segments)))


class QuestionAnswering(nn.Module):
    """Extractive QA: the encoder (no pooler) and a 2-way linear on every token ->
    (start logits (B,T), end logits (B,T)) of the answer span."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, pooler=False)
        self.qa = nn.Linear(config.dim, 2)

    def tie_weights(self) -> None:
        """Nothing is tied."""

    def forward(self, tokens: torch.Tensor, attention_mask=None, token_types=None, segments=None):
        start, end = self.qa(self.encoder(tokens, attention_mask, token_types, segments)).unbind(-1)  # (B, T) each
        return start, end


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,T,C) hidden states -> (B,C) mean over real tokens (attention_mask (B,T), 1 = real)."""
    w = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
    return (hidden * w).sum(1) / w.sum(1).clamp(min=1e-9)


def pack(rows: list[torch.Tensor] | list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences -> one padding-free row: (tokens (1,N), segments (1,N)), segment i for sequence i."""
    rows = [torch.as_tensor(r, dtype=torch.long) for r in rows]
    lengths = torch.tensor([len(r) for r in rows])
    segments = torch.repeat_interleave(torch.arange(len(rows)), lengths)
    return torch.cat(rows)[None], segments[None].to(rows[0].device)


def unpack(hidden: torch.Tensor, segments: torch.Tensor) -> list[torch.Tensor]:
    """Packed hidden states (1,N,C) or (N,C) with `pack`'s segments -> one (T_i, C) tensor per sequence."""
    hidden, segments = hidden.reshape(-1, hidden.shape[-1]), segments.reshape(-1)
    return list(hidden.split(torch.bincount(segments).tolist()))


def segment_mean(hidden: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Packed hidden states (1,N,C) or (N,C) with `pack`'s segments (ids 0..S-1) -> (S,C) mean per sequence;
    the padding-free counterpart of `mean_pool`."""
    hidden, segments = hidden.reshape(-1, hidden.shape[-1]), segments.reshape(-1)
    S = int(segments.max()) + 1
    sums = hidden.new_zeros(S, hidden.shape[-1]).index_add_(0, segments, hidden)
    return sums / torch.bincount(segments, minlength=S).clamp(min=1)[:, None].to(hidden.dtype)
