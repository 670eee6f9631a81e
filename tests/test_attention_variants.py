"""Attention variants (tformer.nn.variants): every mask and score rule equals a reference written out
with loops; FlexAttention (uncompiled, CPU) equals SDPA; cache decode equals the full forward;
each variant trains and generates."""

import math
import typing

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from tests.conftest import tiny_config
from tformer.config import ConfigError
from tformer.inference import SamplingConfig, generate
from tformer.inference.flex import use_flex_attention, use_sdpa
from tformer.inference.fused import fusable, with_decode_kernels, without_decode_kernels
from tformer.inference.workspace import Workspace
from tformer.models import build_model
from tformer.nn.attention import scaled_dot_product
from tformer.nn.position import alibi_slopes
from tformer.nn.variants import (PATTERNS, LayerRule, MaskInputs, SoftcapAttention, alibi_score_mod,
                                 bidirectional_mask_mod, dense_bias, dense_mask, mask_mod, softcap_score_mod,
                                 t5_score_mod)
from tformer.subconfigs import AttentionPattern
from tformer.train.loop import train

pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
              pytest.mark.filterwarnings("ignore:.*has no tokenizer.json")]

VARIANTS = {
    "causal": {},
    "window": {"sliding_window": 4},
    "per_layer_windows": {"n_layers": 3, "attention": {"windows": [3, 0]}},
    "prefix": {"attention": {"pattern": "prefix", "prefix": 5}},
    "strided": {"attention": {"pattern": "strided", "block": 3}},
    "fixed": {"attention": {"pattern": "fixed", "block": 4, "summary": 2}},
    "local_global": {"attention": {"pattern": "local_global", "windows": [3], "n_global": 2}},
    "alibi": {"positions": "alibi", "sliding_window": 6},
    "t5_bias": {"positions": "t5", "rel_buckets": 8, "rel_max_distance": 10},
    "softcap": {"attention": {"softcap": 0.5, "pattern": "prefix", "prefix": 4}},
}


def _model(name, **overrides):
    torch.manual_seed(0)
    return build_model(tiny_config(**{**VARIANTS[name], **overrides})).eval()


# ---------------------------------------------------------------- the rules, written out with loops

def _sees(rule: LayerRule, q: int, k: int) -> bool:
    """Whether position q sees position k, from the papers' definitions (one sequence, no padding)."""
    if k > q:
        return rule.pattern == "prefix" and q < rule.prefix and k < rule.prefix
    in_window = rule.window is None or q - k < rule.window
    if rule.pattern == "prefix":
        return in_window or (q < rule.prefix and k < rule.prefix)
    if rule.pattern == "strided":
        return in_window and (q - k < rule.block or (q - k) % rule.block == 0)
    if rule.pattern == "fixed":
        return in_window and (q // rule.block == k // rule.block or k % rule.block >= rule.block - rule.summary)
    if rule.pattern == "local_global":
        return in_window or k < rule.n_global or q < rule.n_global
    return in_window


RULES = [LayerRule(), LayerRule(window=3), LayerRule("prefix", prefix=4), LayerRule("prefix", window=2, prefix=5),
         LayerRule("strided", block=3), LayerRule("fixed", block=4, summary=1), LayerRule("fixed", block=3, summary=2),
         LayerRule("local_global", window=2, n_global=2)]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.pattern}-{r.window}")
def test_mask_equals_loops_with_packing_padding_and_cache(rule):
    T = 11
    want = torch.tensor([[_sees(rule, q, k) for k in range(T)] for q in range(T)])
    mask = dense_mask(rule, MaskInputs(torch.arange(T), T))
    assert mask is None if rule.plain else torch.equal(mask[0, 0], want)
    # packed: two sequences of 4 and 7 tokens, each under the rule from its own start
    segments = torch.tensor([[0] * 4 + [1] * 7])
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6]])
    packed = dense_mask(rule, MaskInputs(torch.arange(T), T, segments=segments, q_pos=pos, k_pos=pos))[0, 0]
    for q in range(T):
        for k in range(T):
            same = segments[0, q] == segments[0, k]
            assert packed[q, k] == (same and _sees(rule, int(pos[0, q]), int(pos[0, k])))
    # left padding of 3 in a cache of 14 slots, decoding slots 8..10: real tokens by their positions
    valid = torch.tensor([[0] * 3 + [1] * 11])
    k_pos = (valid.cumsum(-1) - 1).clamp(min=0)
    slots = torch.tensor([8, 9, 10])
    got = dense_mask(rule, MaskInputs(slots, 14, valid, q_pos=k_pos[:, slots], k_pos=k_pos, cached=True))[0, 0]
    for i, s in enumerate(slots.tolist()):
        for k in range(14):
            want_k = k >= 3 and _sees(rule, s - 3, k - 3) or k == s
            assert got[i, k] == want_k, (s, k)


