"""Attention maps of encoders (BERT, ModernBERT) and encoder-decoders (T5, the original Transformer): rows sum
to one, encoders attend both ways, ModernBERT's local layers stay in their window, decoder self-attention is
causal, cross maps are (target, source); every map equals the softmax recomputed from the model's own q and k
(with T5's scale of 1 and relative bias) and HF's `output_attentions` of the same weights; `tformer attention`
writes the PNGs and the page for tformer checkpoints of both; the page's cross-attention selector shows the
stored weights in chromium."""

import base64
import math

import pytest
import torch

import tformer
from tformer.cli import main
from tformer.models import build_model
from tformer.nn.rope import apply_rope
from tformer.presets.bert import bert_like, modernbert_like
from tformer.presets.t5 import t5_like, transformer_like
from tformer.tokenizer import Tokenizer
from tformer.viz.explorer import dequantize
from tformer.viz.maps import attention_weights, rollout, seq2seq_weights
from tests.viz.browser import Browser
from tests.viz.conftest import WORDS
from tests.viz.test_explorer import _hover, _select, _stored, needs_chromium

SMALL = dict(vocab_size=320, dim=32, n_layers=3, n_heads=4, ffn_dim=48, max_seq_len=64, emb_dropout=0.0,
             attn_dropout=0.0, resid_dropout=0.0)  # fmt: skip
ENCODERS = {
    "bert": lambda: bert_like(**SMALL),
    "modernbert": lambda: modernbert_like(**SMALL, sliding_window=2, global_every=3),  # layers: global, local, local
}
SEQ2SEQ = {
    "t5": lambda: t5_like(**SMALL, n_decoder_layers=2, rel_buckets=8, rel_max_distance=16),
    "transformer": lambda: transformer_like(**SMALL, n_decoder_layers=2),
}


def _model(config):
    torch.manual_seed(0)
    return build_model(config).eval()


def _inputs(module: torch.nn.Module, run) -> tuple[object, list[tuple]]:
    """run()'s result and the (args, kwargs) each call of `module`'s attention layers received, in call order."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
             for m in module]
    try:
        return run(), seen
    finally:
        for h in hooks:
            h.remove()


def _softmax(q, k, scale, mask):
    """q (T, H, D), k (S, Hkv, D), the layer's scale (None: 1/sqrt(D)) and mask -> (H, T, S) weights."""
    q, k = q.transpose(0, 1), k.transpose(0, 1)
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    scores = q @ k.transpose(-1, -2) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    mask = mask[0] if mask.dim() == 4 else mask
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(-1)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_maps_are_bidirectional_distributions(name):
    model = _model(ENCODERS[name]())
    w = attention_weights(model, torch.randint(320, (12,)).tolist())
    assert w.shape == (3, 4, 12, 12)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 4, 12))
    after = torch.ones(12, 12, dtype=torch.bool).triu(1)
    assert (w[0][:, after] > 0).all()  # a global layer: every query sees the keys after it
    r = rollout(w)
    torch.testing.assert_close(r.sum(-1), torch.ones(3, 12))
    assert (r[-1][after] > 0).all()


def test_modernbert_local_layers_stay_in_their_window():
    model = _model(ENCODERS["modernbert"]())
    assert model.local == (False, True, True)
    w = attention_weights(model, torch.randint(320, (10,)).tolist())
    q, k = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
    near = (q - k).abs() <= 2
    assert (w[1:][..., ~near] == 0).all() and (w[1:][..., near] > 0).all()
    assert (w[0] > 0).all()


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_weights_equal_softmax_of_the_models_own_q_k(name):
    model = _model(ENCODERS[name]())
    ids = torch.randint(320, (11,)).tolist()
    w, seen = _inputs([layer.attn for layer in model.layers], lambda: attention_weights(model, ids))
    for i, (layer, (args, _)) in enumerate(zip(model.layers, seen)):
        a, (x, rope, mask) = layer.attn, args[:3]
        q, k, _ = a.wqkv(x[0]).split(a.split_sizes, dim=-1)
        q, k = q.view(11, a.n_heads, a.head_dim), k.view(11, a.n_kv_heads, a.head_dim)
        if rope is not None:
            q, k = apply_rope(q[None], *rope)[0], apply_rope(k[None], *rope)[0]
        torch.testing.assert_close(w[i], _softmax(q, k, a.scale, mask).detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(SEQ2SEQ))
