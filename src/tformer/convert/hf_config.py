"""HF `config.json` <-> ModelConfig for the gpt2, llama, mistral and qwen2 architectures; the
mixture-of-experts ones (mixtral, qwen2_moe, deepseek_v3) are mapped in `hf_moe_config`, and
`config_from_hf` reads BERT, ModernBERT, T5 and Marian configs through their own converters.

Reads configs as written by transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x
(`rope_parameters`); writes both spellings so either version reads the export.
"""

from __future__ import annotations

import importlib
from typing import Any

from tformer.config import ConfigError, ModelConfig, RopeConfig, yarn_mscale

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
MOE_FAMILY = ("mixtral", "qwen2_moe", "deepseek_v3")
SUPPORTED_MODEL_TYPES = ("gpt2", *LLAMA_FAMILY, *MOE_FAMILY)
# model_type -> (converter module, its config reader): encoders and encoder-decoders
OTHER_FAMILIES = {"bert": ("hf_bert", "bert_config_from_hf"),
                  "modernbert": ("hf_modernbert", "modernbert_config_from_hf"),
                  "t5": ("hf_t5", "t5_config_from_hf"), "marian": ("hf_marian", "marian_config_from_hf")}
ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}

# HF `activation_function` / `hidden_act` -> our activation (plain FFN for gpt2, gated for llama family)
_PLAIN_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
               "silu": "silu", "swish": "silu"}  # fmt: skip