def test_every_config_pattern_is_registered():
    assert set(PATTERNS) == set(typing.get_args(AttentionPattern))


def test_bidirectional_mask_mod_equals_loops():
    T, valid = 6, torch.tensor([[1, 1, 1, 1, 0, 0]])
    mod = bidirectional_mask_mod(valid, window=2)
    for q in range(T):
        for k in range(T):
            assert bool(mod(0, 0, torch.tensor(q), torch.tensor(k))) == ((k < 4 or q == k) and abs(q - k) <= 2)


def _naive_attention(q, k, v, allowed, bias=None, softcap=None):
    """softmax over the allowed keys of capped scores plus bias, one score at a time."""
    B, H, T, D = q.shape
    S, rep = k.shape[2], H // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                scores = []
                for j in range(S):
                    s = float(q[b, h, i] @ k[b, h // rep, j]) / math.sqrt(D)
                    s = softcap * math.tanh(s / softcap) if softcap else s
                    scores.append(s + (bias(h, i, j) if bias else 0.0) if allowed[i][j] else -math.inf)
                w = torch.tensor(scores).softmax(-1)
                out[b, h, i] = w @ v[b, h // rep]
    return out


def _t5_bucket(d: int, n_buckets: int, max_distance: int) -> int:
    """T5's causal bucket of key - query distance d (Raffel et al. 2020; HF's _relative_position_bucket)."""
    n = max(-d, 0)
    exact = n_buckets // 2
    if n < exact:
        return n
    return min(n_buckets - 1, exact + int(math.log(n / exact) / math.log(max_distance / exact) * (n_buckets - exact)))


@pytest.mark.parametrize("score", ["alibi", "t5", "softcap", "softcap_alibi"])
def test_score_mods_equal_their_formulas(score):
    torch.manual_seed(0)
    B, H, T, D = 1, 4, 7, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, 2, T, D), torch.randn(B, 2, T, D)
    inputs, rule = MaskInputs(torch.arange(T), T), LayerRule("strided", block=3)
    allowed = [[_sees(rule, i, j) for j in range(T)] for i in range(T)]
    slopes, weight = alibi_slopes(H), torch.randn(8, H)
    refs = {"alibi": lambda h, i, j: float(slopes[h]) * (j - i),
            "t5": lambda h, i, j: float(weight[_t5_bucket(j - i, 8, 10), h])}
    mods = {"alibi": alibi_score_mod(slopes, inputs), "t5": t5_score_mod(weight, 8, 10, inputs)}
    bias_name = {"softcap": None, "softcap_alibi": "alibi"}.get(score, score)
    bias, ref_bias = mods.get(bias_name), refs.get(bias_name)
    softcap = 0.7 if score.startswith("softcap") else None
    want = _naive_attention(q, k, v, allowed, ref_bias, softcap)
    if softcap is None:  # SDPA with the dense additive mask
        got = scaled_dot_product(q, k, v, dense_mask(rule, inputs, bias, H))
    else:  # the explicit-score path of SoftcapAttention
        attn = SoftcapAttention(tiny_config(attention={"softcap": softcap}))
        got = attn.core(q, k, v, dense_mask(rule, inputs, bias, H))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the same mods through FlexAttention
    model_mod = bias if softcap is None else softcap_score_mod(softcap, bias)
    block_mask = create_block_mask(mask_mod(rule, inputs), None, None, T, T, device="cpu")
    flex = flex_attention(q, k, v, score_mod=model_mod, block_mask=block_mask, enable_gqa=True)
    torch.testing.assert_close(flex, want, atol=1e-5, rtol=1e-5)
    if bias is not None:
        assert dense_bias(bias, inputs, H).shape == (1, H, T, T)


# ---------------------------------------------------------------- models

def _incremental(model, tokens, first: int, attention_mask=None):
    model.setup_caches(tokens.shape[0], tokens.shape[1] + 3)
    try:
        out = [model(tokens[:, :first], input_pos=torch.arange(first), attention_mask=attention_mask)]
        for t in range(first, tokens.shape[1]):
            out.append(model(tokens[:, t:t + 1], input_pos=torch.tensor([t]), attention_mask=attention_mask))
    finally:
        model.clear_caches()
    return torch.cat(out, 1)


@pytest.mark.parametrize("name", VARIANTS)
def test_flex_equals_sdpa_and_decode_equals_forward(name):
    model = _model(name)
    tokens = torch.randint(0, 97, (2, 10))
    segments = torch.tensor([[0] * 6 + [1] * 4, [2] * 10])
    with torch.no_grad():
        full, packed = model(tokens), model(tokens, segments=segments)
        torch.testing.assert_close(_incremental(model, tokens, 7), full, atol=2e-5, rtol=1e-4)
        flex = use_flex_attention(model, compile=False)
        try:
            torch.testing.assert_close(model(tokens), full, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(model(tokens, segments=segments), packed, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(_incremental(model, tokens, 7), full, atol=2e-5, rtol=1e-4)
        finally:
            use_sdpa(model)
    n_rules = len(set(model.rules))
    assert flex.builds == n_rules * (1 + 1 + 4)  # shared full-length masks, the packed batch, 4 cached forwards
    # a packed row gives each example the logits it has alone
    with torch.no_grad():
        torch.testing.assert_close(packed[0, 6:], model(tokens[:1, 6:])[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["fixed", "t5_bias", "softcap"])
def test_padded_decode_step_traces_fullgraph(name):
    """A host sync or data-dependent Python in the mask code would break the graph (fullgraph raises)."""
    model = _model(name)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10])
    model.setup_caches(2, 10)
    try:
        with torch.no_grad():
            model(torch.randint(0, 97, (2, 8)), input_pos=torch.arange(8), attention_mask=mask)
            step = torch.compile(model, backend="eager", fullgraph=True)
            token, pos = torch.randint(0, 97, (2, 1)), torch.tensor([8])
            torch.testing.assert_close(step(token, input_pos=pos, attention_mask=mask),
                                       model(token, input_pos=pos, attention_mask=mask))
    finally:
        model.clear_caches()


def test_left_padded_rows_equal_unpadded_rows():
    model = _model("fixed")
    tokens = torch.randint(1, 97, (1, 9))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), tokens], 1)
    mask = torch.tensor([[0] * 3 + [1] * 9])
    with torch.no_grad():
        torch.testing.assert_close(model(padded, attention_mask=mask)[:, 3:], model(tokens), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", VARIANTS)
def test_each_variant_trains(name):
    model = _model(name).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.randint(0, 97, (4, 17))
    losses = []
    for _ in range(6):
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.3


def _greedy_uncached(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("name", VARIANTS)
def test_engine_generates_the_uncached_greedy_tokens(name):
    model = _model(name)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [11, 12, 13, 14, 15, 16, 17, 18, 19]]  # each covers the prefix
    out = generate(model, prompts, max_new_tokens=4, sampling=SamplingConfig(temperature=0))
    with torch.no_grad():
        assert out == [_greedy_uncached(model, p, 4) for p in prompts]


def test_training_runs_select_variants_from_the_config(tmp_path):
    from tests.train.test_loop import TEXT, small_run, train_losses

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 40)
    attention = {"pattern": "local_global", "windows": [8, 0], "n_global": 2}
    t5 = {"positions": "t5", "rel_buckets": 8, "rel_max_distance": 16}
    result = train(small_run(corpus, tmp_path, dropout=0.0, max_steps=6, eval_every=6,
                             model={"attention": attention, **t5}), progress=False)
    losses = train_losses(tmp_path / "run")
    assert result.step == 6 and math.isfinite(result.val_loss) and losses[6] < losses[1]
    with pytest.raises(ValueError, match="trains on CUDA only"):
        train(small_run(corpus, tmp_path / "flex", dropout=0.0, max_steps=1,
                        model={"attention": {**attention, "backend": "flex"}}), progress=False)


