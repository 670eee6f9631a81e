"""HF `config.json` <-> ModelConfig for the mixture-of-experts architectures (Mixtral, Qwen2-MoE,
DeepSeek-V3). Attention, norms, sizes and RoPE are read and written as for llama (`hf_config`);
this module adds the router, experts and latent attention:

    mixtral      num_local_experts, num_experts_per_tok  moe.n_experts, moe.top_k (softmax, top-k renormalised)
                 intermediate_size                      moe.expert_dim (every layer is MoE)
                 sliding_window                         sliding_window (every layer, as mistral)
    qwen2_moe    moe_intermediate_size, norm_topk_prob  moe.expert_dim, moe.norm_topk (softmax)
                 shared_expert_intermediate_size        moe.shared_dim behind a sigmoid moe.shared_gate
                 decoder_sparse_step, mlp_only_layers   moe.first_dense, moe.interval (MoE on layers
                                                        first_dense, first_dense + interval, ...; else an error)
                 qkv_bias (5.x; 4.x: always)            qkv_bias
    deepseek_v3  n_routed_experts, n_shared_experts,    sigmoid scores + moe.expert_bias
                 n_group, topk_group, norm_topk_prob,   (e_score_correction_bias), moe.n_groups, ...
                 routed_scaling_factor, first_k_dense_replace
                 q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim   mla.*
                 rope_scaling yarn mscale, mscale_all_dim  rope.attention_factor, mla.softmax_scale

Training-only settings without an HF field (moe.z_loss_coef, moe.bias_update_rate, DeepSeek's
sequence-wise aux loss) are not exported. Router jitter (Mixtral, training only) is ignored.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from tformer.config import ConfigError, MLAConfig, ModelConfig, MoEConfig, deepseek_yarn_scales, yarn_mscale
from tformer.convert.hf_config import (
    _GATED_ACTS_TO_HF,
    _get,
    _inexpressible,
    _llama_family_fields,
    decoder_to_hf,
)


LATENT_NORM_EPS = 1e-6  # HF DeepseekV3RMSNorm's default, which its q_a/kv_a_layernorm keep


def moe_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from a mixtral / qwen2_moe / deepseek_v3 `config.json` dict."""
    model_type = hf["model_type"]
    fields = _llama_family_fields(hf, model_type)  # no biases, no sliding window: set below per family
    read = {"mixtral": _mixtral_fields, "qwen2_moe": _qwen2_moe_fields, "deepseek_v3": _deepseek_v3_fields}
    return ModelConfig(**{**fields, **read[model_type](hf, fields)})


def _mixtral_fields(hf: dict, fields: dict) -> dict:
    moe = MoEConfig(
        n_experts=_get(hf, "num_local_experts"),
        top_k=_get(hf, "num_experts_per_tok"),
        expert_dim=_get(hf, "intermediate_size"),
        aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
    )
    return dict(moe=moe, sliding_window=hf.get("sliding_window"))


def _qwen2_moe_fields(hf: dict, fields: dict) -> dict:
    n_layers = fields["n_layers"]
    layer_types = hf.get("layer_types") or [  # transformers 5.x's rule when config.json has no list
        "sliding_attention" if (i + 1) % 2 and i < hf.get("max_window_layers", 28) else "full_attention"
        for i in range(n_layers)
    ]
    if hf.get("use_sliding_window") and "sliding_attention" in layer_types:
        raise ConfigError(
            f"qwen2_moe: sliding-window attention (use_sliding_window=true, layer_types={layer_types}) is not "
            "supported for MoE models; no released Qwen MoE uses it"
        )
    first_dense, interval = _qwen2_moe_layers(hf, n_layers)
    moe = MoEConfig(
        n_experts=_get(hf, "num_experts"),
        top_k=_get(hf, "num_experts_per_tok"),
        expert_dim=_get(hf, "moe_intermediate_size"),
        n_shared_experts=1,
        shared_dim=_get(hf, "shared_expert_intermediate_size"),
        shared_gate=True,
        norm_topk=bool(hf.get("norm_topk_prob", False)),
        aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
        first_dense=first_dense,
        interval=interval,
    )
    return dict(moe=moe, qkv_bias=bool(hf.get("qkv_bias", True)))


