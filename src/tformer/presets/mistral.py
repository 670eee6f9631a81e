"""Mistral 7B v0.1 (Jiang et al. 2023): the Llama architecture with grouped key/value heads
and sliding-window attention (each token attends to at most 4096 previous keys)."""

from __future__ import annotations

from tformer.config import RopeConfig
from tformer.presets import Preset
from tformer.presets.llama import llama_like

PRESETS = [
    Preset(
        "mistral-7b",
        "mistralai/Mistral-7B-v0.1",
        llama_like(
            vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
            norm_eps=1e-5, rope=RopeConfig(theta=10000.0), max_seq_len=32768, sliding_window=4096,
        ),
    ),
]
