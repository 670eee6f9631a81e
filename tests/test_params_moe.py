"""Accounting of MoE and MLA models (tformer.accounting) against published figures
and against counts written out here by hand from the HF config.json fields."""

import json
import math

import pytest
import torch

from tformer.accounting import (
    COMPONENTS, accounting, active_breakdown, active_matmul_params, attention_flops_per_token,
    kv_cache_bytes_per_token, parameter_breakdown, peak_flops, training_flops_per_token, training_memory,
)
from tformer.cli import main
from tformer.cli.params import format_breakdown
from tformer.presets import get_preset

B = 1e9


def swiglu(dim: int, width: int) -> int:
    return 3 * dim * width


def test_mixtral_counts_by_hand():
    # Mixtral-8x7B-v0.1: 32 layers, dim 4096, 32 heads / 8 kv heads of 128, 8 experts of 14336, vocab 32000.
    L, C, V, E, F = 32, 4096, 32000, 8, 14336
    expected_total = {
        "embeddings": V * C, "attention": L * (C * C + 2 * C * 1024 + C * C), "ssd": 0, "ffn": 0,
        "routed_experts": L * E * swiglu(C, F), "shared_experts": 0, "router": L * E * C,
        "norms": (2 * L + 1) * C, "output": V * C, "total": 46_702_792_704,  # HF's meta-device count
    }
    assert parameter_breakdown(get_preset("mixtral-8x7b")) == expected_total
    active = active_breakdown(get_preset("mixtral-8x7b"))
    assert active == {**expected_total, "routed_experts": L * 2 * swiglu(C, F), "total": 12_879_925_248}


def _deepseek_expected(L, C, V, q_rank, H, E, K, n_shared, F_moe, F_dense, first_dense):
    nope, rope, v, kv_rank = 128, 64, 128, 512
    q = C * H * (nope + rope) if q_rank is None else C * q_rank + q_rank + q_rank * H * (nope + rope)
    attn = q + C * (kv_rank + rope) + kv_rank + kv_rank * H * (nope + v) + H * v * C
    n_moe = L - first_dense
    return {
        "embeddings": V * C, "attention": L * attn, "ssd": 0, "ffn": first_dense * swiglu(C, F_dense),
        "routed_experts": n_moe * E * swiglu(C, F_moe), "shared_experts": n_moe * swiglu(C, n_shared * F_moe),
        "router": n_moe * E * C, "norms": (2 * L + 1) * C, "output": V * C,
    }, n_moe * K * swiglu(C, F_moe)


@pytest.mark.parametrize(
    "name, dims",
    [
        ("deepseek-v2-lite", dict(L=27, C=2048, V=102400, q_rank=None, H=16, E=64, K=6, n_shared=2, F_moe=1408,
                                  F_dense=10944, first_dense=1)),
        ("deepseek-v3", dict(L=61, C=7168, V=129280, q_rank=1536, H=128, E=256, K=8, n_shared=1, F_moe=2048,
                             F_dense=18432, first_dense=3)),
    ],
)
def test_deepseek_counts_by_hand(name, dims):
    expected, active_routed = _deepseek_expected(**dims)
    total = parameter_breakdown(get_preset(name))
    assert total == {**expected, "total": sum(expected.values())}
    assert active_breakdown(get_preset(name), total)["routed_experts"] == active_routed


