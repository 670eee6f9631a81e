"""Generation: cached = uncached, batched = single, sampling filters against their definitions."""

import pytest
import torch

from tests.conftest import tiny_config
from tformer.inference import SamplingConfig, generate
from tformer.inference.sampling import apply_repetition_penalty, argmax, filter_logits, sample
from tformer.models import build_model


def _greedy_uncached(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("positions", ["rope", "learned", "alibi"])
def test_cached_greedy_equals_uncached(positions):
    model = build_model(tiny_config(positions=positions)).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [3]]
    out = generate(model, prompts, max_new_tokens=8, sampling=SamplingConfig(temperature=0))
    for p, got in zip(prompts, out):
        assert got == _greedy_uncached(model, p, 8)


def test_stop_ids_end_a_row():
    model = build_model(tiny_config()).eval()
    first = generate(model, [[1, 2, 3]], 6, SamplingConfig(temperature=0))[0]
    out = generate(model, [[1, 2, 3]], 6, SamplingConfig(temperature=0), stop_ids={first[2]})[0]
    assert out == first[: first.index(first[2]) + 1]


def test_seeded_sampling_is_reproducible():
    model = build_model(tiny_config()).eval()
    cfg = SamplingConfig(temperature=1.0, top_k=20, top_p=0.9)
    a = generate(model, [[1, 2]], 10, cfg, seed=7)
    b = generate(model, [[1, 2]], 10, cfg, seed=7)
    assert a == b


def test_too_long_request_is_refused():
    model = build_model(tiny_config(max_seq_len=16)).eval()
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1] * 10], 10)


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = torch.isfinite(filter_logits(logits, SamplingConfig(top_k=2)))
    assert kept.tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(filter_logits(probs.log(), SamplingConfig(top_p=0.8)))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.8
    kept = torch.isfinite(filter_logits(probs.log(), SamplingConfig(top_p=0.81)))
    assert kept.tolist() == [[True, True, True, False]]


def test_min_p_relative_to_max():
    probs = torch.tensor([[0.6, 0.3, 0.07, 0.03]])
    kept = torch.isfinite(filter_logits(probs.log(), SamplingConfig(min_p=0.1)))
    assert kept.tolist() == [[True, True, True, False]]  # threshold 0.06


def test_repetition_penalty_ctrl_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[1.0, 3.0, 0.0]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_sampling_follows_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1])
    logits = probs.log().expand(20000, 3)
    g = torch.Generator().manual_seed(0)
    draws = sample(logits, SamplingConfig(temperature=1.0), generator=g)
    freq = torch.bincount(draws, minlength=3).float() / 20000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def test_top_k_keeps_every_logit_tied_with_the_kth_on_every_path():
    """Top-k keeps all logits equal to the k-th largest: filter_logits, sample with top-p or min-p as
    well, and sample with top-k alone all draw the three tied tokens below the best (k = 2)."""
    logits = torch.tensor([5.0, 1.0, 1.0, 1.0, -3.0]).expand(3000, 5)
    for cfg in (SamplingConfig(temperature=5.0, top_k=2), SamplingConfig(temperature=5.0, top_k=2, top_p=0.999),
                SamplingConfig(temperature=5.0, top_k=2, min_p=0.001)):
        assert torch.isfinite(filter_logits(logits[:1], cfg)).tolist() == [[True, True, True, True, False]]
        drawn = set(sample(logits, cfg, generator=torch.Generator().manual_seed(0)).tolist())
        assert drawn == {0, 1, 2, 3}, cfg


def test_top_k_sampling_draws_from_the_filtered_distribution():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.5, 0.7, 1.9, -0.5, 1.0]).expand(40000, 8)
    cfg = SamplingConfig(temperature=0.7, top_k=4, top_p=0.9, min_p=0.1)
    want = filter_logits(logits[:1], cfg).softmax(-1)[0]
    draws = sample(logits, cfg, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=8).float() / 40000
    assert (freq[want == 0] == 0).all()
    torch.testing.assert_close(freq, want, atol=0.01, rtol=0)


