"""Mixture-of-experts models: Mixtral (Jiang et al. 2024), Qwen1.5-MoE (Qwen2-MoE architecture),
DeepSeek-V2-Lite and DeepSeek-V3 (multi-head latent attention + DeepSeekMoE), and the worked
example of a seed text (`seed-moe-example`).

Each published preset mirrors the config.json of the HF repo named in its `source`; the
comments name the config.json fields each value comes from. DeepSeek-V3's multi-token
prediction module (`num_nextn_predict_layers: 1`, 14B of the 685B on the hub) is not built:
the preset is the 671B main model, as the paper counts it.
"""

from __future__ import annotations

from tformer.config import MLAConfig, MoEConfig, RopeConfig, deepseek_yarn_scales
from tformer.presets import Preset
from tformer.presets.llama import llama_like


def deepseek_yarn(
    mscale_all_dim: float, factor: float = 40.0, original_max_seq_len: int = 4096, qk_head_dim: int = 128 + 64
) -> tuple[RopeConfig, float]:
    """DeepSeek's `rope_scaling` {type yarn, factor, original_max_position_embeddings, beta_fast 32,
    beta_slow 1, mscale = mscale_all_dim} and the MLA softmax scale that goes with it.

    With mscale == mscale_all_dim the RoPE cos/sin factor is 1 (HF `_compute_yarn_parameters`:
    get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)); the YaRN temperature moves
    into the softmax scale instead: (nope_dim + rope_dim)^-0.5 * m^2 with
    m = 0.1 * mscale_all_dim * ln(factor) + 1 (HF deepseek_v3 `yarn_get_mscale`, `yarn_apply_mscale`).
    Returns (rope, softmax_scale); qk_head_dim = nope_dim + rope_dim (128 + 64 in every DeepSeek).
    """
    attention_factor, softmax_scale = deepseek_yarn_scales(factor, mscale_all_dim, mscale_all_dim, qk_head_dim)
    rope = RopeConfig(
        theta=10000.0, scaling="yarn", factor=factor, original_max_seq_len=original_max_seq_len,
        beta_fast=32.0, beta_slow=1.0, attention_factor=attention_factor,
    )
    return rope, softmax_scale


_V2_LITE_ROPE, _V2_LITE_SCALE = deepseek_yarn(mscale_all_dim=0.707)
_V3_ROPE, _V3_SCALE = deepseek_yarn(mscale_all_dim=1.0)

