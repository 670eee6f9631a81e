"""Decoder wiring: GQA, norm placement, SDPA vs reference, padding, KV cache, meta build."""

import pytest
import torch

from tests.conftest import tiny_config
from tformer.models import build_model, count_parameters
from tformer.models.blocks import Block, PostNormBlock
from tformer.viz.attention import capture_attention

SCHEMES = ["rope", "learned", "sinusoidal", "alibi", "none"]


def test_gqa_equals_mha_with_repeated_kv():
    gqa = build_model(tiny_config(n_heads=6, n_kv_heads=2))
    mha = build_model(tiny_config(n_heads=6, n_kv_heads=6))
    sd = gqa.state_dict()
    D, H, Hkv = 8, 6, 2
    for i in range(2):
        w = sd[f"layers.{i}.attn.wqkv.weight"]
        q, k, v = w.split([H * D, Hkv * D, Hkv * D])
        rep = lambda t: t.view(Hkv, D, -1).repeat_interleave(H // Hkv, dim=0).reshape(H * D, -1)  # noqa: E731
        sd[f"layers.{i}.attn.wqkv.weight"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(sd)
    x = torch.randint(0, 97, (2, 11))
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


def test_mqa_runs():
    m = build_model(tiny_config(n_kv_heads=1))
    assert m(torch.randint(0, 97, (1, 5))).shape == (1, 5, 97)


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_norm_placement_wiring(placement):
    m = build_model(tiny_config(norm_placement=placement, norm="layernorm", activation="gelu"))
    block = m.layers[0]
    assert type(block) is (Block if placement == "pre" else PostNormBlock)
    x = torch.randn(2, 5, 48)
    a, f, n1, n2 = block.attn, block.ffn, block.attn_norm, block.ffn_norm
    if placement == "pre":
        h = x + a(n1(x))
        expected = h + f(n2(h))
    else:
        h = n1(x + a(x))
        expected = n2(h + f(h))
    torch.testing.assert_close(block(x), expected)
    assert isinstance(m.norm, torch.nn.Identity) == (placement == "post")


def _padded(batch, pad_to, pad_id=0):
    """Left-pad each row of `batch` (list of 1-D tensors) to `pad_to`; return tokens and mask."""
    tokens = torch.full((len(batch), pad_to), pad_id)
    mask = torch.zeros(len(batch), pad_to, dtype=torch.long)
    for i, row in enumerate(batch):
        tokens[i, pad_to - len(row):] = row
        mask[i, pad_to - len(row):] = 1
    return tokens, mask


def _cached_logits(m, tokens, mask, prefill_len):
    """Logits from the caches already set up on m: the first prefill_len tokens in one forward,
    then one token a step; mask (B, T) is the key-padding mask of the whole sequence."""
    B, T = tokens.shape
    cache_mask = torch.zeros(B, m.cache_slots, dtype=torch.long)
    cache_mask[:, :T] = mask
    prefill = m(tokens[:, :prefill_len], input_pos=torch.arange(prefill_len), attention_mask=cache_mask)
    steps = [m(tokens[:, t:t + 1], input_pos=torch.tensor([t]), attention_mask=cache_mask) for t in range(prefill_len, T)]
    return torch.cat([prefill, *steps], dim=1)


@pytest.mark.parametrize("positions", SCHEMES)
@pytest.mark.parametrize("window", [None, 4])
def test_left_padding_gives_unpadded_logits(positions, window):
    m = build_model(tiny_config(positions=positions, sliding_window=window)).eval()
    rows = [torch.randint(1, 97, (n,)) for n in (9, 5, 1)]
    tokens, mask = _padded(rows, 9)
    logits = m(tokens, attention_mask=mask)
    assert torch.isfinite(logits).all()
    for i, row in enumerate(rows):
        alone = m(row[None])[0]
        torch.testing.assert_close(logits[i, 9 - len(row):], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", SCHEMES)
@pytest.mark.parametrize("window", [None, 3])
def test_sdpa_equals_reference(positions, window):
    m = build_model(tiny_config(positions=positions, sliding_window=window)).eval()
    tokens, mask = _padded([torch.randint(1, 97, (n,)) for n in (8, 3)], 8)
    for kwargs in ({}, {"attention_mask": mask}):
        fused = m(tokens, **kwargs)
        with capture_attention(m) as maps:
            ref = m(tokens, **kwargs)
        torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
        assert len(maps) == 2 and maps[0].shape == (2, 6, 8, 8)
        torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 6, 8))
        assert maps[0].triu(1).abs().max() == 0  # causal


@pytest.mark.parametrize("positions", SCHEMES)
def test_cached_decode_equals_full_forward(positions):
    m = build_model(tiny_config(positions=positions, sliding_window=5)).eval()
    rows = [torch.randint(1, 97, (n,)) for n in (12, 7)]
    tokens, mask = _padded(rows, 12)
    full = m(tokens, attention_mask=mask)
    m.setup_caches(batch_size=2, n_slots=12)
    cached = _cached_logits(m, tokens, mask, 6)
    real = mask.bool()
    torch.testing.assert_close(cached[real], full[real], atol=1e-5, rtol=1e-5)
    m.clear_caches()


def test_cache_requires_input_pos():
    m = build_model(tiny_config())
    m.setup_caches(1, 8)
    with pytest.raises(ValueError, match="input_pos"):
        m(torch.randint(0, 97, (1, 3)))


def test_bad_attention_mask_shape():
    m = build_model(tiny_config())
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        m(torch.randint(0, 97, (2, 4)), attention_mask=torch.ones(2, 5))


def test_meta_build_allocates_nothing_and_counts():
    m = build_model(tiny_config(vocab_size=1000, tie_embeddings=True), device="meta")
    assert all(p.is_meta for p in m.parameters())
    per_layer = 48 * (48 + 2 * 16) + 48 * 48 + 3 * 48 * 96 + 2 * 48
    assert count_parameters(m) == 1000 * 48 + 2 * per_layer + 48


def test_bf16_cast_keeps_rope_in_fp32():
    m = build_model(tiny_config()).to(torch.bfloat16)
    assert m.rope.inv_freq.dtype == torch.float32
    assert m(torch.randint(0, 97, (1, 4))).dtype == torch.bfloat16


def test_tied_embeddings_share_storage():
    m = build_model(tiny_config(tie_embeddings=True))
    assert m.output.weight is m.tok_emb.weight


def test_dropout_only_in_training():
    m = build_model(tiny_config(emb_dropout=0.5, attn_dropout=0.5, resid_dropout=0.5))
    x = torch.randint(0, 97, (1, 6))
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    assert not torch.allclose(m(x), m(x))


def test_model_code_imports_no_kernels():
    """tformer.nn and tformer.models are plain PyTorch: importing them (and tformer) loads no Triton."""
    import subprocess
    import sys

    code = "import sys, tformer, tformer.models, tformer.nn; assert 'triton' not in sys.modules, 'triton imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_capture_attention_leaves_the_modules_as_they_were():
    from tformer.nn.attention import Attention

    m = build_model(tiny_config()).eval()
    tokens = torch.randint(1, 97, (1, 5))
    with capture_attention(m) as maps:
        m(tokens)
        m(tokens)
    assert len(maps) == 4  # two layers, two forwards
    assert all("core" not in vars(a) for a in m.modules() if isinstance(a, Attention))
