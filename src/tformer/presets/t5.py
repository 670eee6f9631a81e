"""Encoder-decoder presets: T5 (Raffel et al. 2020) v1.0 and v1.1, and the original Transformer
(Vaswani et al. 2017). Built by `build_model` as an `EncoderDecoder` (`architecture="encoder_decoder"`).

T5: pre-norm RMSNorm (T5's LayerNorm subtracts no mean and has no bias), no biases anywhere, no
absolute positions but a bucketed relative position bias (32 buckets up to distance 128), attention
logits unscaled (attn_scale 1.0: the 1/sqrt(d) sits in T5's initialisation), dropout 0.1, source and
target sharing one embedding. v1.0 has a ReLU FFN and ties the output head to the embedding, scaling
the decoder's output by dim^-0.5 first; v1.1 has a gated-GELU (tanh) FFN and an untied head.

The original Transformer ("base", Table 3): post-norm LayerNorm, sinusoidal positions (laid out as
the authors' tensor2tensor and Marian do: sines then cosines; a permutation of the paper's), embeddings
times sqrt(dim), ReLU FFN with biases, one shared source/target BPE vocabulary of about 37000
tokens also used as the output projection (3.4), dropout 0.1 on embeddings and sub-layer outputs.
"""

from __future__ import annotations

from tformer.config import ModelConfig
from tformer.presets import Preset


def t5_like(**fields) -> ModelConfig:
    """A T5-architecture config: T5's shared fields (HF T5Config defaults), then `fields`."""
    base = dict(
        architecture="encoder_decoder",
        vocab_size=32128,
        positions="t5",
        rel_buckets=32,
        rel_max_distance=128,
        attn_scale=1.0,
        norm="rmsnorm",
        norm_eps=1e-6,
        norm_placement="pre",
        activation="relu",
        qkv_bias=False,
        out_bias=False,
        ffn_bias=False,
        max_seq_len=512,
        emb_dropout=0.1,
        attn_dropout=0.0,
        resid_dropout=0.1,
        scale_residual_init=False,
    )
    return ModelConfig(**{**base, **fields})


def transformer_like(**fields) -> ModelConfig:
    """An original-Transformer config (Vaswani et al. 2017), then `fields`."""
    base = dict(
        architecture="encoder_decoder",
        positions="sinusoidal",
        sinusoid_split=True,  # [sin | cos] halves, as tensor2tensor and Marian (so HF Marian export is exact)
        scale_embeddings=True,
        norm="layernorm",
        norm_eps=1e-5,
        norm_placement="post",
        activation="relu",
        qkv_bias=False,
        out_bias=False,
        ffn_bias=True,
        tie_embeddings=True,
        max_seq_len=1024,
        emb_dropout=0.1,
        attn_dropout=0.0,
        resid_dropout=0.1,
        scale_residual_init=False,
    )
    return ModelConfig(**{**base, **fields})


PRESETS = [
    Preset("t5-small", "google-t5/t5-small",
           t5_like(dim=512, n_layers=6, n_heads=8, head_dim=64, ffn_dim=2048, tie_embeddings=True,
                   scale_output=True)),
    Preset("t5-v1_1-small", "google/t5-v1_1-small",
           t5_like(dim=512, n_layers=8, n_heads=6, head_dim=64, ffn_dim=1024, activation="geglu",
                   tie_embeddings=False)),
    Preset("transformer-base", "tformer (Vaswani et al. 2017, Attention Is All You Need, Table 3 base)",
           transformer_like(vocab_size=37000, dim=512, n_layers=6, n_heads=8, ffn_dim=2048)),
]  # fmt: skip
