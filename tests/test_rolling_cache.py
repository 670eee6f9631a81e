"""Rolling KV caches (nn.kv_cache.RollingKVCache): a sliding-window layer keeps only its window of keys,
and decoding through them gives the logits and tokens of full caches under the window mask."""

import copy

import pytest
import torch

from tests.conftest import tiny_config
from tformer.inference import DecodeEngine, EngineOptions, SamplingConfig, generate
from tformer.inference.speculative import speculative_generate
from tformer.models import build_model
from tformer.nn.kv_cache import KVCache, RollingKVCache
from tformer.nn.masks import causal_mask

W = 5  # the window: a query sees itself and the 4 keys before it
GREEDY = SamplingConfig(temperature=0)


def windowed(**overrides):
    torch.manual_seed(0)
    return build_model(tiny_config(sliding_window=W, max_seq_len=128, **overrides)).eval()


def reference_logits(model, tokens):
    """A cache-free forward with each layer's own window applied by hand (config.attention.window)."""
    B, T = tokens.shape
    pos = torch.arange(T)
    x = model.tok_emb(tokens)
    rope = model.rope(pos.expand(B, T), x.dtype)
    for i, layer in enumerate(model.layers):
        x = layer(x, rope, causal_mask(pos, T, window=model.config.attention.window(i, model.config.sliding_window)))
    return model.output(model.norm(x))


def cached_logits(model, tokens, caches, first: int, step: int):
    """Logits of tokens (B, T): a prompt of `first` tokens, then forwards of `step` tokens each."""
    model.attach_caches(caches)
    try:
        out, T = [model(tokens[:, :first], input_pos=torch.arange(first))], tokens.shape[1]
        for s in range(first, T, step):
            out.append(model(tokens[:, s:s + step], input_pos=torch.arange(s, min(s + step, T))))
    finally:
        model.clear_caches()
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("positions", ["rope", "alibi"])
@pytest.mark.parametrize("first,step,chunk", [(3, 1, 1), (12, 1, 1), (12, 3, 3), (12, 2, 1)])
def test_rolling_logits_equal_full_cache_with_the_window_mask(positions, first, step, chunk):
    """Prompts shorter and longer than the window; steps in place (step <= chunk) or through the ring
    and the new keys side by side (step > chunk); 3 windows past the prompt."""
    model = windowed(positions=positions)
    tokens = torch.randint(0, 97, (2, first + 3 * W))
    T = tokens.shape[1]
    full = cached_logits(model, tokens, model.make_caches(2, T), first, step)
    caches = model.make_caches(2, T, rolling=True, chunk=chunk)
    assert all(isinstance(c, RollingKVCache) and c.size == W + chunk - 1 for c in caches)
    rolled = cached_logits(model, tokens, caches, first, step)
    torch.testing.assert_close(rolled, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full, model(tokens), atol=1e-5, rtol=1e-5)


def test_greedy_generation_three_windows_long_equals_full_caches_and_memory_is_the_window():
    model = windowed()
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [11, 12], [3]]  # longer and shorter than W
    n = 3 * W + 4
    full = generate(model, prompts, n, GREEDY, options=EngineOptions(max_batch_size=3, rolling_cache=False))
    with DecodeEngine(model, max_batch_size=3) as engine:
        assert engine.generate(prompts, n, GREEDY) == full
        a = model.layers[0].attn
        for cache in engine._caches:
            assert isinstance(cache, RollingKVCache)
            assert cache.k.numel() == cache.v.numel() == 3 * a.n_kv_heads * W * a.head_dim
        short = engine.generate([p[:2] for p in prompts], 4, GREEDY)  # reused caches: the old ring forgotten
    assert short == generate(model, [p[:2] for p in prompts], 4, GREEDY,
                             options=EngineOptions(max_batch_size=3, rolling_cache=False))
    for p, row in zip(prompts, full):  # left-padded batch = each prompt alone
        assert generate(model, [p], n, GREEDY) == [row]


def test_the_graph_loop_over_rolling_caches_gives_full_cache_tokens():
    """`cuda_graphs=True` (step by step off CUDA): prompts padded to the prefill bucket, the loop's bookkeeping."""
    model = windowed()
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [11, 12], [3]]
    full = generate(model, prompts, 3 * W, GREEDY, options=EngineOptions(max_batch_size=3, rolling_cache=False))
    with DecodeEngine(model, max_batch_size=3, cuda_graphs=True, prefill_bucket=8) as engine:
        assert engine.generate(prompts, 3 * W, GREEDY) == full
        assert all(isinstance(c, RollingKVCache) for c in engine._caches)


def test_rolling_tokens_equal_the_cache_free_window_forward():
    model = windowed()
    seq = [1, 2, 3, 4, 5, 6, 7]
    out = generate(model, [seq], 3 * W, GREEDY)[0]
    for t in out:
        assert int(reference_logits(model, torch.tensor([seq]))[0, -1].argmax()) == t
        seq.append(t)


def test_per_layer_windows_mix_rolling_and_full_caches():
    model = windowed(n_layers=4, attention={"windows": [W, 0, 3, 0]})
    caches = model.make_caches(2, 40, rolling=True)
    assert [type(c) for c in caches] == [RollingKVCache, KVCache, RollingKVCache, KVCache]
    assert [c.k.shape[2] for c in caches] == [W, 40, 3, 40]
    tokens = torch.randint(0, 97, (2, 30))
    rolled = cached_logits(model, tokens, caches, 8, 1)
    torch.testing.assert_close(rolled, reference_logits(model, tokens), atol=1e-5, rtol=1e-5)


