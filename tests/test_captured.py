"""CapturedDecode: the decode loop with its bookkeeping inside the step (one CUDA graph on a GPU)
gives generate's tokens; on CPU it runs the same `advance` step by step. CapturedPrefill: prompts
padded to its bucket give the unpadded prompts' tokens."""

import pytest
import torch

from tests.conftest import tiny_config
from tformer.generate import CapturedDecode, CapturedPrefill, SamplingConfig, generate
from tformer.generate.captured import advance
from tformer.generate.engine import prefill
from tformer.models import build_model

PROMPTS = [[1, 2, 3], [7], [4, 4, 9, 2, 5]]
SETTINGS = [
    SamplingConfig(temperature=0),
    SamplingConfig(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
]


@pytest.mark.parametrize("cfg", SETTINGS, ids=["greedy", "sampled"])
def test_captured_loop_gives_generates_tokens(cfg):
    model = build_model(tiny_config()).eval()
    captured = CapturedDecode(advance)
    for prompts in ([PROMPTS[0]], PROMPTS):
        want = generate(model, prompts, 7, cfg, seed=3)
        assert generate(model, prompts, 7, cfg, seed=3, step_fn=captured) == want
    assert generate(model, PROMPTS, 7, cfg, seed=3, step_fn=captured) == want  # the kept state, filled again
    assert len(captured._states) == 2  # one per batch shape


def test_captured_loop_stops_and_streams_like_generate():
    model = build_model(tiny_config()).eval()
    greedy = SamplingConfig(temperature=0)
    free = generate(model, PROMPTS, 9, greedy)
    stop = {free[0][2], free[2][4]}
    streams = {}
    steps = {"plain": None, "captured": CapturedDecode(advance),
             "3 a replay": CapturedDecode(advance, steps_per_replay=3)}
    for sync_every in (2, 4):  # checks between and inside 3-step replays
        for name, step in steps.items():
            seen = streams[name] = []
            out = generate(model, PROMPTS, 9, greedy, stop_ids=stop, sync_every=sync_every, step_fn=step,
                           on_tokens=lambda t: seen.append(t.tolist()) and False)
            assert out == generate(model, PROMPTS, 9, greedy, stop_ids=stop)
        assert streams["captured"] == streams["plain"] == streams["3 a replay"]
    for step in steps.values():
        assert generate(model, PROMPTS, 1, greedy, step_fn=step) == [r[:1] for r in free]
        calls = []  # a callback that stops inside a replay of several steps: the tokens up to it
        assert generate(model, PROMPTS, 9, greedy, step_fn=step,
                        on_tokens=lambda t: calls.append(t) or len(calls) == 5) == [r[:5] for r in free]


def test_advance_compiles_without_graph_breaks():
    model = build_model(tiny_config()).eval()
    step = CapturedDecode(torch.compile(advance, backend="eager", fullgraph=True))  # raises on a graph break
    for cfg in SETTINGS:
        assert generate(model, PROMPTS, 5, cfg, seed=1, stop_ids={3}, step_fn=step) == \
            generate(model, PROMPTS, 5, cfg, seed=1, stop_ids={3})


def test_a_moved_model_gets_a_new_capture():
    model = build_model(tiny_config()).eval()
    captured, greedy = CapturedDecode(advance), SamplingConfig(temperature=0)
    generate(model, [[1, 2]], 4, greedy, step_fn=captured)
    generate(model, [[1, 2]], 30, greedy, step_fn=captured)  # a longer cache: its tensors moved
    assert len(captured._states) == 2
    few = CapturedDecode(advance, max_captures=1)
    generate(model, [[1, 2]], 4, greedy, step_fn=few)
    generate(model, [[1, 2], [3]], 4, greedy, step_fn=few)  # another batch shape replaces the first
    assert len(few._states) == 1 and next(iter(few._states.values())).token.shape[0] == 2
    captured.reset()
    assert not captured._states


@pytest.mark.parametrize("cfg", SETTINGS, ids=["greedy", "sampled"])
def test_prompts_padded_to_the_bucket_give_the_same_tokens(cfg):
    """generate pads the prompts to CapturedPrefill.padded_length (masked, as a batch's shorter rows are):
    the same tokens, alone or with CapturedDecode, as unpadded prompts."""
    model = build_model(tiny_config()).eval()
    first = CapturedPrefill(prefill, bucket=16)
    seen = []
    spy = CapturedPrefill(lambda m, tokens, *a: seen.append(tokens.shape) or prefill(m, tokens, *a), bucket=16)
    for prompts in ([PROMPTS[0]], PROMPTS):
        want = generate(model, prompts, 6, cfg, seed=5)
        assert generate(model, prompts, 6, cfg, seed=5, prefill_fn=first) == want
        assert generate(model, prompts, 6, cfg, seed=5, prefill_fn=first, step_fn=CapturedDecode(advance)) == want
        assert generate(model, prompts, 6, cfg, seed=5, prefill_fn=spy) == want
    assert seen == [(1, 16), (3, 16)]


def test_padding_gives_way_to_max_seq_len():
    model = build_model(tiny_config(max_seq_len=24)).eval()
    seen = []
    spy = CapturedPrefill(lambda m, tokens, *a: seen.append(tokens.shape[1]) or prefill(m, tokens, *a), bucket=16)
    greedy = SamplingConfig(temperature=0)
    assert generate(model, [[1, 2, 3]], 8, greedy, prefill_fn=spy) == generate(model, [[1, 2, 3]], 8, greedy)
    assert generate(model, [[1, 2, 3]], 9, greedy, prefill_fn=spy) == generate(model, [[1, 2, 3]], 9, greedy)
    assert seen == [16, 3]  # 16 + 9 new tokens would pass 24 slots: no padding
    assert [CapturedPrefill(prefill, bucket=b).padded_length(n) for b, n in ((64, 1), (64, 64), (64, 65), (1, 7))] == \
        [64, 64, 128, 7]
    with pytest.raises(ValueError, match="bucket"):
        CapturedPrefill(prefill, bucket=0)
