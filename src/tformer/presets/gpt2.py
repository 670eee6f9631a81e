"""GPT-2 (Radford et al. 2019): learned positions, pre-norm LayerNorm with bias, GELU (tanh
approximation, HF's "gelu_new"), biases on every projection, tied embeddings.

Each preset mirrors the config.json of the HF repo named in its `source`:
n_positions 1024, vocab 50257, layer_norm_epsilon 1e-5, initializer_range 0.02, and
resid/embd/attn dropout 0.1 (dropout is off in eval; set it to 0 to fine-tune without it).
"""

from __future__ import annotations

from tformer.config import ModelConfig
from tformer.presets import Preset


def gpt2_like(**fields) -> ModelConfig:
    """A GPT-2-architecture config: GPT-2's shared fields (HF defaults), then `fields`. ffn_dim is
    left to derive (4 * dim, as HF's n_inner: null), so it follows a changed dim."""
    base = dict(
        vocab_size=50257,
        activation="gelu_tanh",
        norm="layernorm",
        norm_eps=1e-5,
        norm_bias=True,
        positions="learned",
        qkv_bias=True,
        out_bias=True,
        ffn_bias=True,
        tie_embeddings=True,
        max_seq_len=1024,
        emb_dropout=0.1,
        attn_dropout=0.1,
        resid_dropout=0.1,
        init_std=0.02,
        scale_residual_init=True,  # c_proj weights: std / sqrt(2 n_layer) (GPT-2 paper, 2.3)
    )
    return ModelConfig(**{**base, **fields})


PRESETS = [
    Preset("gpt2", "openai-community/gpt2", gpt2_like(dim=768, n_layers=12, n_heads=12)),
    Preset("gpt2-medium", "openai-community/gpt2-medium", gpt2_like(dim=1024, n_layers=24, n_heads=16)),
    Preset("gpt2-large", "openai-community/gpt2-large", gpt2_like(dim=1280, n_layers=36, n_heads=20)),
    Preset("gpt2-xl", "openai-community/gpt2-xl", gpt2_like(dim=1600, n_layers=48, n_heads=25)),
]
