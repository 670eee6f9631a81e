"""Mixture of experts: a per-token reference, HF Mixtral / Qwen2-MoE / DeepSeek-V3 parity, capacity,
aux and z losses, expert-bias balancing, a tiny MoE decoder (cache, compile, training)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tformer.config import ConfigError, ModelConfig, MoEConfig
from tformer.models import build_model
from tformer.nn.moe import MoE, load_stats

MIXTRAL = dict(n_experts=4, top_k=2)
DEEPSEEK = dict(n_experts=8, top_k=2, score_func="sigmoid", n_groups=4, topk_groups=2, expert_bias=True,
                n_shared_experts=1, routed_scale=2.5)
QWEN = dict(n_experts=4, top_k=2, shared_dim=24, shared_gate=True, norm_topk=False)


def moe_config(dim=32, **moe) -> ModelConfig:
    moe = {"expert_dim": 16, **moe}
    return ModelConfig(vocab_size=64, dim=dim, n_layers=2, n_heads=4, activation="swiglu", norm="rmsnorm",
                       positions="rope", moe=MoEConfig(**moe))


def make_moe(**moe) -> MoE:
    """An MoE with random weights large enough that routing varies from token to token."""
    layer = MoE(moe_config(**moe))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.normal_(0, 0.1)
    return layer


def expert(w1, w3, w2, x):
    return w2 @ (F.silu(w1 @ x) * (w3 @ x))


def reference_route(layer: MoE, m: MoEConfig, x_t: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """One token's (expert, weight) pairs, written from the papers' descriptions one token at a time."""
    r = layer.router
    logits = r.gate.weight @ x_t
    scores = logits.softmax(-1) if m.score_func == "softmax" else logits.sigmoid()
    choice = scores + (r.expert_bias if m.expert_bias else 0)
    per = m.n_experts // m.n_groups
    group_score = [choice[g * per:(g + 1) * per].sort(descending=True).values[:2].sum() for g in range(m.n_groups)]
    best = sorted(range(m.n_groups), key=lambda g: -group_score[g])[:m.topk_groups]
    allowed = [e for e in range(m.n_experts) if e // per in best]
    chosen = sorted(allowed, key=lambda e: -choice[e])[:m.top_k]
    weights = torch.stack([scores[e] for e in chosen])
    if m.norm_topk:
        weights = weights / weights.sum()
    return list(zip(chosen, weights * m.routed_scale))


def reference_moe(layer: MoE, m: MoEConfig, x: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """(N, C) -> (N, C): a loop over tokens and their experts; an expert past `capacity` (token order) adds 0."""
    ex, taken, out = layer.experts, [0] * layer.n_experts, []
    for x_t in x:
        y = torch.zeros_like(x_t)
        for e, w in reference_route(layer, m, x_t):
            taken[e] += 1
            if capacity is None or taken[e] <= capacity:
                y = y + w * expert(ex.w1[e], ex.w3[e], ex.w2[e], x_t)
        if layer.shared is not None:
            s = layer.shared
            shared = expert(s.w1.weight, s.w3.weight, s.w2.weight, x_t)
            y = y + (shared if layer.shared_gate is None else torch.sigmoid(layer.shared_gate.weight @ x_t) * shared)
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("moe", [MIXTRAL, DEEPSEEK, QWEN], ids=["mixtral", "deepseek", "qwen"])
def test_grouped_and_padded_paths_equal_per_token_reference(moe, monkeypatch):
    layer = make_moe(**moe).eval()
    x = torch.randn(2, 5, 32)
    want = reference_moe(layer, MoEConfig(**moe), x.view(-1, 32)).view(2, 5, 32)
    calls, grouped_mm = [], torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    assert len(calls) == 3  # w1, w3, w2: torch._grouped_mm runs on CPU in eager fp32
    layer.experts.use_grouped_mm = False
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    assert len(calls) == 3


def test_bf16_grouped_mm_equals_padded_and_compiles():
    layer = make_moe(**DEEPSEEK).eval().to(torch.bfloat16)
    x = torch.randn(2, 8, 32, dtype=torch.bfloat16)
    grouped = layer(x)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)(x)  # traces torch._grouped_mm in bf16
    layer.experts.use_grouped_mm = False
    padded = layer(x)
    assert grouped.dtype == torch.bfloat16
    torch.testing.assert_close(grouped, padded, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(compiled, grouped)


def _filled(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module.eval()


def _load_experts(layer: MoE, hf_experts, F_: int) -> None:
    gate_up = hf_experts.gate_up_proj.detach()  # (E, 2F, C): gate rows, then up rows
    layer.experts.w1.data.copy_(gate_up[:, :F_])
    layer.experts.w3.data.copy_(gate_up[:, F_:])
    layer.experts.w2.data.copy_(hf_experts.down_proj.detach())  # (E, C, F)


def _load_shared(layer: MoE, hf_mlp) -> None:
    for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        getattr(layer.shared, ours).weight.data.copy_(getattr(hf_mlp, theirs).weight.detach())


def test_routing_matches_hf_mixtral():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hf = _filled(MixtralSparseMoeBlock(MixtralConfig(hidden_size=32, intermediate_size=16, num_local_experts=4,
                                                     num_experts_per_tok=2)))
    layer = MoE(moe_config(**MIXTRAL)).eval()
    layer.router.gate.weight.data.copy_(hf.gate.weight.detach())
    _load_experts(layer, hf.experts, 16)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(layer(x), hf(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_topk", [False, True])
def test_routing_matches_hf_qwen2_moe(norm_topk):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    hf = _filled(Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(
        hidden_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=norm_topk)))
    layer = MoE(moe_config(**{**QWEN, "norm_topk": norm_topk})).eval()
    layer.router.gate.weight.data.copy_(hf.gate.weight.detach())
    _load_experts(layer, hf.experts, 16)
    _load_shared(layer, hf.shared_expert)
    layer.shared_gate.weight.data.copy_(hf.shared_expert_gate.weight.detach())
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(layer(x), hf(x), atol=1e-5, rtol=1e-5)


def test_routing_matches_hf_deepseek_v3():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hf = _filled(DeepseekV3MoE(DeepseekV3Config(
        hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
        topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True)))
    hf.gate.e_score_correction_bias.normal_(0, 0.1)  # selection differs from the unbiased top-k
    layer = MoE(moe_config(**DEEPSEEK)).eval()
    layer.router.gate.weight.data.copy_(hf.gate.weight.detach())
    layer.router.expert_bias.copy_(hf.gate.e_score_correction_bias)
    _load_experts(layer, hf.experts, 16)
    _load_shared(layer, hf.shared_experts)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(layer(x), hf(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grouped", [True, False])
def test_capacity_drops_overflow_in_token_order(grouped):
    layer = make_moe(**MIXTRAL, capacity_factor=0.5).eval()  # M = ceil(0.5 * 12 * 2 / 4) = 3 of 12 tokens
    layer.experts.use_grouped_mm = grouped
    x = torch.randn(1, 12, 32)
    assert layer.experts.capacity(12, 2) == 3
    m = MoEConfig(**MIXTRAL)
    want = reference_moe(layer, m, x[0], capacity=3)
    assert not torch.allclose(want, reference_moe(layer, m, x[0]))  # some assignments were dropped
    torch.testing.assert_close(layer(x)[0], want, atol=1e-5, rtol=1e-5)


def _hand_router() -> tuple[MoE, torch.Tensor]:
    """2 experts, top-1: tokens 1, 2 give probs (3/4, 1/4) -> expert 0; token 3 (1/4, 3/4) -> expert 1."""
    layer = MoE(ModelConfig(vocab_size=8, dim=4, n_layers=1, n_heads=1, activation="swiglu",
                            moe=MoEConfig(n_experts=2, top_k=1, expert_dim=4, aux_loss_coef=0.1, z_loss_coef=0.01)))
    _filled(layer).train()
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.tensor([[math.log(3), 0, 0, 0], [0, math.log(3), 0, 0]]))
    x = torch.tensor([[[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0]]])
    return layer, x


def test_aux_and_z_loss_values_on_a_hand_example():
    layer, x = _hand_router()
    layer(x)
    # f = (2/3, 1/3), P = (7/12, 5/12): aux = 2 (2/3 * 7/12 + 1/3 * 5/12) = 19/18; logsumexp = ln 4 for all
    torch.testing.assert_close(layer.aux_loss, torch.tensor(19 / 18))
    torch.testing.assert_close(layer.z_loss, torch.tensor(math.log(4) ** 2))
    assert load_stats([layer]) == pytest.approx(
        {"moe_load_max": 4 / 3, "moe_load_min": 2 / 3, "moe_aux_loss": 19 / 18, "moe_z_loss": math.log(4) ** 2})


@pytest.mark.parametrize("which", ["aux", "z"])
def test_router_losses_reach_the_gate_gradient_from_the_main_loss(which):
    layer, _ = _hand_router()
    layer.aux_coef, layer.z_coef = (0.1, 0.0) if which == "aux" else (0.0, 0.01)
    layer.aux_grad_scale = 0.5  # as with grad_accum = 2
    x, g = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    (layer(x) * g).sum().backward()
    with_loss = layer.router.gate.weight.grad.clone()
    layer.zero_grad()
    coef = layer.aux_coef + layer.z_coef
    layer.aux_coef = layer.z_coef = 0.0
    (layer(x) * g).sum().backward()
    # the loss alone, from its formula, through the gate
    logits = x.view(-1, 4) @ layer.router.gate.weight.T
    if which == "aux":
        probs = logits.softmax(-1)
        share = F.one_hot(probs.argmax(-1), 2).float().mean(0)
        loss = 2 * (share * probs.mean(0)).sum()
    else:
        loss = torch.logsumexp(logits, -1).square().mean()
    (grad,) = torch.autograd.grad(loss, layer.router.gate.weight)
    torch.testing.assert_close(with_loss, layer.router.gate.weight.grad + 0.5 * coef * grad)


def test_expert_bias_update_moves_toward_balance():
    layer = make_moe(**MIXTRAL, expert_bias=True, bias_update_rate=0.05).train()
    with torch.no_grad():
        layer.router.expert_bias.zero_()
        layer.router.gate.weight[0] += 0.5  # expert 0 overloaded
    x = torch.randn(1, 64, 32) + 0.5
    layer(x)
    load = layer.tokens_per_expert.clone()
    layer.update_expert_bias()
    torch.testing.assert_close(layer.router.expert_bias, 0.05 * torch.sign(load.mean() - load))
    assert layer.router.expert_bias[load.argmax()] < 0
    first = load.max() / load.mean()
    for _ in range(30):
        layer.pop_load()
        layer(x)
        layer.update_expert_bias()
    assert layer.tokens_per_expert.max() / layer.tokens_per_expert.mean() < first


def test_moe_needs_a_gated_activation():
    with pytest.raises(ConfigError, match="swiglu"):  # refused when the config is made
        moe_config().replace(activation="gelu")


def tiny_moe_model(**moe):
    config = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, activation="swiglu", norm="rmsnorm",
                         positions="rope", moe=MoEConfig(**{**MIXTRAL, "expert_dim": 16, "first_dense": 1, **moe}))
    return build_model(config)


def test_decoder_with_moe_trains_and_cached_decode_equals_full_forward():
    m = tiny_moe_model(n_shared_experts=1, aux_loss_coef=0.01)
    assert [type(layer.ffn).__name__ for layer in m.layers] == ["GatedFeedForward", "MoE"]
    tokens = torch.randint(0, 64, (2, 10))
    m(tokens).logsumexp(-1).mean().backward()
    assert m.layers[1].ffn.router.gate.weight.grad.abs().sum() > 0
    assert m.layers[1].ffn.experts.w2.grad.abs().sum() > 0
    m.eval()
    full = m(tokens)
    m.setup_caches(batch_size=2, n_slots=10)
    prefill = m(tokens[:, :4], input_pos=torch.arange(4))
    steps = [m(tokens[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat([prefill, *steps], 1), full, atol=1e-5, rtol=1e-5)
    m.clear_caches()


def test_checkpoint_round_trip_keeps_expert_bias_in_fp32(tmp_path):
    from tformer.checkpoint import load, save

    m = tiny_moe_model(expert_bias=True).eval()
    m.layers[1].ffn.router.expert_bias.normal_(0, 0.1)
    save(m, tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt", dtype=torch.bfloat16)
    bias = loaded.layers[1].ffn.router.expert_bias
    assert bias.dtype == torch.float32 and loaded.layers[1].ffn.tokens_per_expert.dtype == torch.float32
    torch.testing.assert_close(bias, m.layers[1].ffn.router.expert_bias, atol=0, rtol=0)
    tokens = torch.randint(0, 64, (2, 6))
    torch.testing.assert_close(load(tmp_path / "ckpt")(tokens), m(tokens))


def test_decoder_with_moe_compiles_fullgraph():
    m = tiny_moe_model(n_shared_experts=1, capacity_factor=2.0).eval()
    tokens = torch.randint(0, 64, (2, 8))
    compiled = torch.compile(m, backend="eager", fullgraph=True)  # fp32: the padded path; raises on a break
    torch.testing.assert_close(compiled(tokens), m(tokens), atol=1e-5, rtol=1e-5)


def test_training_logs_expert_load(tmp_path):
    from tformer.train.config import TrainConfig
    from tformer.train.loop import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 200)
    moe = {**MIXTRAL, "expert_dim": 32, "first_dense": 1, "expert_bias": True, "aux_loss_coef": 0.01}
    cfg = TrainConfig(
        preset="tiny-llama", model={"moe": moe}, data=[str(corpus)], tokenizer="char", batch_size=2, seq_len=16,
        max_steps=3, warmup=1, eval_every=100, eval_batches=1, log_every=1, out_dir=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"), tensorboard=False, sample_tokens=0, grad_accum=2,
    )
    train(cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert len(train_rows) == 3
    for r in train_rows:
        assert r["moe_load_max"] >= 1 >= r["moe_load_min"] >= 0
        assert r["moe_aux_loss"] > 0
