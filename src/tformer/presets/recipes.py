"""Small models that tformer trains from scratch on the default corpus (Shakespeare's plays).

They mirror no checkpoint; vocab_size and max_seq_len are fitted to the run's tokenizer and
seq_len by `tformer train`.
"""

from __future__ import annotations

from tformer.config import ModelConfig, RopeConfig
from tformer.presets import Preset

_SOURCE = "tformer (trained from scratch by `tformer train`)"

_BPE = ModelConfig(
    vocab_size=8192, dim=192, n_layers=3, n_heads=4, ffn_dim=512, activation="swiglu", norm="rmsnorm",
    norm_bias=False, positions="rope", rope=RopeConfig(theta=10000.0), tie_embeddings=True, max_seq_len=256,
    scale_residual_init=True,
)

PRESETS = [
    # The embedded default: a small Llama-style model on an 8192-token byte-level BPE. Chosen for
    # the most learning per second on a 2-core CPU, where the matmuls run near the FLOP ceiling:
    # a large vocabulary packs ~3.4 characters into a token, so each FLOP sees more text; three
    # layers of 192 beat four of 192/256 and 160 wide at equal wall time (bench/cpu_default.py).
    Preset("shakespeare-bpe", _SOURCE, _BPE),
    # The bundled corpus on one GPU (`tformer train --recipe shakespeare-gpu`): nanoGPT's shakespeare_char
    # width and depth (6 x 384) in the default's Llama style, on the default's 8192-token BPE.
    Preset("shakespeare-gpu", _SOURCE, _BPE.replace(dim=384, n_layers=6, n_heads=6, ffn_dim=1024)),
    # nanoGPT's "baby GPT" shape (4 layers, 128 wide) at character level.
    Preset(
        "shakespeare-char",
        _SOURCE,
        ModelConfig(
            vocab_size=128, dim=128, n_layers=4, n_heads=4, activation="gelu", norm="layernorm",
            positions="learned", qkv_bias=False, tie_embeddings=True, max_seq_len=256,
        ),
    ),
]