@pytest.mark.parametrize("V", [7, 1024, 3000, 5120])
def test_two_stage_argmax_equals_argmax(V):
    g = torch.Generator().manual_seed(V)
    x = torch.randint(-3, 4, (6, V), generator=g).float()  # many ties: the first index must win
    x[1] = float("-inf")
    x[2, V // 2] = float("inf")
    x[3, V - 1] = 100.0  # the best in the last, partly padded chunk
    assert torch.equal(argmax(x), x.argmax(-1))
    assert torch.equal(argmax(x.bfloat16()), x.bfloat16().argmax(-1))
    compiled = torch.compile(argmax, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(x), x.argmax(-1))


def test_repetition_penalty_in_generate_matches_manual_loop():
    model = build_model(tiny_config()).eval()
    cfg = SamplingConfig(temperature=0, repetition_penalty=1.8)
    prompt = [4, 4, 9, 2]
    seq = list(prompt)
    for _ in range(6):
        logits = model(torch.tensor([seq]))[0, -1:]
        counts = torch.bincount(torch.tensor(seq), minlength=97).float()[None]
        seq.append(int(apply_repetition_penalty(logits, counts, 1.8).argmax()))
    assert generate(model, [prompt], 6, cfg) == [seq[len(prompt):]]


def test_decode_step_compiles_without_graph_breaks():
    from tformer.inference import DecodeEngine

    model = build_model(tiny_config()).eval()
    # fullgraph: a graph break raises
    with DecodeEngine(model, max_batch_size=2, compile=True, compile_backend="eager", cuda_graphs=False) as engine:
        for cfg in (SamplingConfig(temperature=0), SamplingConfig(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05,
                                                                    repetition_penalty=1.2)):
            eager = generate(model, [[1, 2, 3], [7]], 6, cfg, seed=5)
            assert engine.generate([[1, 2, 3], [7]], 6, cfg, seed=5) == eager


def test_an_engine_refuses_more_prompts_than_it_was_made_for():
    from tformer.inference import DecodeEngine

    with DecodeEngine(build_model(tiny_config()), max_batch_size=2) as engine:
        with pytest.raises(ValueError, match="at most 2"):
            engine.generate([[1], [2], [3]], 2)
    with pytest.raises(ValueError, match="max_batch_size"):
        DecodeEngine(build_model(tiny_config()), max_batch_size=0)


def test_compiled_prefill_takes_batches_with_static_shapes_and_one_prompt_at_any_length():
    """One prompt: dynamic lengths (one compile serves them all). A batch: static shapes (inductor
    could not fuse batch x a symbolic length on the GPU). Both give the eager first tokens."""
    from tformer.inference.steps import compiled_prefill, prefill

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = build_model(tiny_config()).eval()
    first, greedy = compiled_prefill(), SamplingConfig(temperature=0)
    with torch.no_grad():
        for i, tokens in enumerate((torch.tensor([[1, 2, 3, 4]]), torch.tensor([[5, 6, 7]]),
                                    torch.tensor([[1, 2, 3], [4, 5, 6]]))):
            model.setup_caches(tokens.shape[0], 16)
            mask = torch.ones(tokens.shape[0], model.cache_slots, dtype=torch.long)
            pos = torch.arange(tokens.shape[1])
            want = prefill(model, tokens, pos, mask, greedy)
            assert torch.equal(first(model, tokens, pos, mask, greedy), want)
            model.clear_caches()
            assert counters["stats"]["unique_graphs"] == (1 if i < 2 else 2)  # lengths 4 and 3: one graph


def test_engines_compile_their_own_steps():
    """Each engine compiles its own copy of the step functions, so many engines in one process (one
    model each) stay inside dynamo's limit of recompiles per code object (8), which fullgraph turns
    into an error."""
    from tformer.inference import DecodeEngine

    greedy = SamplingConfig(temperature=0)
    for _ in range(torch._dynamo.config.recompile_limit + 2):
        model = build_model(tiny_config(n_layers=1)).eval()
        with DecodeEngine(model, compile=True, compile_backend="eager", cuda_graphs=False) as engine:
            assert engine.generate([[1, 2]], 2, greedy) == generate(model, [[1, 2]], 2, greedy)