_GATED_ACTS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}
_PLAIN_ACTS_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
_GATED_ACTS_TO_HF = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}
_ROPE_TYPES = {"default": "none", "linear": "linear", "dynamic": "dynamic", "yarn": "yarn", "llama3": "llama3"}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from an HF `config.json` dict; ConfigError for what we cannot express."""
    model_type = hf.get("model_type")
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise ConfigError(
            f"{model_type}: the checkpoint is quantized (quant_method={method!r}); tformer reads full-precision "
            "weights only: use a bf16/fp32 copy of the model, or quantize after loading (tformer.quantize)"
        )
    if model_type == "gpt2":
        return ModelConfig(**_gpt2_fields(hf))
    if model_type in LLAMA_FAMILY:
        return ModelConfig(**_llama_family_fields(hf, model_type))
    if model_type in MOE_FAMILY:
        from tformer.convert.hf_moe_config import moe_config_from_hf  # it builds on this module's helpers

        return moe_config_from_hf(hf)
    if model_type in OTHER_FAMILIES:  # encoders and encoder-decoders (their own converters)
        module, name = OTHER_FAMILIES[model_type]
        try:
            return getattr(importlib.import_module(f"tformer.convert.{module}"), name)(hf)
        except KeyError as e:
            raise ConfigError(f"{model_type}: config.json lacks {e}, which tformer needs") from None
    raise ConfigError(
        f"HF model_type={model_type!r} is not supported; supported model types: "
        f"{list(SUPPORTED_MODEL_TYPES) + list(OTHER_FAMILIES)}"
    )


def _get(hf: dict, key: str) -> Any:
    if hf.get(key) is None:
        raise ConfigError(f"{hf.get('model_type')}: the config has no {key!r}; the config.json is incomplete")
    return hf[key]


def _lookup(name: str, value: Any, table: dict, model_type: str) -> Any:
    if value not in table:
        raise ConfigError(f"{model_type}: {name}={value!r} is not supported; supported values: {sorted(table)}")
    return table[value]


def _gpt2_fields(hf: dict) -> dict:
    for key, ok in (("add_cross_attention", False), ("scale_attn_weights", True),
                    ("scale_attn_by_inverse_layer_idx", False)):  # fmt: skip
        if hf.get(key, ok) != ok:
            raise ConfigError(f"gpt2: {key}={hf[key]!r} is not supported; only {key}={ok} is")
    dim = _get(hf, "n_embd")
    return dict(
        vocab_size=_get(hf, "vocab_size"),
        dim=dim,
        n_layers=_get(hf, "n_layer"),
        n_heads=_get(hf, "n_head"),
        ffn_dim=hf.get("n_inner") or 4 * dim,
        activation=_lookup("activation_function", hf.get("activation_function", "gelu_new"), _PLAIN_ACTS, "gpt2"),
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        norm_bias=True,
        positions="learned",
        qkv_bias=True,
        out_bias=True,
        ffn_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        max_seq_len=hf.get("n_positions") or hf.get("n_ctx") or 1024,
        emb_dropout=hf.get("embd_pdrop", 0.1),
        attn_dropout=hf.get("attn_pdrop", 0.1),
        resid_dropout=hf.get("resid_pdrop", 0.1),
        init_std=hf.get("initializer_range", 0.02),
        scale_residual_init=True,
    )


def _llama_family_fields(hf: dict, model_type: str) -> dict:
    dim, n_heads = _get(hf, "hidden_size"), _get(hf, "num_attention_heads")
    attention_bias = bool(hf.get("attention_bias", False)) and model_type == "llama"
    return dict(
        vocab_size=_get(hf, "vocab_size"),
        dim=dim,
        n_layers=_get(hf, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or dim // n_heads,
        ffn_dim=_get(hf, "intermediate_size"),
        activation=_lookup("hidden_act", hf.get("hidden_act", "silu"), _GATED_ACTS, model_type),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        norm_bias=False,
        positions="rope",
        rope=_rope_from_hf(hf),
        qkv_bias=attention_bias or model_type == "qwen2",  # Qwen2 always has q/k/v biases, never an o_proj one
        out_bias=attention_bias,
        ffn_bias=bool(hf.get("mlp_bias", False)) and model_type == "llama",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=hf.get("max_position_embeddings") or 2048,
        sliding_window=_sliding_window_from_hf(hf, model_type),
        attn_dropout=hf.get("attention_dropout", 0.0),
        init_std=hf.get("initializer_range", 0.02),
        scale_residual_init=False,
    )


def _sliding_window_from_hf(hf: dict, model_type: str) -> int | None:
    if model_type == "mistral":
        return hf.get("sliding_window")
    if model_type != "qwen2" or not hf.get("use_sliding_window") or hf.get("sliding_window") is None:
        return None
    # Qwen2 windows layer i only when i >= max_window_layers (5.x writes the result as layer_types)
    n_layers = _get(hf, "num_hidden_layers")
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention" for i in range(n_layers)
    ]
    if set(layer_types) == {"full_attention"}:
        return None
    if set(layer_types) != {"sliding_attention"}:
        raise ConfigError(
            f"qwen2: a sliding window on some layers only (layer_types={layer_types}) is not supported; "
            "tformer applies sliding_window to every layer"
        )
    return hf["sliding_window"]


def _rope_from_hf(hf: dict) -> RopeConfig:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"per-layer-type RoPE parameters are not supported: {sorted(params)}")
    kind = params.get("rope_type", params.get("type", "default"))
    scaling = _lookup("rope type", kind, _ROPE_TYPES, hf["model_type"])
    max_pos = hf.get("max_position_embeddings")
    rope = RopeConfig(
        theta=float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0),
        scaling=scaling,
        partial_rotary_factor=params.get("partial_rotary_factor", hf.get("partial_rotary_factor") or 1.0),
    )
    if scaling == "none":
        return rope
    rope.factor = params.get("factor")
    rope.original_max_seq_len = params.get("original_max_position_embeddings") or max_pos
    if scaling == "dynamic":  # HF's dynamic NTK grows the base past max_position_embeddings
        rope.original_max_seq_len = max_pos
    elif scaling == "llama3":
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if params.get(k) is None]
        if missing:
            raise ConfigError(f"rope type 'llama3' needs {missing}; the config.json is incomplete")
        rope.low_freq_factor, rope.high_freq_factor = params["low_freq_factor"], params["high_freq_factor"]
    elif scaling == "yarn":
        _yarn_from_hf(rope, params, max_pos)
    if rope.factor is None:
        raise ConfigError(f"rope type {kind!r} needs a 'factor'; the config.json is incomplete")
    return rope


def _yarn_from_hf(rope: RopeConfig, params: dict, max_pos: int | None) -> None:
    if params.get("truncate", True) is not True:
        raise ConfigError("yarn with truncate=False is not supported; tformer's YaRN rounds the correction range")
    if rope.factor is None and max_pos:  # HF infers the factor from the two context lengths
        rope.factor = max_pos / rope.original_max_seq_len
    rope.beta_fast = float(params.get("beta_fast") or 32.0)
    rope.beta_slow = float(params.get("beta_slow") or 1.0)
    rope.attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if rope.attention_factor is None and mscale and mscale_all_dim and (rope.factor or 0) > 1:
        # DeepSeek-style: ratio of two mscales (as HF's _compute_yarn_parameters)
        rope.attention_factor = yarn_mscale(rope.factor, mscale) / yarn_mscale(rope.factor, mscale_all_dim)


def hf_model_type(cfg: ModelConfig) -> str:
    """The HF architecture that expresses `cfg`, or ConfigError naming the field that prevents it."""
    if cfg.architecture != "decoder":
        _inexpressible(f"architecture={cfg.architecture!r} (HF export covers decoders; BERT loads, not saves)")
    if cfg.norm_placement != "pre":
        _inexpressible(f"norm_placement={cfg.norm_placement!r} (all supported HF decoders are pre-norm)")
    a = cfg.attention
    if a.pattern != "causal" or a.windows is not None or a.softcap is not None:
        _inexpressible("attention.pattern, attention.windows or attention.softcap (tformer.nn.variants: no "
                       "supported HF decoder has them)")
    if cfg.ssd is not None:
        _inexpressible("ssd (Mamba-2 layers, tformer.nn.ssd: no supported HF decoder mixes them with attention)")
    if cfg.moe is not None or cfg.mla is not None:
        from tformer.convert.hf_moe_config import moe_model_type

        return moe_model_type(cfg)
    if cfg.positions == "learned":
        return _check_gpt2(cfg)
    if cfg.positions != "rope":
        _inexpressible(f"positions={cfg.positions!r} (gpt2 uses 'learned', llama/mistral/qwen2 'rope')")
    if cfg.norm != "rmsnorm":
        _inexpressible(f"norm={cfg.norm!r} with RoPE (llama/mistral/qwen2 use 'rmsnorm')")
    if cfg.activation not in _GATED_ACTS_TO_HF:
        _inexpressible(f"activation={cfg.activation!r} with RoPE (llama-family FFNs are {list(_GATED_ACTS_TO_HF)})")
    if cfg.rope.partial_rotary_factor != 1.0:
        _inexpressible(f"rope.partial_rotary_factor={cfg.rope.partial_rotary_factor} (llama-family rotate all dims)")
    if cfg.qkv_bias and not cfg.out_bias:
        if cfg.ffn_bias:
            _inexpressible("ffn_bias=True with qkv_bias and no out_bias (qwen2 has no FFN biases)")
        return "qwen2"
    if cfg.out_bias and not cfg.qkv_bias:
        _inexpressible("out_bias=True with qkv_bias=False (no supported architecture has that)")
    if cfg.sliding_window is None:
        return "llama"
    if cfg.qkv_bias or cfg.ffn_bias:
        _inexpressible("sliding_window with qkv/out/ffn biases (mistral has none; qwen2 has q/k/v biases only)")
    return "mistral"


def _check_gpt2(cfg: ModelConfig) -> str:
    problems = [
        (cfg.norm != "layernorm" or not cfg.norm_bias, f"norm={cfg.norm!r}, norm_bias={cfg.norm_bias}"),
        (cfg.activation not in _PLAIN_ACTS_TO_HF, f"activation={cfg.activation!r}"),
        (not (cfg.qkv_bias and cfg.out_bias and cfg.ffn_bias), "a linear layer without bias"),
        (cfg.n_kv_heads != cfg.n_heads, f"n_kv_heads={cfg.n_kv_heads} != n_heads={cfg.n_heads}"),
        (cfg.head_dim * cfg.n_heads != cfg.dim, f"head_dim={cfg.head_dim} != dim / n_heads"),
        (cfg.sliding_window is not None, f"sliding_window={cfg.sliding_window}"),
    ]
    for bad, what in problems:
        if bad:
            _inexpressible(
                f"learned positions mean gpt2, which cannot have {what} (gpt2 needs LayerNorm with bias, "
                f"biases everywhere, one of {list(_PLAIN_ACTS_TO_HF)}, full multi-head attention, no sliding window)"
            )
    return "gpt2"


def _inexpressible(reason: str) -> None:
    raise ConfigError(
        f"no supported HF architecture {list(SUPPORTED_MODEL_TYPES)} can express this config: {reason}. "
        "Save it with tformer.save instead."
    )


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """An HF `config.json` dict for `cfg` (gpt2, llama, mistral, qwen2, mixtral, qwen2_moe or
    deepseek_v3, whichever expresses it)."""
    model_type = hf_model_type(cfg)
    if model_type in MOE_FAMILY:
        from tformer.convert.hf_moe_config import moe_config_to_hf

        fields = moe_config_to_hf(cfg, model_type)
    elif model_type == "gpt2":
        fields = _gpt2_to_hf(cfg)
    else:
        fields = _llama_family_to_hf(cfg, model_type)
    head = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type}
    return {**head, **fields, "torch_dtype": dtype, "dtype": dtype, "use_cache": True}


def _gpt2_to_hf(cfg: ModelConfig) -> dict:
    return dict(
        vocab_size=cfg.vocab_size,
        n_embd=cfg.dim,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.ffn_dim,
        n_positions=cfg.max_seq_len,
        activation_function=_PLAIN_ACTS_TO_HF[cfg.activation],
        layer_norm_epsilon=cfg.norm_eps,
        embd_pdrop=cfg.emb_dropout,
        attn_pdrop=cfg.attn_dropout,
        resid_pdrop=cfg.resid_dropout,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
        add_cross_attention=False,
    )


def _llama_family_to_hf(cfg: ModelConfig, model_type: str) -> dict:
    out = decoder_to_hf(cfg)
    if model_type == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.ffn_bias)
    elif model_type == "mistral":
        out.update(sliding_window=cfg.sliding_window)
    else:  # qwen2: window every layer (max_window_layers=0) or none
        windowed = cfg.sliding_window is not None
        out.update(use_sliding_window=windowed, sliding_window=cfg.sliding_window,
                   max_window_layers=0 if windowed else cfg.n_layers)  # fmt: skip
    return out


def decoder_to_hf(cfg: ModelConfig) -> dict:
    """The fields every llama-style HF config shares (sizes, norm, RoPE, tying, init)."""
    out = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.ffn_dim,
        hidden_act=_GATED_ACTS_TO_HF[cfg.activation],
        rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_dropout=cfg.attn_dropout,
        initializer_range=cfg.init_std,
    )
    out.update(_rope_to_hf(cfg))
    if cfg.rope.scaling == "dynamic":  # HF's dynamic NTK takes max_position_embeddings as the original length
        out["max_position_embeddings"] = cfg.rope.original_max_seq_len
    return out


def _rope_to_hf(cfg: ModelConfig) -> dict:
    r = cfg.rope
    scaling: dict[str, Any] | None = None
    if r.scaling != "none":
        scaling = {"rope_type": r.scaling, "factor": r.factor}
    if r.scaling in ("yarn", "llama3"):
        scaling["original_max_position_embeddings"] = r.original_max_seq_len
    if r.scaling == "llama3":
        scaling.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor)
    if r.scaling == "yarn":
        scaling.update(beta_fast=r.beta_fast, beta_slow=r.beta_slow)
        if r.attention_factor is not None:
            scaling["attention_factor"] = r.attention_factor
    parameters = {"rope_type": "default", **(scaling or {}), "rope_theta": r.theta}
    # 4.x reads rope_theta + rope_scaling; 5.x prefers rope_scaling when set, else rope_parameters
    return {"rope_theta": r.theta, "rope_scaling": scaling, "rope_parameters": parameters}