@torch.no_grad()
def test_seq2seq_maps_shapes_causality_and_the_models_own_q_k(name):
    model = _model(SEQ2SEQ[name]())
    source, target = torch.randint(320, (9,)).tolist(), torch.randint(320, (6,)).tolist()
    cross_layers = [layer.cross for layer in model.dec_layers]
    self_layers = [layer.attn for layer in model.dec_layers]
    (w, cross_in), self_in = _inputs(self_layers, lambda: _inputs(cross_layers, lambda: seq2seq_weights(
        model, source, target)))
    assert w["encoder"].shape == (3, 4, 9, 9) and w["decoder"].shape == (2, 4, 6, 6)
    assert w["cross"].shape == (2, 4, 6, 9)
    for maps in w.values():
        torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]))
    after = torch.ones(9, 9, dtype=torch.bool).triu(1)
    assert (w["decoder"].triu(1) == 0).all() and (w["encoder"][..., after] > 0).all() and (w["cross"] > 0).all()
    for i, (a, (args, _)) in enumerate(zip(cross_layers, cross_in)):
        x, memory, mask = args
        q = a.wq(x[0]).view(6, a.n_heads, a.head_dim)
        k = a.wkv(memory[0]).view(9, 2 * a.n_kv_heads, a.head_dim)[:, : a.n_kv_heads]
        torch.testing.assert_close(w["cross"][i], _softmax(q, k, a.scale, mask), atol=1e-6, rtol=1e-5)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    for i, (a, (args, _)) in enumerate(zip(self_layers, self_in)):
        x, mask = args[0], args[2]
        q, k, _ = a.wqkv(x[0]).split(a.split_sizes, dim=-1)
        q, k = q.view(6, a.n_heads, a.head_dim), k.view(6, a.n_kv_heads, a.head_dim)
        expected = _softmax(q, k, a.scale, causal if mask is None else mask)
        torch.testing.assert_close(w["decoder"][i], expected, atol=1e-6, rtol=1e-5)
    logits = model(torch.tensor([source]), torch.tensor([target]))
    assert torch.isfinite(logits).all() and not model.training


def _hf_models():
    """Tiny random HF models (eager attention returns its weights), by family."""
    import transformers as hf

    eager = dict(attn_implementation="eager")
    small = dict(vocab_size=320, num_attention_heads=4, intermediate_size=48)
    return {
        "bert": lambda: hf.BertModel(hf.BertConfig(**small, hidden_size=32, num_hidden_layers=2, **eager)),
        "modernbert": lambda: hf.ModernBertModel(hf.ModernBertConfig(
            **small, hidden_size=32, num_hidden_layers=3, local_attention=4, global_attn_every_n_layers=3,
            pad_token_id=0, eos_token_id=1, bos_token_id=2, cls_token_id=2, sep_token_id=3, **eager)),
        "t5": lambda: hf.T5ForConditionalGeneration(hf.T5Config(
            vocab_size=320, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0,
            **eager)),
        "marian": lambda: hf.MarianMTModel(hf.MarianConfig(
            vocab_size=320, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, pad_token_id=0,
            decoder_start_token_id=0, eos_token_id=1, max_position_embeddings=64, **eager)),
    }


@pytest.mark.parametrize("family", ["bert", "modernbert", "t5", "marian"])
@torch.no_grad()
def test_maps_equal_hf_output_attentions(family, tmp_path):
    torch.manual_seed(0)
    reference = _hf_models()[family]().eval()
    reference.save_pretrained(tmp_path)
    ours = tformer.load(tmp_path)  # the production converter (convert/hf.py)
    source, target = torch.randint(4, 320, (1, 9)), torch.tensor([[0, 17, 5, 99, 230]])
    if family in ("bert", "modernbert"):
        hf = {"encoder": reference(source, output_attentions=True).attentions}
        w = {"encoder": attention_weights(ours, source[0].tolist())}
    else:
        out = reference(input_ids=source, decoder_input_ids=target, output_attentions=True)
        hf = {"encoder": out.encoder_attentions, "decoder": out.decoder_attentions, "cross": out.cross_attentions}
        w = seq2seq_weights(ours, source[0].tolist(), target[0].tolist())
    for name, maps in hf.items():
        torch.testing.assert_close(w[name], torch.stack([m[0] for m in maps]), atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def tokenizer():
    """T5-like special tokens: <pad> (id 0, the decoder's start) and </s> (id 1, the end)."""
    return Tokenizer.train_bpe([" ".join(WORDS * 30)], vocab_size=320, special_tokens=("<pad>", "</s>"))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("encoders")
    paths = {}
    for name, config in (("bert", ENCODERS["bert"]), ("t5", SEQ2SEQ["t5"])):
        tformer.save(_model(config()), root / name, tokenizer=tokenizer)
        paths[name] = root / name
    return paths


def _map(data, key, T, S=None, causal=False) -> torch.Tensor:
    return dequantize(base64.b64decode(data["maps"][key]), T, S, causal)


def test_cli_encoder_pngs_and_page(ckpts, tokenizer, tmp_path, capsys):
    text = "the cat sat on a mat"
    assert main(["attention", str(ckpts["bert"]), "--text", text, "--out", str(tmp_path), "--layer", "-1"]) == 0
    assert "no logit lens" in capsys.readouterr().out
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"layer2_head0.png", "layer2_heads.png", "layer2_mean.png", "attention.html"}
    data = _stored(tmp_path / "attention.html")
    ids = tokenizer.encode(text)
    assert data["causal"] is False and "lens" not in data and "no logit lens" in data["note"]
    assert len(data["maps"]) == 3 * (4 + 2)
    w = attention_weights(tformer.load(ckpts["bert"]), ids)
    assert (_map(data, "2:1", len(ids)) - w[2, 1]).abs().max() <= 0.5 / 255 + 1e-6
    assert main(["attention", str(ckpts["bert"]), "--text", text, "--out", str(tmp_path), "--target", "x"]) == 2
    assert "--target is for encoder-decoder models" in capsys.readouterr().err