# (total, active) as the authors publish them, in billions, and which active count they state:
# "with embeddings" (every active parameter) or "N" (without the embedding lookup).
PUBLISHED = {
    "mixtral-8x7b": (46.7, 12.9, "with embeddings"),  # Mistral AI, "Mixtral of experts" (2023)
    "qwen1.5-moe-a2.7b": (14.3, 2.7, "with embeddings"),  # Qwen blog / model card "A2.7B"
    "deepseek-v2-lite": (15.7, 2.4, "N"),  # DeepSeek-V2 paper, appendix B
    "deepseek-v3": (671.0, 37.0, "N"),  # DeepSeek-V3 report: 671B (main model; 685B on HF adds MTP), 37B
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_total_and_active_match_published(name):
    total_b, active_b, convention = PUBLISHED[name]
    acc = accounting(get_preset(name))
    assert round(acc["total"] / B, 1) == total_b
    with_emb, n = acc["active"]["total"] / B, acc["active_matmul"] / B
    if convention == "with embeddings":  # and N would not round to it: the convention is pinned down
        assert round(with_emb, 1) == active_b != round(n, 1)
    elif name == "deepseek-v3":  # N 36.63B rounds to 37; with embeddings, 37.55B would round to 38
        assert round(n) == active_b != round(with_emb)
    else:  # V2-Lite: N 2.45B, written 2.4B (truncated); with embeddings, 2.66B cannot be written 2.4B
        assert math.floor(n * 10) / 10 == active_b and not 2.35 <= with_emb < 2.5


def test_seed_example_reproduces_the_text():
    """Seed text 000_9684611ef49afd55, "Parameter Breakdown: A DeepSeek-V2-Inspired MoE Model"."""
    config = get_preset("seed-moe-example")
    total, active = parameter_breakdown(config), active_breakdown(config)
    n_moe = sum(config.is_moe_layer(i) for i in range(config.n_layers))
    per_expert = total["routed_experts"] // (n_moe * config.moe.n_experts)
    assert n_moe == 30 and config.moe.top_k == 6
    assert round(total["embeddings"] / 1e7) * 1e7 == 410e6  # "410 Million"
    assert total["attention"] // 60 == 41_943_040 and round(total["attention"] / B, 1) == 2.5  # "≈ 42M", "2.5B"
    assert round(per_expert / 1e6) == 117  # "≈ 117 Million" per expert
    assert round(64 * per_expert / B, 1) == 7.5  # "7.5 Billion" per MoE layer
    assert round(total["routed_experts"] / B) == 225  # "225 Billion"
    assert active["routed_experts"] == n_moe * 6 * per_expert  # "only 6 are used for any given token"
    assert total["ffn"] == 30 * swiglu(4096, 9557)  # the dense FFNs the text leaves out: their own row
    assert "dense ffn" in format_breakdown(total)


def test_seed_example_two_matrix_experts_analytically():
    """The text's experts have two matrices (tformer's are SwiGLU): its exact figures, through the
    same active-count code, from a breakdown written with its formula 2 * d_model * ffn_dim."""
    config = get_preset("seed-moe-example")
    per_expert = 2 * 4096 * 14336
    assert per_expert == 117_440_512  # "2 * 4096 * (3.5 * 4096) = 117M"
    text = dict.fromkeys(COMPONENTS, 0)
    text.update(embeddings=100_000 * 4096, attention=60 * 41_943_040, routed_experts=30 * 64 * per_expert)
    text["total"] = sum(text.values())
    assert round(text["embeddings"] / B + text["attention"] / B, 1) == 2.9  # "~2.9 Billion" shared
    assert round(64 * per_expert / B, 1) == 7.5 and round(text["routed_experts"] / B, 1) == 225.5
    assert active_breakdown(config, text)["routed_experts"] == 30 * 6 * per_expert
    # our SwiGLU expert of width 9557 holds the same parameters to 0.004%
    assert abs(swiglu(4096, 9557) - per_expert) / per_expert < 4e-5


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-mla-moe"])
def test_active_routed_experts_are_what_one_token_touches(name):
    """Backward through one token: the routed-expert entries with a gradient are the active count."""
    from tformer.models.build import build_model

    config = get_preset(name)
    model = build_model(config).train()
    model(torch.tensor([[7]])).float().pow(2).mean().backward()
    touched = sum(
        int((p.grad != 0).sum()) for n, p in model.named_parameters() if ".ffn.experts." in n and p.grad is not None
    )
    assert touched == active_breakdown(config)["routed_experts"] > 0


def test_kv_cache_bytes():
    assert kv_cache_bytes_per_token(get_preset("llama-3-8b"), "bfloat16") == 32 * 8 * 128 * 2 * 2 == 131072
    assert kv_cache_bytes_per_token(get_preset("deepseek-v3"), "bfloat16") == 61 * (512 + 64) * 2 == 70272
    assert kv_cache_bytes_per_token(get_preset("mixtral-8x7b"), "float32") == 2 * 131072


@pytest.mark.parametrize("name", ["llama-3-8b", "mixtral-8x7b", "deepseek-v3", "tiny-mla-moe"])
def test_kv_cache_bytes_equal_the_caches_the_model_makes(name):
    from tformer.models.build import build_model

    model, slots = build_model(get_preset(name), device="meta"), 8
    caches = [layer.attn.make_cache(1, slots, torch.bfloat16, "meta") for layer in model.layers]
    made = sum(b.numel() * b.element_size() for c in caches for b in c.buffers())
    assert made == slots * kv_cache_bytes_per_token(get_preset(name), "bfloat16")


def test_flops_dense_equal_palm():
    config, T = get_preset("llama-3-8b"), 8192
    N = 8_030_261_248 - 128256 * 4096  # the embedding lookup is no matmul; the untied head is
    assert training_flops_per_token(config, T) == 6 * N + 12 * 32 * 32 * 128 * T  # PaLM: 6N + 12 L H Q T


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA A10G", 70e12),
                                        ("Tesla T4", None)])