@pytest.mark.parametrize("name", ["t5_bias", "softcap", "local_global"])
def test_paged_serving_gives_the_engine_tokens(name):
    import copy

    from tformer.serve.engine import GenerationRequest, ServeEngine

    model = _model(name)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [11, 12, 13, 14, 15, 16, 17], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]
    want = generate(model, prompts, max_new_tokens=5, sampling=SamplingConfig(temperature=0))
    prefix = name == "softcap"  # its prefix-LM pattern: no shared prefix blocks, the prefix in one chunk
    engine = ServeEngine(copy.deepcopy(model), block_size=4, max_running=4, prefill_chunk=4 if not prefix else 6,
                         prefix_caching=not prefix)
    engine.start()
    try:
        got = [[e.token_id for e in s] for s in [engine.submit(GenerationRequest(p, 5, temperature=0.0))
                                                 for p in prompts]]
    finally:
        engine.stop()
    assert got == want
    with pytest.raises(ValueError, match="prefix_caching=False and prefill_chunk >= 4"):
        ServeEngine(_model("softcap"), prefill_chunk=3, prefix_caching=False)


def test_attention_capture_of_a_softcapped_model_gives_its_logits():
    from tformer.viz.attention import capture_attention

    model, tokens = _model("softcap"), torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        want = model(tokens)
        with capture_attention(model) as maps:
            got = model(tokens)
    torch.testing.assert_close(got, want)
    assert len(maps) == 2 and maps[0][0, :, 6, 7].sum() == 0 and maps[0][0, :, 2, 3].min() > 0  # prefix 4


