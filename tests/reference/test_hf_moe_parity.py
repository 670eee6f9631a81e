"""Parity with HF transformers for the mixture-of-experts families: Mixtral, Qwen2-MoE, DeepSeek-V3.

As in test_hf_parity: a tiny HF model at random init (every parameter perturbed; DeepSeek's
e_score_correction_bias drawn too), saved with `save_pretrained`, loaded with the production
converter, logits compared in fp32 on CPU (plain, left-padded, rows alone) and our `save_hf`
export reloaded by `AutoModelForCausalLM`. On top: the experts each token picks and their weights
equal HF's, and both expert layouts load: per expert (the Hub's files and `save_pretrained`'s,
also written here by hand from HF's fused tensors) and transformers 5.x's fused tensors.
"""

import dataclasses
import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import tformer  # noqa: E402
from tests.reference.test_hf_parity import ATOL, check_export, check_parity, hf_model  # noqa: E402
from tformer.config import ConfigError  # noqa: E402
from tformer.convert.hf import config_from_hf, config_to_hf  # noqa: E402
from tformer.io import CheckpointError  # noqa: E402
from tformer.presets import get_preset  # noqa: E402

VOCAB = 160
BASE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
            rms_norm_eps=1e-5)  # fmt: skip
DEEPSEEK = dict(BASE, rms_norm_eps=1e-6, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
                first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=16, rope_interleave=True)  # fmt: skip
# mscale != mscale_all_dim: a cos/sin factor != 1 and a scaled softmax; original context 16 < 24 tokens
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16, mscale=1.0,
            mscale_all_dim=0.8, beta_fast=32.0, beta_slow=1.0)  # fmt: skip


def routers(hf, ours):
    hf_routers = [m for m in hf.modules() if type(m).__name__.lower().endswith("topkrouter")]
    our_routers = [layer.ffn.router for i, layer in enumerate(ours.layers) if ours.config.is_moe_layer(i)]
    assert len(hf_routers) == len(our_routers) > 0
    return hf_routers, our_routers


@torch.no_grad()
def check_routing(hf, ours, T: int = 24) -> None:
    """Every MoE layer picks the same experts for every token, with the same weights, as HF."""
    picks = {"hf": [], "ours": []}
    hooks = [m.register_forward_hook(lambda m, i, out: picks["hf"].append((out[2], out[1]))) for m in routers(hf, ours)[0]]
    hooks += [m.register_forward_hook(lambda m, i, out: picks["ours"].append((out[1], out[0])))
              for m in routers(hf, ours)[1]]  # fmt: skip
    tokens = torch.randint(0, VOCAB, (2, T))
    hf(tokens), ours(tokens)
    for h in hooks:
        h.remove()
    for (hf_experts, hf_weights), (experts, weights) in zip(picks["hf"], picks["ours"], strict=True):
        hf_experts, hf_order = hf_experts.sort(-1)
        experts, order = experts.sort(-1)
        assert torch.equal(experts, hf_experts)
        torch.testing.assert_close(weights.gather(-1, order), hf_weights.float().gather(-1, hf_order))
        assert len({tuple(e) for e in experts.tolist()}) > 2  # routing varies from token to token


def write_layouts(hf, src, tmp_path, model_type: str):
    """From HF's (fused, 5.x) module state: a fused checkpoint, and a per-expert one written by hand."""
    fused, legacy = tmp_path / "fused", tmp_path / "legacy"
    tensors = {k: v.contiguous() for k, v in hf.state_dict().items()}
    per_expert = {}
    names = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    block = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    for key, t in tensors.items():
        if m := re.fullmatch(r"(.+)\.mlp\.experts\.gate_up_proj", key):
            F = t.shape[1] // 2
            for e in range(t.shape[0]):
                per_expert[f"{m[1]}.{block}.experts.{e}.{names[0]}.weight"] = t[e, :F].clone()
                per_expert[f"{m[1]}.{block}.experts.{e}.{names[1]}.weight"] = t[e, F:].clone()
        elif m := re.fullmatch(r"(.+)\.mlp\.experts\.down_proj", key):
            for e in range(t.shape[0]):
                per_expert[f"{m[1]}.{block}.experts.{e}.{names[2]}.weight"] = t[e].clone()
        else:
            per_expert[key.replace(".mlp.gate.", f".{block}.gate.")] = t
    for directory, state in ((fused, tensors), (legacy, per_expert)):
        directory.mkdir()
        (directory / "config.json").write_text((src / "config.json").read_text())
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    return fused, legacy


