"""Sentence embeddings from an encoder, as a sentence-transformers pipeline computes them: Transformer
(texts cut to its max_seq_length) -> Pooling -> Normalize (all-MiniLM-L6-v2: mean pooling, 256 tokens).

`EmbedSpec.read(path)` takes the pipeline from a sentence-transformers model folder (modules.json,
1_Pooling/config.json, sentence_bert_config.json); a folder without them gets mean pooling and L2
normalisation over the model's own context. Pooling modes: "mean" over real tokens, "cls" (the first
token), "max" over real tokens, "mean_sqrt_len" (the sum over the square root of the length).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tformer.models.encoder import Encoder, mean_pool
from tformer.tokenizer import Tokenizer


# pooling mode -> the flag of sentence-transformers' Pooling config.json that selects it
POOLING_FLAGS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
                 "max": "pooling_mode_max_tokens", "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens"}
POOLINGS = tuple(POOLING_FLAGS)


@dataclass
class EmbedSpec:
    pooling: str = "mean"
    normalize: bool = True
    max_len: int | None = None  # tokens a text at most (None: the model's max_seq_len)

    @classmethod
    def read(cls, path: str | Path) -> EmbedSpec:
        """The pipeline a sentence-transformers folder declares; the defaults for any other folder."""
        path = Path(path)
        try:
            modules = json.loads((path / "modules.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return cls()
        spec = cls(normalize=any(m.get("type", "").endswith(".Normalize") for m in modules))
        for m in modules:
            if m.get("type", "").endswith(".Pooling"):
                try:
                    pooling = json.loads((path / m.get("path", "") / "config.json").read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                modes = [mode for mode, flag in POOLING_FLAGS.items() if pooling.get(flag)]
                if len(modes) != 1:
                    raise ValueError(f"{path}: sentence-transformers pooling {modes or 'none'}; tformer pools by "
                                     f"exactly one of {', '.join(POOLINGS)}")
                spec.pooling = modes[0]
        try:
            transformer = json.loads((path / "sentence_bert_config.json").read_text(encoding="utf-8"))
            spec.max_len = transformer["max_seq_length"]
        except (OSError, ValueError, KeyError):
            pass
        return spec


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, T, C) hidden states, (B, T) mask -> (B, C) by `mode` (module docstring)."""
    if mode == "mean":
        return mean_pool(hidden, mask)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(mask[..., None] == 0, float("-inf")).amax(1)
    if mode == "mean_sqrt_len":
        w = mask.to(hidden.dtype)[..., None]
        return (hidden * w).sum(1) / w.sum(1).clamp(min=1).sqrt()
    raise ValueError(f"unknown pooling {mode!r}; choose one of {', '.join(POOLINGS)}")


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
def embed(model: Encoder, tokenizer: Tokenizer, texts: Sequence[str], max_len: int | None = None,
          spec: EmbedSpec | None = None) -> torch.Tensor:
    """(N, C) embeddings of `texts` by `spec` (default: mean pooling, normalised), tokenised with the
    tokenizer's template ([CLS] ... [SEP]); each text is cut to `max_len` tokens (default: spec.max_len,
    else the model's max_seq_len), its last token kept."""
    spec = spec or EmbedSpec()
    max_len = min(max_len or spec.max_len or model.config.max_seq_len, model.config.max_seq_len)
    rows = [r if len(r) <= max_len else r[: max_len - 1] + r[-1:] for r in tokenizer.encode_batch(texts, template=True)]
    return embed_rows(model, rows, tokenizer.pad_id if tokenizer.pad_id is not None else 0, spec)


@torch.no_grad()
def embed_rows(model: Encoder, rows: list[list[int]], pad_id: int = 0, spec: EmbedSpec | None = None) -> torch.Tensor:
    """(N, C) embeddings of token id rows (already templated and cut to length) by `spec`."""
    spec = spec or EmbedSpec()
    tokens, mask = pad_batch(rows, pad_id)
    device = model.tok_emb.weight.device
    tokens, mask = tokens.to(device), mask.to(device)
    hidden = model(tokens, mask)  # (N, T, C)
    pooled = pool(hidden.float(), mask, spec.pooling)
    return F.normalize(pooled, dim=-1) if spec.normalize else pooled


def cosine_matrix(embeddings: torch.Tensor) -> torch.Tensor:
    """(N, C) unit vectors -> (N, N) cosine similarities."""
    return embeddings @ embeddings.t()