def test_a_saved_variant_loads_with_the_same_logits(tmp_path):
    import tformer

    model = _model("t5_bias", attention={"pattern": "fixed", "block": 4, "summary": 1, "softcap": 3.0})
    tformer.save(model, tmp_path / "ckpt")
    loaded = tformer.load(tmp_path / "ckpt").eval()
    tokens = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    assert type(loaded.layers[0].attn) is SoftcapAttention and loaded.rel_bias is not None


def test_softcap_layers_keep_their_class_under_the_decode_kernels():
    model = _model("softcap")
    assert type(model.layers[0].attn) is SoftcapAttention and not fusable(model.layers[0])
    with_decode_kernels(model, Workspace(torch.device("cpu"), 1, model.config.n_heads))
    try:
        assert all(type(layer.attn) is SoftcapAttention for layer in model.layers)
    finally:
        without_decode_kernels(model)



@pytest.mark.parametrize("fields, match", [
    ({"attention": {"pattern": "prefix"}}, "attention.prefix > 0"),
    ({"attention": {"pattern": "local_global", "n_global": 2}}, "needs a window"),
    ({"attention": {"pattern": "local_global", "windows": [4]}}, "attention.n_global > 0"),
    ({"attention": {"pattern": "fixed", "block": 4, "summary": 5}}, "attention.summary=5 must be <="),
    ({"attention": {"windows": [4, -1]}}, "attention.windows must be"),
    ({"attention": {"softcap": 0.0}}, "attention.softcap must be > 0"),
    ({"attention": {"softcap": 30.0}, "mla": {"kv_rank": 16}}, "softcap is not implemented with mla"),
    ({"architecture": "encoder", "attention": {"pattern": "strided"}}, "shape a decoder's attention"),
    ({"attention": {"pattern": "sparse"}}, "attention.pattern"),
    ({"attention": {"backend": "flex"}, "attn_dropout": 0.1}, "no attention dropout: set attn_dropout=0"),
])  # fmt: skip
def test_bad_variant_configs_name_the_field(fields, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(**fields)