@torch.no_grad()
def check_layouts(hf, ours, tmp_path, model_type: str):
    """save_pretrained wrote one tensor per expert; that, the fused layout and a hand-written
    per-expert file all load to the same logits."""
    saved = load_file(tmp_path / "hf" / "model.safetensors")
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in saved)
    fused, legacy = write_layouts(hf, tmp_path / "hf", tmp_path, model_type)
    tokens = torch.randint(0, VOCAB, (2, 16))
    want = ours(tokens)
    for directory in (fused, legacy):
        torch.testing.assert_close(tformer.load(directory).eval()(tokens), want, atol=0, rtol=0)
    return legacy


def load_and_compare(hf, tmp_path, **parity):
    hf.save_pretrained(tmp_path / "hf")
    ours = tformer.load(tmp_path / "hf").eval()
    check_routing(hf, ours)
    check_parity(hf, ours, VOCAB, **parity)
    check_export(ours, tmp_path / "export", VOCAB)
    return ours


@pytest.mark.parametrize("window", [None, 8])
def test_against_hf_mixtral(tmp_path, window):
    """Softmax top-2 of 4, renormalised; a window (8 of 24 tokens) on every layer, as mistral."""
    config = transformers.MixtralConfig(**BASE, num_key_value_heads=2, intermediate_size=32, num_local_experts=4,
                                        num_experts_per_tok=2, sliding_window=window)  # fmt: skip
    hf = hf_model(config, attn="eager" if window else "sdpa")
    ours = load_and_compare(hf, tmp_path)
    assert ours.config.moe.norm_topk and ours.config.sliding_window == window
    check_layouts(hf, ours, tmp_path, "mixtral")


@pytest.mark.parametrize(
    "extra",
    [dict(norm_topk_prob=False), dict(norm_topk_prob=True, num_hidden_layers=3, decoder_sparse_step=2)],
    ids=["every-layer", "sparse-step-2"],
)
def test_against_hf_qwen2_moe(tmp_path, extra):
    """Softmax top-2 of 4 (renormalised or not), a shared expert behind a sigmoid gate, q/k/v biases;
    decoder_sparse_step 2 on 3 layers: MoE on layer 1 only, dense FFNs around it."""
    config = transformers.Qwen2MoeConfig(**{**BASE, **extra}, num_key_value_heads=2, intermediate_size=96,
                                         moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4,
                                         num_experts_per_tok=2)  # fmt: skip
    hf = hf_model(config)
    ours = load_and_compare(hf, tmp_path)
    assert ours.config.moe.shared_gate and ours.config.qkv_bias
    moe_layers = [i for i in range(ours.config.n_layers) if ours.config.is_moe_layer(i)]
    assert moe_layers == ([1] if "decoder_sparse_step" in extra else [0, 1])
    check_layouts(hf, ours, tmp_path, "qwen2_moe")


def _deepseek(**extra):
    hf = hf_model(transformers.DeepseekV3Config(**{**DEEPSEEK, **extra}))
    for module in hf.modules():  # a buffer, not perturbed by hf_model: its selection effect must show
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.normal_(0, 0.1)
    return hf