def _qwen2_moe_layers(hf: dict, n_layers: int) -> tuple[int, int]:
    """HF: layer i is MoE when i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
    step, dense = hf.get("decoder_sparse_step") or 1, sorted(hf.get("mlp_only_layers") or [])
    if not dense:
        return step - 1, step
    moe = [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]
    if not moe:
        return n_layers, 1
    interval = moe[1] - moe[0] if len(moe) > 1 else max(n_layers - moe[0], 1)
    if moe != list(range(moe[0], n_layers, interval)):
        raise ConfigError(
            f"qwen2_moe: MoE on layers {moe} (decoder_sparse_step={step}, mlp_only_layers={dense}) is not "
            "supported; tformer puts MoE on layers first_dense, first_dense + interval, ... up to the last"
        )
    return moe[0], interval


def _deepseek_v3_fields(hf: dict, fields: dict) -> dict:
    # keys DeepSeek's own config.json has and HF's DeepseekV3 assumes without reading them
    for key, ok in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1)):
        if hf.get(key, ok) != ok:
            raise ConfigError(f"deepseek_v3: {key}={hf[key]!r} is not supported; only {key}={ok!r} is")
    if not hf.get("n_shared_experts"):
        raise ConfigError("deepseek_v3: n_shared_experts must be >= 1 (HF builds the shared experts always)")
    if fields["norm_eps"] != LATENT_NORM_EPS:
        raise ConfigError(
            f"deepseek_v3: rms_norm_eps={fields['norm_eps']} is not supported: HF's latent norms (q_a_layernorm, "
            f"kv_a_layernorm) always use {LATENT_NORM_EPS}, tformer's use norm_eps; only {LATENT_NORM_EPS} (every "
            "DeepSeek release) gives the same model"
        )
    nope, rope = _get(hf, "qk_nope_head_dim"), _get(hf, "qk_rope_head_dim")
    mla = MLAConfig(
        q_rank=hf.get("q_lora_rank"),
        kv_rank=_get(hf, "kv_lora_rank"),
        nope_dim=nope,
        rope_dim=rope,
        v_dim=_get(hf, "v_head_dim"),
        softmax_scale=_mla_softmax_scale(hf, fields, nope + rope),
    )
    moe = MoEConfig(
        n_experts=_get(hf, "n_routed_experts"),
        top_k=_get(hf, "num_experts_per_tok"),
        expert_dim=_get(hf, "moe_intermediate_size"),
        n_shared_experts=hf["n_shared_experts"],
        score_func="sigmoid",
        norm_topk=bool(hf.get("norm_topk_prob", True)),
        routed_scale=float(hf.get("routed_scaling_factor", 1.0)),
        n_groups=hf.get("n_group") or 1,
        topk_groups=hf.get("topk_group") or 1,
        expert_bias=True,
        first_dense=hf.get("first_k_dense_replace") or 0,
    )
    bias = bool(hf.get("attention_bias", False))  # q_a_proj, kv_a_proj_with_mqa and o_proj
    head_dim = None if fields["dim"] % fields["n_heads"] == 0 else nope + rope  # unused by MLA
    return dict(mla=mla, moe=moe, qkv_bias=bias, out_bias=bias, head_dim=head_dim)


def _mla_softmax_scale(hf: dict, fields: dict, qk_head_dim: int) -> float | None:
    """HF `yarn_apply_mscale`: any scaled RoPE with a nonzero mscale_all_dim scales the softmax."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if fields["rope"].scaling == "none" or not params.get("mscale_all_dim"):
        return None
    return deepseek_yarn_scales(fields["rope"].factor, 1.0, params["mscale_all_dim"], qk_head_dim)[1]


def moe_model_type(cfg: ModelConfig) -> str:
    """mixtral, qwen2_moe or deepseek_v3 for an MoE/MLA config; ConfigError naming what none can express."""
    common = [
        (cfg.positions != "rope", f"positions={cfg.positions!r}"),
        (cfg.norm != "rmsnorm", f"norm={cfg.norm!r}"),
        (cfg.activation not in _GATED_ACTS_TO_HF, f"activation={cfg.activation!r}"),
        (cfg.rope.partial_rotary_factor != 1.0, f"rope.partial_rotary_factor={cfg.rope.partial_rotary_factor}"),
        (cfg.ffn_bias, "ffn_bias=True"),
        (cfg.moe is None, "latent attention (mla) without MoE"),
        (cfg.moe is not None and cfg.moe.capacity_factor is not None, "moe.capacity_factor (dropped tokens)"),
    ]
    _check("an MoE config", "mixtral/qwen2_moe/deepseek_v3", common,
           "RoPE, RMSNorm, SwiGLU/GeGLU experts, no FFN biases, no token dropping")  # fmt: skip
    if cfg.mla is not None:
        return _check_deepseek_v3(cfg)
    return _check_qwen2_moe(cfg) if cfg.moe.shared_gate else _check_mixtral(cfg)