def test_left_padded_rows_through_rolling_caches_equal_each_row_alone():
    model = windowed()
    tokens = torch.randint(1, 97, (2, 20))
    key_mask = torch.ones(2, 20, dtype=torch.long)
    key_mask[1, :7] = 0  # row 1: 7 pads, then 13 tokens
    model.attach_caches(model.make_caches(2, 20, rolling=True))
    try:
        out = [model(tokens[:, :9], input_pos=torch.arange(9), attention_mask=key_mask)]
        out += [model(tokens[:, s:s + 1], input_pos=torch.tensor([s]), attention_mask=key_mask) for s in range(9, 20)]
    finally:
        model.clear_caches()
    out = torch.cat(out, dim=1)
    torch.testing.assert_close(out[0], model(tokens[:1])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 7:], model(tokens[1:, 7:])[0], atol=1e-5, rtol=1e-5)


def test_caches_fit_for_the_window_stay_full():
    model = windowed()
    assert all(type(c) is KVCache for c in model.make_caches(1, W, rolling=True))  # no smaller than n_slots
    assert all(type(c) is KVCache for c in model.make_caches(1, 64))  # rolling is asked for
    assert all(type(c) is KVCache for c in build_model(tiny_config()).make_caches(1, 64, rolling=True))


def test_rolling_cache_refuses_per_row_positions():
    model = windowed()
    model.attach_caches(model.make_caches(2, 32, rolling=True))
    try:
        with pytest.raises(ValueError, match="one input_pos"):
            model(torch.ones(2, 3, dtype=torch.long), input_pos=torch.arange(3).expand(2, 3))
    finally:
        model.clear_caches()


def test_speculative_decoding_over_rolling_caches_gives_the_targets_greedy_tokens():
    """Rejected drafts rewind up to k positions: the ring keeps window + k slots."""
    model = windowed()
    draft = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.002 * torch.randn_like(p))  # a draft that agrees about half the time
    prompt, n = [4, 8, 15, 16, 23, 42, 7, 9], 4 * W
    want = generate(model, [prompt], n, GREEDY, options=EngineOptions(max_batch_size=1, rolling_cache=False))[0]
    with DecodeEngine(model, max_batch_size=1) as target:
        got, stats = speculative_generate(target, draft, prompt, n, k=3, sampling=GREEDY)
        assert all(c.size == W + 3 for c in target._caches)
    assert got == want
    assert 0 < stats.accepted < stats.proposed  # rounds with rejections happened


def test_rolling_decode_step_compiles_without_graph_breaks():
    model = windowed()
    with DecodeEngine(model, max_batch_size=2, compile=True, compile_backend="eager", cuda_graphs=False) as engine:
        got = engine.generate([[1, 2, 3, 4, 5, 6, 7], [9]], 2 * W, GREEDY)
    assert got == generate(model, [[1, 2, 3, 4, 5, 6, 7], [9]], 2 * W, GREEDY,
                           options=EngineOptions(max_batch_size=2, rolling_cache=False))


def test_served_windowed_model_streams_past_its_pool_and_gives_full_cache_tokens():
    """Server (tformer.serve): blocks behind every layer's window go back to the pool, so requests of
    80 positions (20 blocks of 4) run in a pool of 4 usable blocks each, and give `generate`'s tokens."""
    from tformer.serve.engine import GenerationRequest, ServeEngine

    model = windowed()
    prompts = [list(range(1, 21)), [7, 3, 9]]
    want = generate(model, prompts, 60, GREEDY, options=EngineOptions(max_batch_size=2, rolling_cache=False))
    engine = ServeEngine(copy.deepcopy(model), block_size=4, n_blocks=5, prefill_chunk=8, max_running=2)
    assert engine.window == W and engine._peak_blocks(80) == 4
    engine.start()
    try:
        streams = [engine.submit(GenerationRequest(p, 60, temperature=0.0)) for p in prompts]
        got = [[e.token_id for e in s] for s in streams]
        assert engine.stats()["blocks_used"] == 0
    finally:
        engine.stop()
    assert got == want
    full = ServeEngine(build_model(tiny_config(max_seq_len=128)), block_size=4, n_blocks=5)  # no window: all kept
    assert full.window is None
    with pytest.raises(ValueError, match="more KV blocks"):
        full.submit(GenerationRequest(prompts[0], 60))


def test_flex_block_masks_keep_full_caches_and_a_ring_refuses_them():
    from tformer.inference.flex import use_flex_attention, use_sdpa

    model = windowed()
    rolled = model.make_caches(1, 32, rolling=True)
    use_flex_attention(model, compile=False)
    try:
        assert all(type(c) is KVCache for c in model.make_caches(1, 32, rolling=True))
        model.attach_caches(rolled)
        with pytest.raises(ValueError, match="dense masks"):
            model(torch.ones(1, 2, dtype=torch.long), input_pos=torch.arange(2))
    finally:
        model.clear_caches()
        use_sdpa(model)
    assert all(type(c) is RollingKVCache for c in model.make_caches(1, 32, rolling=True))