@pytest.mark.parametrize(
    "extra",
    [{}, dict(rope_parameters=YARN), dict(q_lora_rank=None, attention_bias=True, rope_interleave=False)],
    ids=["interleaved", "yarn-mscale", "full-rank-q-biases-half"],
)
def test_against_hf_deepseek_v3(tmp_path, extra):
    """Sigmoid scores + e_score_correction_bias over 4 groups of 2 (best 2), top-2 renormalised x 2.5,
    a shared expert, layer 0 dense; latent attention with interleaved RoPE rows; YaRN with DeepSeek's
    mscale pair (cos/sin factor and softmax scale)."""
    hf = _deepseek(**extra)
    ours = load_and_compare(hf, tmp_path)
    assert ours.config.moe.expert_bias and ours.config.moe.n_groups == 4 and ours.config.moe.first_dense == 1
    if "rope_parameters" in extra:
        assert ours.config.mla.softmax_scale == hf.model.layers[0].self_attn.scaling
        assert ours.config.rope.attention_factor != 1.0
    legacy = check_layouts(hf, ours, tmp_path, "deepseek_v3")

    # the bias matters here: without it other experts are picked
    tokens = torch.randint(0, VOCAB, (2, 16))
    unbiased = tformer.load(legacy).eval()
    unbiased.layers[1].ffn.router.expert_bias.zero_()
    with torch.no_grad():
        assert (unbiased(tokens) - ours(tokens)).abs().max() > 100 * ATOL

    # multi-token-prediction layers (model.layers.{n_layers}.*) are skipped, with a warning
    tensors = load_file(legacy / "model.safetensors")
    tensors |= {"model.layers.2.eh_proj.weight": torch.zeros(64, 128), "model.layers.2.enorm.weight": torch.ones(64)}
    save_file(tensors, legacy / "model.safetensors", metadata={"format": "pt"})
    hf_config = json.loads((legacy / "config.json").read_text())
    assert hf_config["num_nextn_predict_layers"] == 1
    with pytest.warns(UserWarning, match=r"skipped 2 tensors of 1 multi-token-prediction layer"):
        mtp = tformer.load(legacy).eval()
    with torch.no_grad():
        torch.testing.assert_close(mtp(tokens), ours(tokens), atol=0, rtol=0)
    (legacy / "config.json").write_text(json.dumps(hf_config | {"num_nextn_predict_layers": 0}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['model\.layers\.2\.eh_proj"):
        tformer.load(legacy)


@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen1.5-moe-a2.7b", "deepseek-v3", "tiny-moe", "tiny-mla-moe"])
def test_moe_presets_round_trip_through_hf_configs(name):
    preset = get_preset(name)
    hf = config_to_hf(preset)
    assert config_from_hf(json.loads(json.dumps(hf))) == preset
    if preset.mla is not None:  # DeepSeek's published mscale pair comes back out, not a float near it
        assert hf["rope_scaling"]["mscale_all_dim"] == hf["rope_scaling"]["mscale"] == 1.0


def test_yarn_mscale_pair_round_trips_exactly():
    ours = config_from_hf(transformers.DeepseekV3Config(**DEEPSEEK, rope_parameters=YARN).to_dict())
    hf = config_to_hf(ours)
    assert (hf["rope_parameters"]["mscale"], hf["rope_parameters"]["mscale_all_dim"]) == (1.0, 0.8)
    assert config_from_hf(hf) == ours


_QWEN = dict(BASE, model_type="qwen2_moe", intermediate_size=96, moe_intermediate_size=32, num_experts=4,
             num_experts_per_tok=2, shared_expert_intermediate_size=48, num_hidden_layers=4)  # fmt: skip
_DEEPSEEK = dict(DEEPSEEK, model_type="deepseek_v3")


@pytest.mark.parametrize(
    "hf, match",
    [
        (_QWEN | {"mlp_only_layers": [1]}, r"MoE on layers \[0, 2, 3\].*mlp_only_layers=\[1\]"),
        (_QWEN | {"use_sliding_window": True, "sliding_window": 8}, "sliding-window attention"),
        (_DEEPSEEK | {"scoring_func": "softmax"}, r"scoring_func='softmax' is not supported"),
        (_DEEPSEEK | {"topk_method": "greedy"}, r"topk_method='greedy' is not supported"),
        (_DEEPSEEK | {"quantization_config": {"quant_method": "fp8"}}, r"quantized \(quant_method='fp8'\)"),
        (_DEEPSEEK | {"rms_norm_eps": 1e-5}, r"rms_norm_eps=1e-05 is not supported: HF's latent norms"),
    ],
)
def test_unsupported_moe_hf_configs(hf, match):
    with pytest.raises(ConfigError, match=match):
        config_from_hf(hf)


def test_qwen2_moe_dense_layers_from_mlp_only_layers():
    ours = config_from_hf(_QWEN | {"mlp_only_layers": [0, 2]})
    assert [ours.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    assert config_to_hf(ours)["decoder_sparse_step"] == 2 and config_to_hf(ours)["mlp_only_layers"] == []
    ours = ours.replace(moe=dataclasses.replace(ours.moe, first_dense=2, interval=1))
    assert config_to_hf(ours)["mlp_only_layers"] == [0, 1] and config_from_hf(config_to_hf(ours)) == ours


@pytest.mark.parametrize(
    "name, change, match",
    [
        ("deepseek-v2-lite", {}, r"means deepseek_v3, which cannot have moe.score_func='softmax'"),
        ("seed-moe-example", {}, r"means mixtral, which cannot have moe.norm_topk=False"),
        ("tiny-moe", {"qkv_bias": True}, "mixtral, which cannot have attention biases"),
        ("tiny-moe", {"moe": {"n_experts": 4, "top_k": 2, "capacity_factor": 1.0}}, "capacity_factor"),
        ("tiny-mla-moe", {"rope": {"scaling": "none"}}, r"mla.softmax_scale=.* with rope.scaling='none'"),
    ],
)
def test_config_to_hf_names_what_no_moe_architecture_expresses(name, change, match):
    with pytest.raises(ConfigError, match=match):
        config_to_hf(get_preset(name).replace(**change))
