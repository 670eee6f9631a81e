"""Qwen2.5 (Qwen team 2024): the Llama architecture with biases on the q/k/v projections
(none on the output projection or the FFN), RMSNorm eps 1e-6 and RoPE theta 1e6.

The hub configs set `sliding_window` but `use_sliding_window: false`: attention is full.
"""

from __future__ import annotations

from tformer.config import RopeConfig
from tformer.presets import Preset
from tformer.presets.llama import llama_like


def _qwen2(**fields):
    return llama_like(qkv_bias=True, norm_eps=1e-6, rope=RopeConfig(theta=1000000.0), **fields)


PRESETS = [
    Preset(
        "qwen2.5-0.5b",
        "Qwen/Qwen2.5-0.5B",
        _qwen2(
            vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864,
            max_seq_len=32768, tie_embeddings=True,
        ),
    ),
    Preset(
        "qwen2.5-7b",
        "Qwen/Qwen2.5-7B",
        _qwen2(
            vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, ffn_dim=18944,
            max_seq_len=131072, tie_embeddings=False,
        ),
    ),
]
