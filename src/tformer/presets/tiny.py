"""Tiny configs for tests and smoke runs: each family's shape at dim 64, 2 layers, vocab 256.

They mirror no published checkpoint; each keeps its family's quirks (biases, tying, GQA,
explicit head_dim, sliding window, RoPE scaling) so a test on the tiny model exercises the
code path of the full-size one. No dropout, so outputs are deterministic in train mode too.
"""

from __future__ import annotations

from tformer.config import RopeConfig
from tformer.presets import Preset
from tformer.presets.gpt2 import gpt2_like
from tformer.presets.llama import llama3_rope, llama_like

_SOURCE = "tformer (test config, mirrors no checkpoint)"
_TINY = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, max_seq_len=128)

PRESETS = [
    # GPT-2: learned positions, LayerNorm + biases everywhere, tied.
    Preset("tiny-gpt2", _SOURCE, gpt2_like(**_TINY, emb_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0)),
    # Llama 3.2: GQA, head_dim set explicitly (!= dim / n_heads), llama3 RoPE scaling, tied.
    Preset(
        "tiny-llama",
        _SOURCE,
        llama_like(
            **_TINY, n_kv_heads=2, head_dim=32, ffn_dim=176, norm_eps=1e-5, tie_embeddings=True,
            rope=llama3_rope(factor=4.0, original_max_seq_len=32),
        ),
    ),
    # Mistral: GQA, sliding window shorter than the context, untied.
    Preset(
        "tiny-mistral",
        _SOURCE,
        llama_like(
            **_TINY, n_kv_heads=2, ffn_dim=176, norm_eps=1e-5, sliding_window=16, rope=RopeConfig(theta=10000.0)
        ),
    ),
    # Qwen2: q/k/v biases only, eps 1e-6, theta 1e6, tied.
    Preset(
        "tiny-qwen2",
        _SOURCE,
        llama_like(
            **_TINY, n_kv_heads=2, ffn_dim=176, qkv_bias=True, norm_eps=1e-6, tie_embeddings=True,
            rope=RopeConfig(theta=1000000.0),
        ),
    ),
]