def test_cli_seq2seq_pngs_and_page(ckpts, tokenizer, tmp_path, capsys):
    source, target = "the cat sat on a mat", "the dog ran"
    args = ["attention", str(ckpts["t5"]), "--text", source, "--out", str(tmp_path), "--layer", "1", "--head", "3"]
    assert main([*args, "--target", target]) == 0
    assert "teacher-forced" in capsys.readouterr().out
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {f"{n}_layer1_{kind}.png" for n in ("encoder", "decoder", "cross")
                     for kind in ("head3", "heads", "mean")} | {"attention.html"}
    data = _stored(tmp_path / "attention.html")
    src, tgt = tokenizer.encode(source), [tokenizer.pad_id, *tokenizer.encode(target)]
    assert data["sequences"]["source"] == [s.replace(" ", "·") for s in map(tokenizer.decode, ([i] for i in src))]
    assert len(data["sequences"]["target"]) == len(tgt)
    w = seq2seq_weights(tformer.load(ckpts["t5"]), src, tgt)
    for key, stack, T, S, causal in [("cross/1:3", "cross", len(tgt), len(src), False),
                                      ("decoder/0:mean", "decoder", len(tgt), None, True),
                                      ("encoder/2:0", "encoder", len(src), None, False)]:
        layer, head = key.split("/")[1].split(":")
        expected = w[stack][int(layer)]
        expected = expected.mean(0) if head == "mean" else expected[int(head)]
        assert (_map(data, key, T, S, causal) - expected).abs().max() <= 0.5 / 255 + 1e-6, key
    assert "cross/rollout:0" not in data["maps"] and "decoder/rollout:1" in data["maps"]
    assert main([*args, "--max-new-tokens", "5"]) == 0  # no --target: the greedy output
    out = capsys.readouterr().out
    assert "greedy output" in out
    assert 2 <= len(_stored(tmp_path / "attention.html")["sequences"]["target"]) <= 6
    too_deep = "--layer 2 is out of range: the model has 2 decoder layers"
    for bad, message in [(["--layer", "2", "--target", target], too_deep),
                         (["--max-new-tokens", "0"], "--max-new-tokens must be > 0")]:
        assert main([*args, *bad]) == 2
        assert message in capsys.readouterr().err


@needs_chromium
def test_cross_selector_shows_the_stored_weights_in_chromium(ckpts, tmp_path):
    assert main(["attention", str(ckpts["t5"]), "--text", "the cat sat on a mat", "--target", "the dog ran",
                 "--out", str(tmp_path)]) == 0
    page = tmp_path / "attention.html"
    data = _stored(page)
    S, T = len(data["sequences"]["source"]), len(data["sequences"]["target"])
    browser = Browser(page.as_uri())
    try:
        browser.wait_for("document.body.dataset.ready === '1'")
        _select(browser, stack="cross", layer=1, head=2)
        assert browser.evaluate("document.getElementById('keys').hidden") is False
        assert browser.evaluate("document.querySelectorAll('#keys span').length") == S
        expected = (_map(data, "cross/1:2", T, S) * 255).round().int()
        for i in (0, T - 1):
            _hover(browser, i)  # a target token: the source tokens it attends to
            given = browser.evaluate("[...document.querySelectorAll('#keys span')].map(s => +s.dataset.given)")
            assert torch.equal(torch.tensor(given), expected[i])
        browser.evaluate("(() => { const s = document.querySelectorAll('#keys span')[2]; "
                         "s.dispatchEvent(new MouseEvent('mouseover', {bubbles: true})); })()")
        received = browser.evaluate("[...document.querySelectorAll('#tokens span')].map(s => +s.dataset.received)")
        assert torch.equal(torch.tensor(received), expected[:, 2])  # the target tokens attending to source token 2
        assert browser.evaluate("document.getElementById('view').options[1].disabled") is True
        _select(browser, stack="encoder", layer=0, head=1)  # bidirectional: a token gives weight to later tokens
        assert browser.evaluate("document.getElementById('keys').hidden") is True
        shown = torch.tensor(_hover(browser, 0))
        assert torch.equal(shown[:, 0], (_map(data, "encoder/0:1", S) * 255).round().int()[0])
        assert (shown[1:, 0] > 0).any()
    finally:
        browser.close()