def test_peak_flops_by_device_name(name, peak, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    assert peak_flops(torch.device("cuda")) == peak
    assert peak_flops(torch.device("cpu")) is None


def test_flops_moe_and_mla():
    mixtral = get_preset("mixtral-8x7b")
    assert training_flops_per_token(mixtral, 4096) == 6 * (12_879_925_248 - 32000 * 4096) + 12 * 32 * 32 * 128 * 4096
    v3 = get_preset("deepseek-v3")  # MLA: scores over 128 + 64 dims, values of 128
    assert attention_flops_per_token(v3, 4096) == 6 * 61 * 128 * 4096 * (192 + 128)
    assert training_flops_per_token(v3, 4096) == 6 * 36_625_603_584 + 6 * 61 * 128 * 4096 * 320


def test_active_matmul_params_keeps_a_tied_head():
    config = get_preset("tiny-qwen2")  # tied: the one matrix is the head's matmul, only the lookup is free
    assert active_matmul_params(config, active_breakdown(config)) == parameter_breakdown(config)["total"]


@pytest.mark.parametrize("dtype, weights, master", [("bfloat16", 2, 4), ("float16", 2, 4), ("float32", 4, 0)])
def test_training_memory_is_16_bytes_per_parameter(dtype, weights, master):
    m = training_memory(1000, dtype)
    assert m == {"weights": 1000 * weights, "gradients": 1000 * weights, "master_weights": 1000 * master,
                 "adamw_states": 8000, "total": 16000}


def test_cli_params_moe_table(capsys):
    assert main(["params", "mixtral-8x7b", "--seq-len", "4096"]) == 0
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert "46,702,792,704" in total and "12,879,925,248" in total
    assert "routed experts" in out and "shared experts" not in out  # all-zero MoE rows are left out
    assert "131,072 B" in out and "12,748,853,248" in out and "T=4,096" in out


def test_cli_params_json_has_active_flops_and_memory(capsys):
    assert main(["params", "deepseek-v3", "--json", "--dtype", "float32", "--seq-len", "4096"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total"] == 671_026_404_352 and out["active"]["total"] == 37_552_282_624
    assert out["kv_cache_bytes_per_token"] == 61 * 576 * 4 and out["training_memory_bytes"]["master_weights"] == 0


def test_cli_params_bad_seq_len_is_one_line_exit_2(capsys):
    assert main(["params", "gpt2", "--seq-len", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--seq-len" in err
