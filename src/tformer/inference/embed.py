"""Sentence embeddings from an encoder: mean pooling over real tokens, then L2 normalisation
(the sentence-transformers pipeline of all-MiniLM-L6-v2: Transformer -> Pooling(mean) -> Normalize)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tformer.models.encoder import Encoder, mean_pool
from tformer.tokenizer import Tokenizer


def pad_batch(rows: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows -> (tokens (B,T), attention_mask (B,T)), padded on the right."""
    T = max(len(r) for r in rows)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return tokens, mask


@torch.no_grad()
def embed(model: Encoder, tokenizer: Tokenizer, texts: Sequence[str], max_len: int | None = None) -> torch.Tensor:
    """(N, C) unit-norm embeddings of `texts`, tokenised with the tokenizer's template ([CLS] ... [SEP]);
    each text is cut to `max_len` tokens (default: the model's max_seq_len), its last token kept."""
    max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
    rows = [r if len(r) <= max_len else r[: max_len - 1] + r[-1:] for r in tokenizer.encode_batch(texts, template=True)]
    return embed_rows(model, rows, tokenizer.pad_id if tokenizer.pad_id is not None else 0)


@torch.no_grad()
def embed_rows(model: Encoder, rows: list[list[int]], pad_id: int = 0) -> torch.Tensor:
    """(N, C) unit-norm embeddings of token id rows (already templated and cut to the model's length)."""
    tokens, mask = pad_batch(rows, pad_id)
    device = model.tok_emb.weight.device
    tokens, mask = tokens.to(device), mask.to(device)
    hidden = model(tokens, mask)  # (N, T, C)
    return F.normalize(mean_pool(hidden.float(), mask), dim=-1)


def cosine_matrix(embeddings: torch.Tensor) -> torch.Tensor:
    """(N, C) unit vectors -> (N, N) cosine similarities."""
    return embeddings @ embeddings.t()