PRESETS = [
    # num_local_experts 8, num_experts_per_tok 2, intermediate_size 14336 (each expert),
    # router_aux_loss_coef 0.02, rope_theta 1e6, sliding_window null, tie_word_embeddings false.
    # Routing: softmax over the 8 logits, top-2 renormalised (HF MixtralTopKRouter).
    Preset(
        "mixtral-8x7b",
        "mistralai/Mixtral-8x7B-v0.1",
        llama_like(
            vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, norm_eps=1e-5,
            rope=RopeConfig(theta=1000000.0), max_seq_len=32768,
            moe=MoEConfig(n_experts=8, top_k=2, expert_dim=14336, aux_loss_coef=0.02),
        ),
    ),
    # qwen2_moe: num_experts 60, num_experts_per_tok 4, moe_intermediate_size 1408,
    # shared_expert_intermediate_size 5632 behind shared_expert_gate (sigmoid), norm_topk_prob false,
    # decoder_sparse_step 1 and mlp_only_layers [] (every layer MoE, so intermediate_size 5632 is
    # unused), router_aux_loss_coef 0.001, q/k/v biases, rms_norm_eps 1e-6, rope_theta 1e6,
    # max_position_embeddings 8192, use_sliding_window false.
    Preset(
        "qwen1.5-moe-a2.7b",
        "Qwen/Qwen1.5-MoE-A2.7B",
        llama_like(
            vocab_size=151936, dim=2048, n_layers=24, n_heads=16, n_kv_heads=16, ffn_dim=5632, qkv_bias=True,
            norm_eps=1e-6, rope=RopeConfig(theta=1000000.0), max_seq_len=8192,
            moe=MoEConfig(
                n_experts=60, top_k=4, expert_dim=1408, n_shared_experts=1, shared_dim=5632, shared_gate=True,
                norm_topk=False, aux_loss_coef=0.001,
            ),
        ),
    ),
    # deepseek_v2: q_lora_rank null, kv_lora_rank 512, qk_nope_head_dim 128, qk_rope_head_dim 64,
    # v_head_dim 128; n_routed_experts 64, num_experts_per_tok 6, n_shared_experts 2,
    # moe_intermediate_size 1408, intermediate_size 10944 (layer 0), first_k_dense_replace 1,
    # moe_layer_freq 1, scoring_func softmax, topk_method greedy (n_group 1), norm_topk_prob false,
    # routed_scaling_factor 1.0, rope_scaling yarn factor 40 (mscale 0.707), rms_norm_eps 1e-6,
    # max_position_embeddings 163840. Its aux_loss_alpha 0.001 is a per-sequence balance loss
    # (seq_aux true), not the Switch loss of moe.aux_loss_coef, so that stays 0.
    Preset(
        "deepseek-v2-lite",
        "deepseek-ai/DeepSeek-V2-Lite",
        llama_like(
            vocab_size=102400, dim=2048, n_layers=27, n_heads=16, n_kv_heads=16, ffn_dim=10944, norm_eps=1e-6,
            rope=_V2_LITE_ROPE, max_seq_len=163840,
            mla=MLAConfig(q_rank=None, kv_rank=512, nope_dim=128, rope_dim=64, v_dim=128, softmax_scale=_V2_LITE_SCALE),
            moe=MoEConfig(
                n_experts=64, top_k=6, expert_dim=1408, n_shared_experts=2, score_func="softmax", norm_topk=False,
                routed_scale=1.0, first_dense=1,
            ),
        ),
    ),
    # deepseek_v3: q_lora_rank 1536, kv_lora_rank 512, qk_nope/rope/v 128/64/128; n_routed_experts 256,
    # num_experts_per_tok 8, n_shared_experts 1, moe_intermediate_size 2048, intermediate_size 18432
    # (layers 0-2), first_k_dense_replace 3, scoring_func sigmoid, topk_method noaux_tc (the
    # e_score_correction_bias), n_group 8, topk_group 4, norm_topk_prob true, routed_scaling_factor
    # 2.5, rope_scaling yarn factor 40 (mscale 1.0), rms_norm_eps 1e-6, max_position_embeddings 163840.
    Preset(
        "deepseek-v3",
        "deepseek-ai/DeepSeek-V3",
        llama_like(
            vocab_size=129280, dim=7168, n_layers=61, n_heads=128, n_kv_heads=128, ffn_dim=18432, norm_eps=1e-6,
            rope=_V3_ROPE, max_seq_len=163840,
            mla=MLAConfig(q_rank=1536, kv_rank=512, nope_dim=128, rope_dim=64, v_dim=128, softmax_scale=_V3_SCALE),
            moe=MoEConfig(
                n_experts=256, top_k=8, expert_dim=2048, n_shared_experts=1, score_func="sigmoid", norm_topk=True,
                routed_scale=2.5, n_groups=8, topk_groups=4, expert_bias=True, first_dense=3,
            ),
        ),
    ),
    # The worked example "Parameter Breakdown: A DeepSeek-V2-Inspired MoE Model" of the seed text
    # /work/shared/seeds/000_9684611ef49afd55.txt: 60 layers, d_model 4096, vocab 100,000 (one
    # embedding matrix counted, no separate head: tied), GQA attention of 41.9M per layer (32 heads
    # of 128, 8 kv heads), MoE every other layer (30 layers), 64 experts, 6 active. The text's expert
    # is a two-matrix FFN of width 3.5 * 4096 = 14336: 2 * 4096 * 14336 = 117,440,512 parameters.
    # tformer's experts are SwiGLU (three matrices), so each gets the width that holds the same
    # parameters, floor(2/3 * 14336) = 9557: 3 * 4096 * 9557 = 117,436,416. The text leaves out the
    # dense FFNs of the other 30 layers; here they have the width of one expert (our assumption),
    # and the router, norms and context length (4096) are ours too.
    Preset(
        "seed-moe-example",
        "tformer (a worked parameter-count example of a DeepSeek-V2-inspired MoE, mirrors no checkpoint)",
        llama_like(
            vocab_size=100000, dim=4096, n_layers=60, n_heads=32, n_kv_heads=8, ffn_dim=9557, norm_eps=1e-6,
            rope=RopeConfig(theta=10000.0), max_seq_len=4096, tie_embeddings=True,
            moe=MoEConfig(n_experts=64, top_k=6, norm_topk=False, first_dense=1, interval=2),
        ),
    ),
]
