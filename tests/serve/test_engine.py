"""The continuous-batching engine: same tokens as `generate`, batch-invariant seeded sampling, paged
blocks reused by prefix and freed by cancellation and preemption."""

import copy
import threading

import pytest
import torch

from tformer.inference import SamplingConfig, generate
from tformer.models import build_model
from tformer.serve.engine import EngineFull, GenerationRequest, ServeEngine
from tformer.serve.sampling import filter_logits, uniform_noise
from tests.conftest import tiny_config

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_config(vocab_size=97, max_seq_len=96)).eval()


def engine_for(model, **kw):
    engine = ServeEngine(copy.deepcopy(model), **{"block_size": 4, "max_running": 32, **kw})
    engine.start()
    return engine


def prompts(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(97, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def tokens(stream):
    return [e.token_id for e in stream]


def test_32_concurrent_greedy_requests_equal_generate_alone(model):
    ps = prompts(32)
    want = [generate(model, [p], 12, SamplingConfig(temperature=0))[0] for p in ps]
    engine = engine_for(model, prefill_chunk=8)
    try:
        streams = [engine.submit(GenerationRequest(p, 12, **GREEDY)) for p in ps]
        got = [tokens(s) for s in streams]
    finally:
        engine.stop()
    assert got == want


def test_a_seeded_request_draws_the_same_tokens_alone_and_in_a_batch(model):
    request = dict(temperature=1.0, top_k=20, top_p=0.9, seed=1234)
    engine = engine_for(model)
    try:
        alone = tokens(engine.submit(GenerationRequest(prompts(1)[0], 16, **request)))
        others = [engine.submit(GenerationRequest(p, 16, temperature=1.0, seed=i))
                  for i, p in enumerate(prompts(32, 7))]
        crowded = tokens(engine.submit(GenerationRequest(prompts(1)[0], 16, **request)))
        [tokens(s) for s in others]
        other_seed = tokens(engine.submit(GenerationRequest(prompts(1)[0], 16, **{**request, "seed": 99})))
    finally:
        engine.stop()
    assert crowded == alone
    assert other_seed != alone  # the seed does decide
    engine = engine_for(model)
    try:  # seeds past 64 bits are taken whole
        big = [tokens(engine.submit(GenerationRequest(prompts(1)[0], 8, **{**request, "seed": s})))
               for s in (2**70, 2**70, 2**70 + 1)]
    finally:
        engine.stop()
    assert big[0] == big[1] != big[2]


def test_shared_prefixes_reuse_cached_blocks_and_give_the_same_tokens(model):
    prefix = prompts(1, 3)[0] * 3  # over 4 blocks of 4
    ps = [prefix + [5, 6], prefix + [7], prefix + [8, 9, 10]]
    want = [generate(model, [p], 8, SamplingConfig(temperature=0))[0] for p in ps]
    engine = engine_for(model)
    try:
        got = [tokens(engine.submit(GenerationRequest(p, 8, **GREEDY))) for p in ps]  # one after another
        stats = engine.stats()
    finally:
        engine.stop()
    assert got == want
    assert stats["prefix_hit_tokens"] >= 2 * (len(prefix) // 4) * 4
    assert stats["blocks_used"] == 0


def test_a_pool_too_small_for_all_preempts_and_recomputes(model):
    ps = prompts(6, 5)
    want = [generate(model, [p], 24, SamplingConfig(temperature=0))[0] for p in ps]
    engine = engine_for(model, n_blocks=24)  # 23 usable blocks of 4 for 6 requests of up to 43 tokens
    try:
        got = [tokens(s) for s in [engine.submit(GenerationRequest(p, 24, **GREEDY)) for p in ps]]
        assert engine.stats()["blocks_used"] == 0 and engine.stats()["preempted"] > 0
    finally:
        engine.stop()
    assert got == want


def test_cancel_frees_the_blocks_and_ends_the_stream(model):
    engine = engine_for(model)
    try:
        stream = engine.submit(GenerationRequest(prompts(1)[0], 60, **GREEDY))
        first = next(iter(stream))
        engine.cancel(stream)
        rest = list(stream)
        assert first.finish_reason is None and rest[-1].finish_reason == "abort"
        for _ in range(100):
            if engine.stats()["blocks_used"] == 0 and engine.stats()["running"] == 0:
                break
            threading.Event().wait(0.01)
        assert engine.stats()["blocks_used"] == 0
    finally:
        engine.stop()


def test_stop_ids_length_and_logprobs(model):
    p = prompts(1)[0]
    greedy = generate(model, [p], 10, SamplingConfig(temperature=0))[0]
    engine = engine_for(model)
    try:
        events = list(engine.submit(GenerationRequest(p, 10, stop_ids=frozenset({greedy[3]}), logprobs=3, **GREEDY)))
        length = list(engine.submit(GenerationRequest(p, 5, **GREEDY)))
    finally:
        engine.stop()
    stop_at = greedy.index(greedy[3])
    assert [e.token_id for e in events] == greedy[: stop_at + 1] and events[-1].finish_reason == "stop"
    assert [e.finish_reason for e in length] == [None] * 4 + ["length"]
    logp = model(torch.tensor([p]))[0, -1].log_softmax(-1)
    assert events[0].logprob == pytest.approx(logp.max().item(), abs=1e-4)
    assert [t for t, _ in events[0].top_logprobs] == logp.topk(3).indices.tolist()


def test_requests_that_cannot_run_are_refused(model):
    engine = ServeEngine(copy.deepcopy(model), block_size=4, max_waiting=2)  # not started: nothing drains
    with pytest.raises(ValueError, match="context"):
        engine.submit(GenerationRequest([1] * 90, 10))
    with pytest.raises(ValueError, match="empty"):
        engine.submit(GenerationRequest([], 10))
    engine.submit(GenerationRequest([1, 2], 4))
    engine.submit(GenerationRequest([1, 2], 4))
    with pytest.raises(EngineFull):
        engine.submit(GenerationRequest([1, 2], 4))


def test_noise_depends_only_on_seed_step_and_token():
    a = uniform_noise(torch.tensor([5, 6, 5]), torch.tensor([0, 0, 1]), 50)
    b = uniform_noise(torch.tensor([5]), torch.tensor([0]), 50)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert 0 < a.min() and a.max() < 1 and abs(a.mean().item() - 0.5) < 0.1


def test_filters_keep_ties_and_the_nucleus():
    logits = torch.tensor([[3.0, 2.0, 2.0, 0.0, -1.0]])
    one = torch.tensor([1.0])
    kept = filter_logits(logits, torch.tensor([2]), one, torch.tensor([0.0])).isfinite()
    assert kept.tolist() == [[True, True, True, False, False]]  # the tie at the 2nd place stays
    nucleus = filter_logits(logits, torch.tensor([0]), torch.tensor([0.5]), torch.tensor([0.0])).isfinite()
    assert nucleus.tolist() == [[True, False, False, False, False]]
