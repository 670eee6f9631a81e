"""Presets against HF: each preset's HF config is written out here from the hub config.json
(explicit kwargs, never downloaded), built on the meta device, and compared field by field and
by parameter count. The kwargs are an independent transcription, so a typo in either fails."""

import pytest
import torch

from tformer.presets import PRESETS, UnknownPresetError, find_preset, get_preset, list_presets, preset_source

transformers = pytest.importorskip("transformers")

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
)
LLAMA3_SCALING = dict(
    rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)
TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)


def _gpt2(n_embd, n_layer, n_head):
    return transformers.GPT2Config(
        vocab_size=50257, n_positions=1024, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, initializer_range=0.02,
        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, tie_word_embeddings=True,
    )


def _llama(**kw):
    return transformers.LlamaConfig(hidden_act="silu", attention_bias=False, mlp_bias=False, **kw)


# Preset name -> the HF config its source repo's config.json describes.
HF_CONFIGS = {
    "gpt2": lambda: _gpt2(768, 12, 12),
    "gpt2-medium": lambda: _gpt2(1024, 24, 16),
    "gpt2-large": lambda: _gpt2(1280, 36, 20),
    "gpt2-xl": lambda: _gpt2(1600, 48, 25),
    "llama-2-7b": lambda: _llama(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, rms_norm_eps=1e-5, max_position_embeddings=4096, rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    "llama-3-8b": lambda: _llama(
        **LLAMA3_8B, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False
    ),
    "llama-3.1-8b": lambda: _llama(
        **LLAMA3_8B, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=dict(LLAMA3_SCALING, factor=8.0), tie_word_embeddings=False,
    ),
    "llama-3.2-1b": lambda: _llama(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING, factor=32.0), tie_word_embeddings=True,
    ),
    "mistral-7b": lambda: transformers.MistralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=32768, rope_theta=10000.0,
        sliding_window=4096, tie_word_embeddings=False,
    ),
    "qwen2.5-0.5b": lambda: transformers.Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=32768, rope_theta=1000000.0,
        sliding_window=32768, use_sliding_window=False, max_window_layers=24, tie_word_embeddings=True,
    ),
    "qwen2.5-7b": lambda: transformers.Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=131072, rope_theta=1000000.0,
        sliding_window=131072, use_sliding_window=False, max_window_layers=28, tie_word_embeddings=False,
    ),
    "smollm2-135m": lambda: _llama(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, rms_norm_eps=1e-5, max_position_embeddings=8192, rope_theta=100000.0,
        initializer_range=0.041666666666666664, tie_word_embeddings=True,
    ),
    "tiny-gpt2": lambda: transformers.GPT2Config(
        vocab_size=256, n_positions=128, n_embd=64, n_layer=2, n_head=4, activation_function="gelu_new",
        layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0,
    ),
    "tiny-llama": lambda: _llama(
        **TINY, num_key_value_heads=2, head_dim=32, intermediate_size=176, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(LLAMA3_SCALING, factor=4.0, original_max_position_embeddings=32), tie_word_embeddings=True,
    ),
    "tiny-mistral": lambda: transformers.MistralConfig(
        **TINY, num_key_value_heads=2, intermediate_size=176, rms_norm_eps=1e-5, rope_theta=10000.0,
        sliding_window=16, tie_word_embeddings=False,
    ),
    "tiny-qwen2": lambda: transformers.Qwen2Config(
        **TINY, num_key_value_heads=2, intermediate_size=176, rms_norm_eps=1e-6, rope_theta=1000000.0,
        use_sliding_window=False, tie_word_embeddings=True,
    ),
}


def _deepseek_yarn(mscale: float, factor: float = 40.0, original: int = 4096) -> dict:
    return dict(rope_type="yarn", rope_theta=10000.0, factor=factor, original_max_position_embeddings=original,
                beta_fast=32.0, beta_slow=1.0, mscale=mscale, mscale_all_dim=mscale)


def _deepseek_v2_lite():
    return transformers.DeepseekV2Config(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
        routed_scaling_factor=1.0, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=163840, rope_scaling=_deepseek_yarn(0.707),
        tie_word_embeddings=False,
    )


def _deepseek_v3(**kw):
    base = dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
        num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
        num_experts_per_tok=8, routed_scaling_factor=2.5, n_group=8, topk_group=4, norm_topk_prob=True,
        first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=163840, rope_scaling=_deepseek_yarn(1.0),
        tie_word_embeddings=False,
    )
    return transformers.DeepseekV3Config(**{**base, **kw})


