"""The engine's replayed steps (tformer.inference.graphs): the decode loop with its bookkeeping inside
the step (CUDA graphs on a GPU; on CPU the same `advance` step by step) gives the plain loop's tokens,
and prompts padded to the prefill bucket give the unpadded prompts' tokens."""

import pytest
import torch

from tests.conftest import tiny_config
from tformer.inference import DecodeEngine, SamplingConfig, generate
from tformer.models import build_model

PROMPTS = [[1, 2, 3], [7], [4, 4, 9, 2, 5]]
SETTINGS = [
    SamplingConfig(temperature=0),
    SamplingConfig(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
]


def _replaying(model, **options):
    """An engine that runs the replayed loop (step by step on CPU), prompts padded to 16 tokens."""
    return DecodeEngine(model, max_batch_size=3, cuda_graphs=True, prefill_bucket=16, **options)


@pytest.mark.parametrize("cfg", SETTINGS, ids=["greedy", "sampled"])
def test_replayed_loop_gives_the_plain_loops_tokens(cfg):
    model = build_model(tiny_config()).eval()
    with _replaying(model) as engine:
        for prompts in ([PROMPTS[0]], PROMPTS):
            want = generate(model, prompts, 7, cfg, seed=3)
            assert engine.generate(prompts, 7, cfg, seed=3) == want
        assert engine.generate(PROMPTS, 7, cfg, seed=3) == want  # the kept state, filled again
        assert len(engine._decode._states) == 2  # one per batch shape


def test_replayed_loop_stops_and_streams_like_the_plain_loop():
    model = build_model(tiny_config()).eval()
    greedy = SamplingConfig(temperature=0)
    free = generate(model, PROMPTS, 9, greedy)
    stop = {free[0][2], free[2][4]}
    for sync_every in (2, 4):  # checks between and inside 3-step replays
        engines = {"plain": DecodeEngine(model, max_batch_size=3, sync_every=sync_every),
                   "replayed": _replaying(model, sync_every=sync_every),
                   "3 a replay": _replaying(model, sync_every=sync_every, steps_per_replay=3)}
        streams = {}
        for name, engine in engines.items():
            seen = streams[name] = []
            out = engine.generate(PROMPTS, 9, greedy, stop_ids=stop, on_tokens=lambda t: seen.append(t.tolist()) and False)
            assert out == generate(model, PROMPTS, 9, greedy, stop_ids=stop)
        assert streams["replayed"] == streams["plain"] == streams["3 a replay"]
    for engine in engines.values():
        assert engine.generate(PROMPTS, 1, greedy) == [r[:1] for r in free]
        calls = []  # a callback that stops inside a replay of several steps: the tokens up to it
        assert engine.generate(PROMPTS, 9, greedy, on_tokens=lambda t: calls.append(t) or len(calls) == 5) == \
            [r[:5] for r in free]
        engine.close()


def test_compiled_steps_have_no_graph_breaks():
    """compile=True compiles prefill and `advance` with fullgraph (a graph break raises)."""
    model = build_model(tiny_config()).eval()
    with _replaying(model, compile=True, compile_backend="eager") as engine:
        for cfg in SETTINGS:
            assert engine.generate(PROMPTS, 5, cfg, seed=1, stop_ids={3}) == \
                generate(model, PROMPTS, 5, cfg, seed=1, stop_ids={3})


def test_a_moved_model_gets_a_new_capture():
    model = build_model(tiny_config()).eval()
    greedy = SamplingConfig(temperature=0)
    with _replaying(model) as engine:
        engine.generate([[1, 2]], 4, greedy)
        engine.generate([[1, 2]], 30, greedy)  # a longer cache: its tensors moved
        assert len(engine._decode._states) == 2
        engine.reset()
        assert not engine._decode._states
    with _replaying(model, max_captures=1) as few:
        few.generate([[1, 2]], 4, greedy)
        few.generate([[1, 2], [3]], 4, greedy)  # another batch shape replaces the first
        assert len(few._decode._states) == 1 and next(iter(few._decode._states.values())).token.shape[0] == 2


@pytest.mark.parametrize("cfg", SETTINGS, ids=["greedy", "sampled"])
def test_prompts_padded_to_the_bucket_give_the_same_tokens(cfg, monkeypatch):
    """The engine pads prompts to the prefill bucket (masked, as a batch's shorter rows are): the same
    tokens as unpadded prompts."""
    from tformer.inference import engine as engine_module

    model = build_model(tiny_config()).eval()
    seen, original = [], engine_module.prefill
    monkeypatch.setattr(engine_module, "prefill", lambda m, tokens, *a: seen.append(tokens.shape) or original(m, tokens, *a))
    for prompts in ([PROMPTS[0]], PROMPTS):
        want = generate(model, prompts, 6, cfg, seed=5)
        with _replaying(model) as engine:
            assert engine.generate(prompts, 6, cfg, seed=5) == want
    assert seen == [(1, 3), (1, 16), (3, 5), (3, 16)]


def test_padding_gives_way_to_max_seq_len():
    model = build_model(tiny_config(max_seq_len=24)).eval()
    greedy = SamplingConfig(temperature=0)
    with _replaying(model) as engine:
        assert engine.padded_length(3, 8) == 16 and engine.padded_length(3, 9) == 3  # 16 + 9 > 24 slots
        assert engine.generate([[1, 2, 3]], 8, greedy) == generate(model, [[1, 2, 3]], 8, greedy)
        assert engine.generate([[1, 2, 3]], 9, greedy) == generate(model, [[1, 2, 3]], 9, greedy)
    with DecodeEngine(model, cuda_graphs=True) as engine:
        assert [engine._prefill.padded_length(n) for n in (1, 64, 65)] == [64, 64, 128]
    with pytest.raises(ValueError, match="prefill_bucket"):
        DecodeEngine(model, prefill_bucket=0)
