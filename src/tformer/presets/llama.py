"""Llama 2 / 3 / 3.1 / 3.2 (Touvron et al. 2023; Grattafiori et al. 2024): RoPE, pre-norm
RMSNorm, SwiGLU, no biases, grouped key/value heads from Llama 3 on.

Each preset mirrors the config.json of the HF repo named in its `source` (rms_norm_eps,
rope_theta, rope_scaling, max_position_embeddings, tie_word_embeddings included).
HF initialises every weight with N(0, initializer_range=0.02), residual projections unscaled.
"""

from __future__ import annotations

from tformer.config import ModelConfig, RopeConfig
from tformer.presets import Preset


def llama_like(**fields) -> ModelConfig:
    """A Llama-architecture config: the fields every Llama-style model shares, then `fields`."""
    base = dict(
        activation="swiglu",
        norm="rmsnorm",
        norm_bias=False,  # RMSNorm has a weight only
        positions="rope",
        qkv_bias=False,
        out_bias=False,
        ffn_bias=False,
        tie_embeddings=False,
        init_std=0.02,
        scale_residual_init=False,
    )
    return ModelConfig(**{**base, **fields})


def llama3_rope(factor: float, theta: float = 500000.0, original_max_seq_len: int = 8192) -> RopeConfig:
    """Llama 3.1's wavelength-banded interpolation (rope_type "llama3") of a model pretrained
    at `original_max_seq_len` tokens; low/high_freq_factor 1 and 4 in every Llama 3.x config."""
    return RopeConfig(
        theta=theta,
        scaling="llama3",
        factor=factor,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_seq_len=original_max_seq_len,
    )


_LLAMA3_8B = dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, norm_eps=1e-5)

PRESETS = [
    Preset(
        "llama-2-7b",
        "meta-llama/Llama-2-7b-hf",
        llama_like(
            vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
            norm_eps=1e-5, rope=RopeConfig(theta=10000.0), max_seq_len=4096,
        ),
    ),
    Preset(
        "llama-3-8b",
        "meta-llama/Meta-Llama-3-8B",
        llama_like(**_LLAMA3_8B, rope=RopeConfig(theta=500000.0), max_seq_len=8192),
    ),
    Preset(
        "llama-3.1-8b",
        "meta-llama/Llama-3.1-8B",
        llama_like(**_LLAMA3_8B, rope=llama3_rope(factor=8.0), max_seq_len=131072),
    ),
    Preset(
        "llama-3.2-1b",
        "meta-llama/Llama-3.2-1B",
        llama_like(
            vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, ffn_dim=8192,
            norm_eps=1e-5, rope=llama3_rope(factor=32.0), max_seq_len=131072, tie_embeddings=True,
        ),
    ),
]
