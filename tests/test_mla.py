"""Multi-head latent attention: textbook formula, HF DeepseekV3Attention, cached (absorbed and naive)
decode = full forward, left padding, compiled decode step without graph breaks."""

import math

import pytest
import torch

from tests.test_model import _cached_logits, _padded
from tformer.config import MLAConfig, ModelConfig, RopeConfig, deepseek_yarn_scales
from tformer.models import build_model
from tformer.nn.mla import LatentAttention
from tformer.nn.rope import RotaryEmbedding, apply_rope, interleaved_to_half

H, N, R, V, KV_RANK = 4, 8, 4, 6, 8


def mla_config(q_rank=16, rope=None, softmax_scale=None) -> ModelConfig:
    mla = MLAConfig(q_rank=q_rank, kv_rank=KV_RANK, nope_dim=N, rope_dim=R, v_dim=V, softmax_scale=softmax_scale)
    return ModelConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=H, ffn_dim=64, activation="swiglu", norm="rmsnorm",
        norm_eps=1e-6, positions="rope", tie_embeddings=False, max_seq_len=64, rope=rope or RopeConfig(), mla=mla,
    )


def _rope(config: ModelConfig, T: int, B: int = 1):
    return RotaryEmbedding(config.rope, config.rope_dim)(torch.arange(T).expand(B, -1), torch.float32)


def textbook_mla(attn: LatentAttention, x, cos, sin, scale):
    """Per head h: q_h = [q_nope_h | rope(q_pe_h)], k_h = [k_nope_h | rope(k_pe)], softmax(q k^T scale + causal) v_h."""
    B, T, _ = x.shape
    q = attn.wq(x) if attn.wq is not None else attn.wq_b(attn.q_norm(attn.wq_a(x)))
    q = q.view(B, T, H, N + R)
    c_kv, k_pe = attn.wkv_a(x).split([KV_RANK, R], dim=-1)
    kv = attn.wkv_b(attn.kv_norm(c_kv)).view(B, T, H, N + V)
    k_pe = apply_rope(k_pe[:, :, None], cos, sin)[:, :, 0]  # (B, T, R), one for all heads
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    heads = []
    for h in range(H):
        q_h = torch.cat([q[:, :, h, :N], apply_rope(q[:, :, h:h + 1, N:], cos, sin)[:, :, 0]], dim=-1)
        k_h = torch.cat([kv[:, :, h, :N], k_pe], dim=-1)
        v_h = kv[:, :, h, N:]
        scores = (q_h @ k_h.transpose(1, 2) * scale).masked_fill(future, float("-inf"))
        heads.append(scores.softmax(-1) @ v_h)  # (B, T, V)
    return attn.wo(torch.cat(heads, dim=-1))


@pytest.mark.parametrize("q_rank,softmax_scale", [(16, None), (None, None), (16, 0.3)])
def test_matches_textbook_mla(q_rank, softmax_scale):
    config = mla_config(q_rank, softmax_scale=softmax_scale)
    attn = build_model(config).layers[0].attn
    assert isinstance(attn, LatentAttention)
    x = torch.randn(2, 7, 32)
    cos, sin = _rope(config, 7, 2)
    expected = textbook_mla(attn, x, cos, sin, softmax_scale or 1 / math.sqrt(N + R))
    torch.testing.assert_close(attn(x, (cos, sin)), expected, atol=1e-5, rtol=1e-5)


def test_parameter_names_and_init():
    m = build_model(mla_config(16))
    names = {k.removeprefix("layers.0.attn.") for k in m.state_dict() if k.startswith("layers.0.attn.")}
    assert names == {f"{n}.weight" for n in ("wq_a", "q_norm", "wq_b", "wkv_a", "kv_norm", "wkv_b", "wo")}
    attn = build_model(mla_config(None)).layers[0].attn
    assert {n for n, _ in attn.named_children()} == {"wq", "wkv_a", "kv_norm", "wkv_b", "wo", "resid_drop"}
    assert attn.wkv_b.weight.shape == (H * (N + V), KV_RANK) and attn.wo.weight.shape == (32, H * V)
    for norm in (m.layers[1].attn.q_norm, m.layers[1].attn.kv_norm):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert m.layers[0].attn.wo.weight.std() < 0.02 / math.sqrt(2 * 2) * 1.3  # residual init


HF_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8,
           "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32.0, "beta_slow": 1.0}


def _ours_for_hf(q_rank, yarn: bool) -> ModelConfig:
    """Our config for the HF one; with YaRN, DeepSeek's mscale pair becomes the cos/sin scale and
    `mscale_all_dim` squared multiplies the softmax scale (HF yarn_apply_mscale)."""
    if not yarn:
        return mla_config(q_rank)
    attention_factor, softmax_scale = deepseek_yarn_scales(HF_YARN["factor"], 1.0, 0.8, N + R)
    rope = RopeConfig(scaling="yarn", factor=HF_YARN["factor"], original_max_seq_len=8,
                      attention_factor=attention_factor)
    return mla_config(q_rank, rope=rope, softmax_scale=softmax_scale)


