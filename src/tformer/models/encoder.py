"""Encoder-only transformer (BERT, MiniLM), assembled from `tformer.nn`, and its heads.

    tokens (B,T) -> tok_emb + seg_emb(token_types) + pos_emb -> emb_norm -> dropout
                 -> n_layers x block (post-norm for BERT) -> final norm (pre-norm models)
                 -> hidden states (B,T,C)

Attention is bidirectional: every query sees every real key; an `attention_mask` (B,T; 1 = real
token) hides padding keys only. Padded queries still get (ignored) outputs.

Heads read the hidden states:
    MaskedLMHead  (B,T,C) -> dense -> act -> LayerNorm -> tok_emb^T + bias -> (B,T,vocab)
    Pooler        (B,T,C) -> [CLS] (B,C) -> dense -> tanh -> (B,C)
    next sentence (B,C) pooled -> linear -> (B,2)   (`Pretraining`)
    classifiers   pooled -> linear (B,n_labels); per token (B,T,n_labels); QA start/end (B,T) each
"""

from __future__ import annotations

import torch
from torch import nn

from tformer.config import ModelConfig
from tformer.models.blocks import make_block
from tformer.models.decoder import _absolute_positions
from tformer.nn.mlp import ACTIVATIONS
from tformer.nn.norm import make_norm
from tformer.nn.rope import RotaryEmbedding


class Encoder(nn.Module):
    """tokens (B,T) -> hidden states (B,T,C); `pooler` adds BERT's [CLS] pooler (`pooled`)."""

    def __init__(self, config: ModelConfig, pooler: bool = True):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.seg_emb = nn.Embedding(config.type_vocab_size, config.dim) if config.type_vocab_size else None
        self.pos_emb = _absolute_positions(config)
        self.emb_norm = make_norm(config)
        self.emb_drop = nn.Dropout(config.emb_dropout)
        self.rope = RotaryEmbedding(config.rope, config.rope_dim) if config.positions == "rope" else None
        self.layers = nn.ModuleList(make_block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config) if config.norm_placement == "pre" else nn.Identity()
        self.pooler = Pooler(config) if pooler else None

    def tie_weights(self) -> None:
        """Nothing is tied inside the encoder (heads tie to `tok_emb`); kept for `build_model`."""

    def forward(self, tokens: torch.Tensor, attention_mask=None, token_types=None) -> torch.Tensor:
        """tokens (B,T) -> hidden states (B,T,C).

        attention_mask (B,T): 1 for real tokens, 0 for padding. token_types (B,T): segment ids
        (0 for sentence A, 1 for B); None: all 0.
        """
        B, T = tokens.shape
        if attention_mask is not None and attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask must have shape ({B}, {T}), got {tuple(attention_mask.shape)}")
        positions = torch.arange(T, device=tokens.device).expand(B, T)
        x = self.pos_emb(self.tok_emb(tokens), positions)  # (B, T, C)
        if self.seg_emb is not None:
            x = x + self.seg_emb(token_types if token_types is not None else torch.zeros_like(tokens))
        x = self.emb_drop(self.emb_norm(x))
        # (B, 1, 1, T) bool, True = attend: a mask (never None, which Attention reads as causal)
        keys = attention_mask.bool() if attention_mask is not None else torch.ones_like(tokens, dtype=torch.bool)
        mask = keys[:, None, None, :]
        rope = self.rope(positions, x.dtype) if self.rope is not None else None
        for layer in self.layers:
            x = layer(x, rope, mask)
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
    """BERT's MLM head: dense -> activation -> LayerNorm -> output tied to the token embedding, plus a bias."""

    def __init__(self, config: ModelConfig, tok_emb: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(config.dim, config.dim)
        self.act = ACTIVATIONS[config.activation]
        self.norm = make_norm(config)
        self.tok_emb = [tok_emb]  # a list: not registered twice as a submodule
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.act(self.dense(hidden)))
        return h @ self.tok_emb[0].weight.t() + self.bias  # (B, T, vocab)


class MaskedLM(nn.Module):
    """An encoder (no pooler) with the masked-LM head: tokens (B,T) -> logits (B,T,vocab)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, pooler=False)
        self.head = MaskedLMHead(config, self.encoder.tok_emb)

    def tie_weights(self) -> None:
        self.head.tok_emb = [self.encoder.tok_emb]

    def forward(self, tokens: torch.Tensor, attention_mask=None, token_types=None) -> torch.Tensor:
        return self.head(self.encoder(tokens, attention_mask, token_types))


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


class SequenceClassifier(nn.Module):
    """The encoder with a linear classifier on the pooled [CLS]: tokens (B,T) -> logits (B, n_labels)."""

    def __init__(self, config: ModelConfig, n_labels: int):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.drop = nn.Dropout(config.resid_dropout)
        self.classifier = nn.Linear(config.dim, n_labels)

    def tie_weights(self) -> None:
        """Nothing is tied."""

    def forward(self, tokens: torch.Tensor, attention_mask=None, token_types=None) -> torch.Tensor:
        hidden = self.encoder(tokens, attention_mask, token_types)
        return self.classifier(self.drop(self.encoder.pooled(hidden)))


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

    def forward(self, tokens: torch.Tensor, attention_mask=None, token_types=None) -> torch.Tensor:
        return self.classifier(self.drop(self.encoder(tokens, attention_mask, token_types)))


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

    def forward(self, tokens: torch.Tensor, attention_mask=None, token_types=None):
        start, end = self.qa(self.encoder(tokens, attention_mask, token_types)).unbind(-1)  # (B, T) each
        return start, end


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,T,C) hidden states -> (B,C) mean over real tokens (attention_mask (B,T), 1 = real)."""
    w = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
    return (hidden * w).sum(1) / w.sum(1).clamp(min=1e-9)

