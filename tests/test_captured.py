"""CapturedDecode: the decode loop with its bookkeeping inside the step (one CUDA graph on a GPU)
gives generate's tokens; on CPU it runs the same `advance` step by step."""

import pytest
import torch

from tests.conftest import tiny_config
from tformer.generate import CapturedDecode, SamplingConfig, generate
from tformer.generate.captured import advance
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
    for name, step in (("plain", None), ("captured", CapturedDecode(advance))):
        seen = streams[name] = []
        out = generate(model, PROMPTS, 9, greedy, stop_ids=stop, sync_every=2, step_fn=step,
                       on_tokens=lambda t: seen.append(t.tolist()) and False)
        assert out == generate(model, PROMPTS, 9, greedy, stop_ids=stop)
    assert streams["captured"] == streams["plain"]
    assert generate(model, PROMPTS, 1, greedy, step_fn=CapturedDecode(advance)) == [r[:1] for r in free]


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