def _check(why: str, arch: str, problems: list[tuple[bool, str]], needs: str) -> None:
    for bad, what in problems:
        if bad:
            _inexpressible(f"{why} means {arch}, which cannot have {what} ({arch} needs {needs})")


def _router_problems(m: MoEConfig, score_func: str) -> list[tuple[bool, str]]:
    return [
        (m.score_func != score_func, f"moe.score_func={m.score_func!r}"),
        (m.n_groups != 1 and score_func == "softmax", f"moe.n_groups={m.n_groups}"),
        (m.expert_bias != (score_func == "sigmoid"), f"moe.expert_bias={m.expert_bias}"),
        (m.routed_scale != 1.0 and score_func == "softmax", f"moe.routed_scale={m.routed_scale}"),
    ]


def _check_mixtral(cfg: ModelConfig) -> str:
    m = cfg.moe
    problems = _router_problems(m, "softmax") + [
        (not m.norm_topk, "moe.norm_topk=False"),
        (bool(m.n_shared_experts or m.shared_dim), "shared experts without moe.shared_gate"),
        (m.first_dense != 0 or m.interval != 1, "dense FFN layers (moe.first_dense, moe.interval)"),
        (cfg.qkv_bias or cfg.out_bias, "attention biases"),
    ]
    _check("an MoE without a shared gate", "mixtral", problems,
           "a softmax router with renormalised top-k, no shared experts, MoE on every layer, no biases")  # fmt: skip
    return "mixtral"


def _check_qwen2_moe(cfg: ModelConfig) -> str:
    problems = _router_problems(cfg.moe, "softmax") + [
        (cfg.out_bias, "out_bias=True"),
        (cfg.sliding_window is not None, f"sliding_window={cfg.sliding_window}"),
    ]
    _check("an MoE with a shared gate", "qwen2_moe", problems,
           "a softmax router, one gated shared FFN, no o_proj bias, no sliding window")  # fmt: skip
    return "qwen2_moe"


