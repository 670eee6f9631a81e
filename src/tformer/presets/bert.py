"""BERT (Devlin et al. 2019) and BERT-shaped sentence encoders: encoder-only, token + segment +
learned position embeddings with LayerNorm, post-norm blocks, exact GELU, biases everywhere,
[CLS] pooler. Built by `build_model` as an `Encoder` (`architecture="encoder"`).

Each BERT preset mirrors the config.json of the HF repo named in its `source`: vocab 30522 (uncased
WordPiece), max_position_embeddings 512, type_vocab_size 2, layer_norm_eps 1e-12,
initializer_range 0.02, hidden and attention dropout 0.1.

ModernBERT (Warner et al. 2024): pre-norm, RoPE (global base 160000, local 10000), GeGLU with the
erf GELU, every third layer global and the others local (local_attention 128: 64 keys either
side), no biases, LayerNorm without bias (eps 1e-5), embedding and final norms, no pooler;
vocab 50368, max_position_embeddings 8192 (answerdotai's config.json).
"""

from __future__ import annotations

from tformer.config import ModelConfig, RopeConfig
from tformer.presets import Preset


def bert_like(**fields) -> ModelConfig:
    """A BERT-architecture config: BERT's shared fields (HF BertConfig defaults), then `fields`."""
    base = dict(
        architecture="encoder",
        vocab_size=30522,
        type_vocab_size=2,
        activation="gelu",
        norm="layernorm",
        norm_eps=1e-12,
        norm_placement="post",
        positions="learned",
        qkv_bias=True,
        out_bias=True,
        ffn_bias=True,
        tie_embeddings=True,  # the masked-LM head's output is the token embedding
        max_seq_len=512,
        emb_dropout=0.1,
        attn_dropout=0.1,
        resid_dropout=0.1,
        init_std=0.02,
        scale_residual_init=False,
    )
    return ModelConfig(**{**base, **fields})


def modernbert_like(**fields) -> ModelConfig:
    """A ModernBERT-architecture config: the fields ModernBERT-base and -large share, then `fields`."""
    base = dict(
        architecture="encoder",
        vocab_size=50368,
        activation="geglu_exact",  # hidden_activation "gelu" in a GLU
        norm="layernorm",
        norm_eps=1e-5,
        norm_bias=False,
        norm_placement="pre",
        positions="rope",
        rope=RopeConfig(theta=160000.0),  # global_rope_theta
        rope_local_theta=10000.0,
        tie_embeddings=True,
        max_seq_len=8192,
        sliding_window=64,  # local_attention 128 // 2
        global_every=3,  # global_attn_every_n_layers
        first_attn_norm=False,
        head_bias=False,  # classifier_bias
        pooler=False,
        init_std=0.02,
        scale_residual_init=False,
    )
    return ModelConfig(**{**base, **fields})


PRESETS = [
    Preset("bert-base-uncased", "google-bert/bert-base-uncased",
           bert_like(dim=768, n_layers=12, n_heads=12, ffn_dim=3072)),
    Preset("bert-large-uncased", "google-bert/bert-large-uncased",
           bert_like(dim=1024, n_layers=24, n_heads=16, ffn_dim=4096)),
    # MiniLM-L6-H384 (Wang et al. 2020) fine-tuned for sentence embeddings; mean pooling + normalise
    Preset("all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2",
           bert_like(dim=384, n_layers=6, n_heads=12, ffn_dim=1536)),
    Preset("modernbert-base", "answerdotai/ModernBERT-base",
           modernbert_like(dim=768, n_layers=22, n_heads=12, ffn_dim=1152)),
    Preset("modernbert-large", "answerdotai/ModernBERT-large",
           modernbert_like(dim=1024, n_layers=28, n_heads=16, ffn_dim=2624)),
]  # fmt: skip