MOE_HF_CONFIGS = {
    "mixtral-8x7b": lambda: transformers.MixtralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02,
        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
        tie_word_embeddings=False,
    ),
    "qwen1.5-moe-a2.7b": lambda: transformers.Qwen2MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
        router_aux_loss_coef=0.001, max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=1e6,
        sliding_window=32768, use_sliding_window=False, max_window_layers=21, tie_word_embeddings=False,
    ),
    "deepseek-v2-lite": _deepseek_v2_lite,
    "deepseek-v3": _deepseek_v3,
    "tiny-moe": lambda: transformers.MixtralConfig(
        **TINY, num_key_value_heads=2, intermediate_size=176, num_local_experts=4, num_experts_per_tok=2,
        router_aux_loss_coef=0.02, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, tie_word_embeddings=False,
    ),
    "tiny-mla-moe": lambda: _deepseek_v3(
        **TINY, num_key_value_heads=4, intermediate_size=176, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=48, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, rope_scaling=_deepseek_yarn(1.0, 4.0, 32),
    ),
}
HF_CONFIGS.update(MOE_HF_CONFIGS)
NOT_ON_HF = {"seed-moe-example", "transformer-base"}  # a seed text's worked example, a paper: no config.json


def hf_parameter_count(hf_config) -> int:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    if hf_config.tie_word_embeddings:  # a tie that did not happen would double-count the embedding
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once


def expected_fields(hf) -> dict:
    """Our field values as this HF config states them (an independent mini-converter)."""
    if hf.model_type == "gpt2":
        return dict(
            vocab_size=hf.vocab_size, dim=hf.n_embd, n_layers=hf.n_layer, n_heads=hf.n_head, n_kv_heads=hf.n_head,
            ffn_dim=hf.n_inner or 4 * hf.n_embd, norm="layernorm", norm_eps=hf.layer_norm_epsilon,
            activation={"gelu_new": "gelu_tanh"}[hf.activation_function], positions="learned",
            qkv_bias=True, out_bias=True, ffn_bias=True, max_seq_len=hf.n_positions,
            tie_embeddings=hf.tie_word_embeddings, emb_dropout=hf.embd_pdrop, attn_dropout=hf.attn_pdrop,
            resid_dropout=hf.resid_pdrop, init_std=hf.initializer_range,
        )
    fields = dict(
        vocab_size=hf.vocab_size, dim=hf.hidden_size, n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads, n_kv_heads=hf.num_key_value_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        ffn_dim=hf.intermediate_size, norm="rmsnorm", norm_eps=hf.rms_norm_eps, activation="swiglu",
        positions="rope", out_bias=False, ffn_bias=False,
        qkv_bias=hf.model_type == "qwen2" or getattr(hf, "qkv_bias", getattr(hf, "attention_bias", False)),
        max_seq_len=hf.max_position_embeddings, tie_embeddings=hf.tie_word_embeddings,
        sliding_window=getattr(hf, "sliding_window", None), init_std=hf.initializer_range,
        **_rope_fields(hf.rope_parameters),
    )
    return fields | _moe_fields(hf) | _mla_fields(hf) if hf.model_type in MOE_MODEL_TYPES else fields


MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3")


def _moe_fields(hf) -> dict:
    if hf.model_type == "mixtral":
        return {"moe.n_experts": hf.num_local_experts, "moe.top_k": hf.num_experts_per_tok,
                "moe.expert_dim": hf.intermediate_size, "moe.aux_loss_coef": hf.router_aux_loss_coef,
                "moe.norm_topk": True, "moe.score_func": "softmax", "moe.n_shared_experts": 0}
    if hf.model_type == "qwen2_moe":
        assert not hf.mlp_only_layers
        return {"moe.n_experts": hf.num_experts, "moe.top_k": hf.num_experts_per_tok,
                "moe.expert_dim": hf.moe_intermediate_size, "moe.shared_dim": hf.shared_expert_intermediate_size,
                "moe.n_shared_experts": 1, "moe.shared_gate": True, "moe.norm_topk": hf.norm_topk_prob,
                "moe.interval": hf.decoder_sparse_step, "moe.first_dense": hf.decoder_sparse_step - 1,
                "moe.aux_loss_coef": hf.router_aux_loss_coef, "sliding_window": None}  # use_sliding_window false
    v3 = hf.model_type == "deepseek_v3"  # V3: sigmoid scores + correction bias; V2: softmax, greedy or grouped
    return {"moe.n_experts": hf.n_routed_experts, "moe.top_k": hf.num_experts_per_tok,
            "moe.expert_dim": hf.moe_intermediate_size, "moe.n_shared_experts": hf.n_shared_experts,
            "moe.score_func": "sigmoid" if v3 else "softmax", "moe.expert_bias": v3,
            "moe.norm_topk": hf.norm_topk_prob, "moe.routed_scale": hf.routed_scaling_factor,
            "moe.n_groups": hf.n_group, "moe.topk_groups": hf.topk_group,
            "moe.first_dense": hf.first_k_dense_replace, "moe.interval": 1}


