"""Attention weights of `tformer attention`: rows sum to one, masks hold, they equal the weights recomputed from
the model's own q and k, the model computes the same logits while they are captured; the PNGs' sizes."""

import math

import pytest
import torch

from tformer.config import MLAConfig
from tformer.models import build_model
from tformer.nn.rope import apply_rope
from tformer.viz.attention import capture_attention
from tformer.viz.maps import attention_weights, rollout, token_labels, write_pngs
from tests.conftest import tiny_config

KINDS = {
    "mha": dict(n_kv_heads=6),
    "gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
    "sliding": dict(n_kv_heads=2, sliding_window=3),
    "alibi": dict(positions="alibi"),
    "mla": dict(mla=MLAConfig(q_rank=16, kv_rank=8, nope_dim=8, rope_dim=4, v_dim=6)),
}


def _model(**overrides):
    torch.manual_seed(0)
    return build_model(tiny_config(**overrides)).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_rows_sum_to_one_and_stay_causal(kind):
    model = _model(**KINDS[kind])
    ids = torch.randint(97, (12,)).tolist()
    w = attention_weights(model, ids)
    assert w.shape == (2, 6, 12, 12)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 6, 12))
    assert (w.triu(1) == 0).all()
    with torch.no_grad(), capture_attention(model):  # the captured forward is the model's own
        captured = model(torch.tensor([ids]))
    torch.testing.assert_close(captured, model(torch.tensor([ids])).detach(), atol=1e-5, rtol=1e-5)


def test_sliding_window_keeps_the_last_keys_only():
    w = attention_weights(_model(**KINDS["sliding"]), list(range(10)))
    q, k = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
    assert (w[..., q - k >= 3] == 0).all()
    assert (w[..., (q - k < 3) & (k <= q)] > 0).all()


def test_padding_keys_get_no_weight():
    model = _model(**KINDS["gqa"])
    tokens = torch.randint(97, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # row 1 left-padded by 3
    with torch.no_grad(), capture_attention(model) as maps:
        model(tokens, attention_mask=mask)
    for w in maps:
        assert (w[1, :, 3:, :3] == 0).all()
    alone = attention_weights(model, tokens[1, 3:].tolist())  # the row without its padding
    torch.testing.assert_close(torch.stack([w[1, :, 3:, 3:] for w in maps]), alone, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gqa", "sliding"])
def test_weights_equal_softmax_of_the_models_own_q_k(kind):
    model = _model(**KINDS[kind])
    T, window = 11, KINDS[kind].get("sliding_window")
    ids = torch.randint(97, (T,)).tolist()
    inputs = []
    hooks = [layer.attn.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for layer in model.layers]
    w = attention_weights(model, ids)
    for h in hooks:
        h.remove()
    cos, sin = model.rope(torch.arange(T)[None], torch.float32)
    qk_pos, key = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    allowed = (key <= qk_pos) & ((qk_pos - key < window) if window else True)
    for i, (layer, x) in enumerate(zip(model.layers, inputs)):
        a = layer.attn
        q, k, _ = a.wqkv(x).split(a.split_sizes, dim=-1)
        q = apply_rope(q.view(1, T, a.n_heads, a.head_dim), cos, sin)[0].transpose(0, 1)  # (H, T, D)
        k = apply_rope(k.view(1, T, a.n_kv_heads, a.head_dim), cos, sin)[0].transpose(0, 1)
        k = k.repeat_interleave(a.n_heads // a.n_kv_heads, dim=0)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(a.head_dim)).masked_fill(~allowed, float("-inf"))
        torch.testing.assert_close(w[i], scores.softmax(-1).detach(), atol=1e-6, rtol=1e-5)


def test_rollout_rows_are_distributions():
    w = attention_weights(_model(), list(range(9)))
    r = rollout(w)
    assert r.shape == (2, 9, 9)
    torch.testing.assert_close(r.sum(-1), torch.ones(2, 9))
    assert (r.triu(1) == 0).all()
    a0 = 0.5 * w[0].mean(0) + 0.5 * torch.eye(9)
    torch.testing.assert_close(r[0], a0 / a0.sum(-1, keepdim=True))


def test_pngs_have_the_expected_sizes(tmp_path, viz_tokenizer):
    from PIL import Image

    ids = viz_tokenizer.encode("the cat sat on a mat and the dog ran")
    w = attention_weights(_model(vocab_size=320), ids)
    paths = write_pngs(w, token_labels(viz_tokenizer, ids), tmp_path, layer=1, head=2)
    assert [p.name for p in paths] == ["layer1_head2.png", "layer1_heads.png", "layer1_mean.png"]
    sizes = [Image.open(p).size for p in paths]
    assert sizes == [(600, 600), (4 * 250, 2 * 250), (600, 600)]  # 6 in at 100 dpi; 6 heads: 4 x 2 cells of 2.5 in


def test_cli_writes_the_pngs_and_the_page_and_refuses_bad_input(viz_ckpt, tmp_path, capsys):
    from tformer.cli import main

    assert main(["attention", str(viz_ckpt), "--text", "the cat sat", "--out", str(tmp_path), "--layer", "-1",
                 "--head", "5"]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"layer1_head5.png", "layer1_heads.png", "layer1_mean.png", "attention.html"}
    for bad, message in [(["--layer", "2"], "--layer 2 is out of range"), (["--head", "6"], "--head 6 is out of range"),
                         (["--text", "the " * 1200], "more than the model's max_seq_len")]:
        args = ["attention", str(viz_ckpt), "--text", "the cat", "--out", str(tmp_path / "bad"), *bad]
        assert main(args) == 2
        assert message in capsys.readouterr().err