def _copy_from_hf(ours: LatentAttention, hf, interleaved: bool) -> None:
    """HF DeepseekV3Attention -> ours; interleaved RoPE rows are reordered to our rotate-half layout."""
    def q_rows(w):  # (H*(N+R), in): reorder each head's last R rows
        w = w.view(H, N + R, -1).clone()
        w[:, N:] = interleaved_to_half(w[:, N:], dim=1)
        return w.view(H * (N + R), -1)

    def kv_a_rows(w):  # (kv_rank + R, in): the k_pe rows are the last R
        return torch.cat([w[:KV_RANK], interleaved_to_half(w[KV_RANK:])])

    fix_q = q_rows if interleaved else (lambda w: w)
    fix_kv = kv_a_rows if interleaved else (lambda w: w)
    with torch.no_grad():
        if ours.wq is not None:
            ours.wq.weight.copy_(fix_q(hf.q_proj.weight))
        else:
            ours.wq_a.weight.copy_(hf.q_a_proj.weight)
            ours.q_norm.weight.copy_(hf.q_a_layernorm.weight)
            ours.wq_b.weight.copy_(fix_q(hf.q_b_proj.weight))
        ours.wkv_a.weight.copy_(fix_kv(hf.kv_a_proj_with_mqa.weight))
        ours.kv_norm.weight.copy_(hf.kv_a_layernorm.weight)
        ours.wkv_b.weight.copy_(hf.kv_b_proj.weight)
        ours.wo.weight.copy_(hf.o_proj.weight)


@pytest.mark.parametrize(
    "q_rank,interleaved,yarn", [(16, False, False), (None, False, False), (16, True, False), (16, True, True)]
)
def test_against_hf_deepseek_v3_attention(q_rank, interleaved, yarn):
    hf_v3 = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config

    hf_config = DeepseekV3Config(
        vocab_size=64, hidden_size=32, num_attention_heads=H, num_key_value_heads=H, num_hidden_layers=1,
        q_lora_rank=q_rank, kv_lora_rank=KV_RANK, qk_nope_head_dim=N, qk_rope_head_dim=R, v_head_dim=V,
        rope_interleave=interleaved, rms_norm_eps=1e-6, max_position_embeddings=32,
        rope_parameters=HF_YARN if yarn else {"rope_type": "default", "rope_theta": 10000.0},
    )
    hf_config._attn_implementation = "eager"
    hf = hf_v3.DeepseekV3Attention(hf_config, layer_idx=0).eval()
    for p in hf.parameters():  # norms start at ones: draw them too so the copy is checked
        torch.nn.init.normal_(p, std=0.3 if p.dim() == 1 else 0.1)
    config = _ours_for_hf(q_rank, yarn)
    ours = LatentAttention(config).eval()
    _copy_from_hf(ours, hf, interleaved)

    T = 12  # past YaRN's original context of 8
    x = torch.randn(2, T, 32)
    position_embeddings = hf_v3.DeepseekV3RotaryEmbedding(hf_config)(x, torch.arange(T)[None].expand(2, -1))
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None]
    expected, _ = hf(x, position_embeddings, causal)
    got = ours(x, _rope(config, T, 2))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _count_calls(module, name):
    calls = []
    original = getattr(module, name)
    setattr(module, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("q_rank", [16, None])
@pytest.mark.parametrize("absorb", [True, False])
def test_cached_decode_equals_full_forward(q_rank, absorb):
    m = build_model(mla_config(q_rank)).eval()
    rows = [torch.randint(1, 64, (n,)) for n in (10, 6)]
    tokens, mask = _padded(rows, 10)
    full = m(tokens, attention_mask=mask)
    m.setup_caches(batch_size=2, n_slots=10)
    cache = m.layers[0].attn.kv_cache
    assert cache.c_kv.shape == (2, 10, KV_RANK) and cache.k_pe.shape == (2, 10, R)
    for layer in m.layers:
        layer.attn.absorb = absorb
    calls = _count_calls(m.layers[0].attn, "_absorbed")
    cached = _cached_logits(m, tokens, mask, 5)
    real = mask.bool()
    torch.testing.assert_close(cached[real], full[real], atol=1e-5, rtol=1e-5)
    assert len(calls) == (6 if absorb else 0)
    m.clear_caches()


def test_absorbed_equals_naive_on_a_filled_cache():
    attn = build_model(mla_config(16)).layers[0].attn
    cache = attn.make_cache(2, 8, torch.float32)
    cache.kv.normal_()
    q_nope, q_pe = torch.randn(2, 3, H, N), torch.randn(2, 3, H, R)
    mask = torch.rand(2, 1, 3, 8) > 0.3
    mask[..., 0] = True
    naive = attn._naive(q_nope, q_pe, cache.kv, mask, 0.0)
    torch.testing.assert_close(attn._absorbed(q_nope, q_pe, cache.kv, mask, 0.0), naive, atol=1e-5, rtol=1e-5)


def test_left_padding_gives_unpadded_logits():
    m = build_model(mla_config(16)).eval()
    rows = [torch.randint(1, 64, (n,)) for n in (8, 5, 1)]
    tokens, mask = _padded(rows, 8)
    logits = m(tokens, attention_mask=mask)
    for i, row in enumerate(rows):
        torch.testing.assert_close(logits[i, 8 - len(row):], m(row[None])[0], atol=1e-5, rtol=1e-5)


def test_decode_step_compiles_without_graph_breaks():
    from tformer.inference import DecodeEngine, SamplingConfig, generate

    model = build_model(mla_config(16)).eval()
    greedy = SamplingConfig(temperature=0)
    eager = generate(model, [[1, 2, 3], [7]], 4, greedy)
    # fullgraph: a graph break raises
    with DecodeEngine(model, max_batch_size=2, compile=True, compile_backend="eager", cuda_graphs=False) as engine:
        assert engine.generate([[1, 2, 3], [7]], 4, greedy) == eager
