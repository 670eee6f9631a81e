"""SmolLM2 (Allal et al. 2025): small Llama-architecture models with tied embeddings."""

from __future__ import annotations

from tformer.config import RopeConfig
from tformer.presets import Preset
from tformer.presets.llama import llama_like

PRESETS = [
    Preset(
        "smollm2-135m",
        "HuggingFaceTB/SmolLM2-135M",
        llama_like(
            vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
            norm_eps=1e-5, rope=RopeConfig(theta=100000.0), max_seq_len=8192, tie_embeddings=True,
            init_std=0.041666666666666664,  # initializer_range = 1 / sqrt(576)
        ),
    ),
]