def _mla_fields(hf) -> dict:
    if not hf.model_type.startswith("deepseek"):
        return {}
    with torch.device("meta"):  # HF's own softmax scale (yarn_apply_mscale), not a transcription
        scale = transformers.AutoModelForCausalLM.from_config(hf).model.layers[0].self_attn.scaling
    return {"mla.q_rank": hf.q_lora_rank, "mla.kv_rank": hf.kv_lora_rank, "mla.nope_dim": hf.qk_nope_head_dim,
            "mla.rope_dim": hf.qk_rope_head_dim, "mla.v_dim": hf.v_head_dim, "mla.softmax_scale": scale,
            "head_dim": None}  # per-head sizes are the mla fields; head_dim is unused (not compared)


def _rope_fields(rope: dict) -> dict:
    fields = {"rope.theta": rope["rope_theta"], "rope.scaling": rope["rope_type"].replace("default", "none")}
    if rope["rope_type"] == "yarn":  # DeepSeek: mscale == mscale_all_dim, so the cos/sin factor is 1
        fields.update({
            "rope.factor": rope["factor"], "rope.original_max_seq_len": rope["original_max_position_embeddings"],
            "rope.beta_fast": rope["beta_fast"], "rope.beta_slow": rope["beta_slow"],
            "rope.attention_factor": 1.0 if rope["mscale"] == rope["mscale_all_dim"] else None,
        })
    if rope["rope_type"] == "llama3":
        fields.update({
            "rope.factor": rope["factor"], "rope.low_freq_factor": rope["low_freq_factor"],
            "rope.high_freq_factor": rope["high_freq_factor"],
            "rope.original_max_seq_len": rope["original_max_position_embeddings"],
        })
    return fields


def _field(config, dotted: str):
    obj = config
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def test_every_preset_has_an_hf_check():
    from tformer.presets import recipes

    from tests.reference.test_hf_t5 import T5_PRESETS  # encoder-decoders: checked against HF T5 there
    from tests.test_presets_bert import HF_SHAPES  # encoders: checked against HF BertModel there

    trained_here = {p.name for p in recipes.PRESETS}  # vocab and context are fitted per run
    checked_elsewhere = set(HF_SHAPES) | set(T5_PRESETS)
    assert sorted(HF_CONFIGS) == [n for n in list_presets() if n not in trained_here | NOT_ON_HF | checked_elsewhere]


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_preset_fields_match_hf_config(name):
    config, hf = get_preset(name), HF_CONFIGS[name]()
    expected = {k: v for k, v in expected_fields(hf).items() if k != "head_dim" or v is not None}
    assert {k: _field(config, k) for k in expected} == expected


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_preset_parameter_count_matches_hf(name):
    from tformer.accounting import parameter_breakdown

    assert parameter_breakdown(get_preset(name))["total"] == hf_parameter_count(HF_CONFIGS[name]())


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_converter_reads_the_hf_config_as_the_preset(name):
    from tformer.config import ConfigError
    from tformer.convert.hf import config_from_hf
    from tformer.convert.hf_config import SUPPORTED_MODEL_TYPES

    hf_config = HF_CONFIGS[name]()
    if hf_config.model_type not in SUPPORTED_MODEL_TYPES:  # deepseek_v2: a preset, but no converter
        with pytest.raises(ConfigError, match=f"model_type={hf_config.model_type!r} is not supported"):
            config_from_hf(hf_config.to_dict())
        return
    assert config_from_hf(hf_config.to_dict()) == get_preset(name)


def test_every_published_preset_names_its_hf_repo():
    for name, preset in PRESETS.items():
        if not preset.source.startswith("tformer"):
            assert preset.source.count("/") == 1 and " " not in preset.source, (name, preset.source)


def test_get_preset_returns_a_copy():
    a = get_preset("llama-3-8b")
    a.rope.theta = 1.0
    a.n_layers = 1
    assert get_preset("llama-3-8b").rope.theta == 500000.0
    assert find_preset("llama-3-8b").config.n_layers == 32


@pytest.mark.parametrize(
    "typo, suggestion", [("llama3-8b", "llama-3-8b"), ("GPT2-XL", "gpt2-xl"), ("qwen-2.5-0.5b", "qwen2.5-0.5b")]
)
def test_unknown_name_suggests_close_matches(typo, suggestion):
    with pytest.raises(UnknownPresetError) as e:
        get_preset(typo)
    assert repr(suggestion) in str(e.value) and repr(typo) in str(e.value)


def test_unknown_name_without_close_match_lists_all():
    with pytest.raises(KeyError) as e:
        preset_source("zzz")
    assert all(name in str(e.value) for name in list_presets())
