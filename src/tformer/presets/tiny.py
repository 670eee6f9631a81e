"""Tiny configs for tests and smoke runs: each family's shape at dim 64, 2 layers, vocab 256.

They mirror no published checkpoint; each keeps its family's quirks (biases, tying, GQA,
explicit head_dim, sliding window, RoPE scaling, MoE routing, latent attention) so a test on the
tiny model exercises the code path of the full-size one. No dropout, so outputs are deterministic
in train mode too.
"""

from __future__ import annotations

from tformer.config import MLAConfig, MoEConfig, RopeConfig
from tformer.presets import Preset
from tformer.presets.gpt2 import gpt2_like
from tformer.presets.llama import llama3_rope, llama_like
from tformer.presets.moe import deepseek_yarn

_SOURCE = "tformer (test config, mirrors no checkpoint)"
_TINY = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, max_seq_len=128)
_TINY_YARN, _TINY_MLA_SCALE = deepseek_yarn(mscale_all_dim=1.0, factor=4.0, original_max_seq_len=32, qk_head_dim=16 + 8)

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
    # Mixtral: GQA, 4 SwiGLU experts, softmax top-2 renormalised, Switch aux loss, untied, theta 1e6.
    Preset(
        "tiny-moe",
        _SOURCE,
        llama_like(
            **_TINY, n_kv_heads=2, ffn_dim=176, norm_eps=1e-5, rope=RopeConfig(theta=1000000.0),
            moe=MoEConfig(n_experts=4, top_k=2, expert_dim=176, aux_loss_coef=0.02),
        ),
    ),
    # DeepSeek-V3: latent attention with a low-rank query, YaRN with the mscale softmax scale, layer 0
    # dense, then sigmoid routing over 4 groups of 2 (best 2 groups), expert bias, one shared expert,
    # renormalised top-2 scaled by 2.5, untied.
    Preset(
        "tiny-mla-moe",
        _SOURCE,
        llama_like(
            **_TINY, n_kv_heads=4, ffn_dim=176, norm_eps=1e-6, rope=_TINY_YARN,
            mla=MLAConfig(q_rank=48, kv_rank=32, nope_dim=16, rope_dim=8, v_dim=16, softmax_scale=_TINY_MLA_SCALE),
            moe=MoEConfig(
                n_experts=8, top_k=2, expert_dim=32, n_shared_experts=1, score_func="sigmoid", norm_topk=True,
                routed_scale=2.5, n_groups=4, topk_groups=2, expert_bias=True, first_dense=1,
            ),
        ),
    ),
]