def _check_deepseek_v3(cfg: ModelConfig) -> str:
    m = cfg.moe
    expert_dim = m.expert_dim or cfg.ffn_dim
    problems = _router_problems(m, "sigmoid") + [
        (m.n_shared_experts < 1, "no shared expert (moe.n_shared_experts=0)"),
        (m.shared_dim not in (None, m.n_shared_experts * expert_dim), f"moe.shared_dim={m.shared_dim}"),
        (m.shared_gate, "moe.shared_gate=True"),
        (m.interval != 1, f"moe.interval={m.interval}"),
        (m.n_experts // m.n_groups < 2, "expert groups of one expert (group score: the top 2 of a group)"),
        (cfg.qkv_bias != cfg.out_bias, "qkv_bias != out_bias (attention_bias covers both)"),
        (cfg.n_kv_heads != cfg.n_heads, f"n_kv_heads={cfg.n_kv_heads} != n_heads (MLA has no GQA)"),
        (cfg.sliding_window is not None, f"sliding_window={cfg.sliding_window}"),
        (cfg.norm_eps != LATENT_NORM_EPS, f"norm_eps={cfg.norm_eps} (its latent norms use {LATENT_NORM_EPS})"),
    ]
    _check("latent attention", "deepseek_v3", problems,
           "a sigmoid router with an expert bias, n_shared_experts * expert_dim shared FFN, MoE on every layer "
           "from moe.first_dense, attention biases on all projections or none")  # fmt: skip
    return "deepseek_v3"


def moe_config_to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    m = cfg.moe
    out = decoder_to_hf(cfg)
    router = dict(num_experts_per_tok=m.top_k, output_router_logits=False)
    if model_type == "mixtral":
        return out | router | dict(
            intermediate_size=m.expert_dim or cfg.ffn_dim, num_local_experts=m.n_experts,
            router_aux_loss_coef=m.aux_loss_coef, router_jitter_noise=0.0, sliding_window=cfg.sliding_window,
        )  # fmt: skip
    if model_type == "qwen2_moe":
        if m.first_dense == m.interval - 1:  # layers interval-1, 2*interval-1, ...: HF's own pattern
            step, dense = m.interval, []
        else:
            step, dense = 1, [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]
        expert_dim = m.expert_dim or cfg.ffn_dim
        return out | router | dict(
            num_experts=m.n_experts, moe_intermediate_size=expert_dim, norm_topk_prob=m.norm_topk,
            shared_expert_intermediate_size=m.shared_dim or m.n_shared_experts * expert_dim,
            decoder_sparse_step=step, mlp_only_layers=dense, router_aux_loss_coef=m.aux_loss_coef,
            qkv_bias=cfg.qkv_bias, use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers,
        )  # fmt: skip
    return _deepseek_v3_to_hf(cfg, out, router)


def _deepseek_v3_to_hf(cfg: ModelConfig, out: dict, router: dict) -> dict:
    m, a = cfg.moe, cfg.mla
    out.pop("head_dim")  # HF derives it (= qk_rope_head_dim)
    mscales = _mscales_to_hf(cfg)
    for key in ("rope_scaling", "rope_parameters"):
        if out[key] is not None:
            out[key].update(mscales)
    return out | router | dict(
        n_routed_experts=m.n_experts, moe_intermediate_size=m.expert_dim or cfg.ffn_dim,
        n_shared_experts=m.n_shared_experts, n_group=m.n_groups, topk_group=m.topk_groups,
        norm_topk_prob=m.norm_topk, routed_scaling_factor=m.routed_scale, first_k_dense_replace=m.first_dense,
        scoring_func="sigmoid", topk_method="noaux_tc",
        q_lora_rank=a.q_rank, kv_lora_rank=a.kv_rank, qk_nope_head_dim=a.nope_dim, qk_rope_head_dim=a.rope_dim,
        v_head_dim=a.v_dim, attention_bias=cfg.qkv_bias,
        rope_interleave=True,  # tformer.convert.hf writes DeepSeek's interleaved RoPE rows
        num_nextn_predict_layers=0,  # no multi-token-prediction module
    )  # fmt: skip


def _mscales_to_hf(cfg: ModelConfig) -> dict[str, float]:
    """rope_scaling {mscale_all_dim, mscale} that give mla.softmax_scale and rope.attention_factor.

    mscale_all_dim solves qk^-0.5 * mscale(f, mscale_all_dim)^2 = softmax_scale; mscale solves
    mscale(f, mscale) / mscale(f, mscale_all_dim) = attention_factor (written too: HF prefers it,
    DeepSeek's own code and other engines read the mscale pair). Values are rounded to 12 digits
    where that reproduces the scales exactly, so DeepSeek's 0.707 stays 0.707.
    """
    a, r = cfg.mla, cfg.rope
    qk = a.nope_dim + a.rope_dim
    if a.softmax_scale is None or math.isclose(a.softmax_scale, qk**-0.5, rel_tol=1e-12):
        return {}
    if r.scaling != "yarn" or r.factor <= 1:
        _inexpressible(
            f"mla.softmax_scale={a.softmax_scale} with rope.scaling={r.scaling!r}, factor={r.factor} "
            "(deepseek_v3 scales the softmax only through YaRN's mscale_all_dim, with factor > 1)"
        )
    m_all = math.sqrt(a.softmax_scale / qk**-0.5)
    mscale_all_dim = _solve_mscale(m_all, r.factor, lambda c: deepseek_yarn_scales(r.factor, 1.0, c, qk)[1],
                                   a.softmax_scale)  # fmt: skip
    if r.attention_factor is None:  # HF's default with mscale_all_dim set and no mscale: ours too
        return {"mscale_all_dim": mscale_all_dim}
    m_all = yarn_mscale(r.factor, mscale_all_dim)
    mscale = _solve_mscale(r.attention_factor * m_all, r.factor,
                           lambda c: yarn_mscale(r.factor, c) / m_all, r.attention_factor)  # fmt: skip
    return {"mscale": mscale, "mscale_all_dim": mscale_all_dim}


def _solve_mscale(m: float, factor: float, forward: Callable[[float], float], target: float) -> float:
    """The c with 0.1 * c * ln(factor) + 1 = m, rounded to 12 digits where forward(c) still equals target."""
    raw = (m - 1.0) / (0.1 * math.log(factor))
    return next((c for c in (round(raw, 12), raw) if forward(c) == target), raw)
