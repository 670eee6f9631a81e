"""Whole models through tformer's decode kernels (`with_decode_kernels`): fused steps match the
unfused modules, a block is the expected five kernels, compiled steps keep them, speculative
decoding through them is exact. Interpreted on CPU in the child process that
tests/test_kernels.py starts; the CUDA tests run on a GPU.
"""

import pytest
import torch

from tests.test_kernels import INTERPRETED, interpreted


def _tiny(name: str = "tiny-llama", **overrides):
    from tformer.models import build_model
    from tformer.presets import get_preset

    torch.manual_seed(0)
    return build_model(get_preset(name).replace(**overrides)).eval()


def _prefill_and_step(model, device="cpu"):
    """Logits of a left-padded 5-token prompt, of two decode steps after it (the second reads the
    cache slot the first wrote) and of a 3-token step (as a speculative verify)."""
    model.setup_caches(1, 16)
    mask = torch.ones(1, model.cache_slots, dtype=torch.long, device=device)
    mask[:, :1] = 0
    out = []
    with torch.no_grad():
        out.append(model(torch.tensor([[0, 3, 5, 7, 11]], device=device), input_pos=torch.arange(5, device=device),
                         attention_mask=mask))
        for slots, tokens in (([5], [9]), ([6], [2]), ([7, 8, 9], [4, 1, 8])):
            out.append(model(torch.tensor([tokens], device=device), input_pos=torch.tensor(slots, device=device),
                             attention_mask=mask))
    model.clear_caches()
    return out


FUSED_CASES = [("tiny-llama", None), ("tiny-llama", "int8"), ("tiny-llama", "int4"), ("tiny-qwen2", None),
               ("tiny-mistral", None), ("tiny-gpt2", None), ("tiny-moe", None), ("tiny-mla-moe", None)]


@interpreted
@pytest.mark.parametrize("preset,quant", FUSED_CASES)
def test_fused_decode_matches_unfused(preset, quant):
    from tformer.kernels import MatvecLinear
    from tformer.models import with_decode_kernels, without_decode_kernels
    from tformer.models.fused import FusedBlock, FusedDecoder
    from tformer.quantize import quantize_model

    model = _tiny(preset, tie_embeddings=False, **({"ffn_dim": 192} if quant else {}))  # int4 groups of 32
    if quant:
        quantize_model(model, quant, group_size=32)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    want = _prefill_and_step(model)
    with_decode_kernels(model)
    fused = [type(b) is FusedBlock for b in model.layers]
    assert all(fused) if preset != "tiny-mla-moe" else not any(fused)  # latent attention keeps its own path
    assert quant or type(model.output) is MatvecLinear
    assert type(model) is FusedDecoder
    got = _prefill_and_step(model)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    without_decode_kernels(model)
    assert not any(isinstance(m, (FusedBlock, FusedDecoder, MatvecLinear)) for m in model.modules())


@interpreted
def test_fused_block_takes_the_fused_kernels():
    """The Llama block's one-row step is four matvec calls (norms, residuals and SwiGLU inside) plus
    one attention kernel that also applies RoPE and writes the cache."""
    from tformer.kernels import fused_attention as attention, gemv
    from tformer.models import with_decode_kernels

    model = with_decode_kernels(_tiny("tiny-llama", tie_embeddings=False))
    calls = []
    original = gemv.matvec_op

    def spy(*args):
        given = dict(zip(["up", "norm", "bias", "residual"], (args[i] is not None for i in (6, 9, 11, 12))),
                     whole_rows=len(args) > 13 and args[13])
        calls.append(sorted(k for k, v in given.items() if v))
        return original(*args)

    block = model.layers[0]
    x = torch.randn(1, 1, 64)
    attention_op = attention.cached_attention_op
    gemv.matvec_op = spy
    attention.cached_attention_op = lambda *args: calls.append("attention") or attention_op(*args)
    try:
        with torch.no_grad():
            model.setup_caches(1, 8)
            cos_sin = model.rope(torch.zeros(1, 1, dtype=torch.long), x.dtype)
            mask = torch.ones(1, 1, 1, model.cache_slots, dtype=torch.bool)
            block(x, cos_sin, mask, torch.tensor([0]))
            x3 = torch.randn(1, 3, 64)  # three new tokens (a speculative verify): the same kernels
            cos_sin = model.rope(torch.arange(1, 4)[None], x.dtype)
            block(x3, cos_sin, torch.ones(1, 1, 3, model.cache_slots, dtype=torch.bool), torch.arange(1, 4))
        k_written = block.attn.kv_cache.k[0, :, :4].clone()
    finally:
        gemv.matvec_op, attention.cached_attention_op = original, attention_op
        model.clear_caches()
    # wqkv, wo (its weights read while attention runs), w1 + w3, w2
    assert calls == [["norm"], "attention", ["residual", "whole_rows"], ["norm", "up"], ["residual"]] * 2
    assert (k_written.abs().sum(-1) > 0).all()  # the new tokens' keys went into slots 0..3


@interpreted
def test_final_norm_runs_inside_the_head_kernel():
    """A fused model's one-token forward ends in one matvec with the norm in it: the head's."""
    from tformer.kernels import gemv
    from tformer.models import with_decode_kernels

    model = with_decode_kernels(_tiny("tiny-llama", tie_embeddings=False))
    heads, original = [], gemv.matvec_op
    gemv.matvec_op = lambda *args: heads.append(args[9] is not None and args[1].shape[0]) or original(*args)
    try:
        model.setup_caches(1, 8)
        with torch.no_grad():
            model(torch.tensor([[3]]), input_pos=torch.tensor([0]))
    finally:
        gemv.matvec_op = original
        model.clear_caches()
    assert heads[-1] == model.config.vocab_size  # the last product: the head, with the final norm's weight


@interpreted
def test_compiled_model_keeps_the_kernel_in_one_graph():
    from tformer.generate.engine import decode_step
    from tformer.generate.sampling import SamplingConfig
    from tformer.models import with_decode_kernels
    from tformer.quantize import quantize_model

    model = with_decode_kernels(quantize_model(_tiny(tie_embeddings=False, ffn_dim=192), "int4", group_size=32, skip=()))
    assert model.output.__class__.__name__ == "Int8Linear"  # the untied head: int8, the rest int4
    greedy = SamplingConfig(temperature=0)
    step = torch.compile(decode_step, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        model.setup_caches(1, 16)
        prompt = torch.tensor([[3, 5, 7]])
        mask = torch.ones(1, model.cache_slots, dtype=torch.long)
        model(prompt, input_pos=torch.arange(3), attention_mask=mask)
        tok, pos = torch.tensor([[9]]), torch.tensor([3])
        eager = decode_step(model, tok, pos, mask, greedy)
        compiled = step(model, tok, pos, mask, greedy)
    assert torch.equal(eager, compiled)


@interpreted
def test_compiled_step_builds_rope_and_mask_once_for_all_layers():
    """Inductor hands every layer's cached_attention the same cos, sin and mask buffers (no copy a layer:
    on a GPU each copy was one more kernel in the step)."""
    import re

    from torch._inductor.utils import run_and_get_code

    from tformer.generate.engine import decode_step
    from tformer.generate.sampling import SamplingConfig
    from tformer.models import with_decode_kernels

    model = with_decode_kernels(_tiny(n_layers=3))
    step = torch.compile(decode_step, fullgraph=True, options={"triton.cudagraphs": False})
    with torch.no_grad():
        model.setup_caches(1, 16)
        mask = torch.ones(1, model.cache_slots, dtype=torch.long)
        _, code = run_and_get_code(step, model, torch.tensor([[3]]), torch.tensor([0]), mask, SamplingConfig(temperature=0))
        model.clear_caches()
    calls = re.findall(r"tformer\.cached_attention\.default\((.*)\)", "\n".join(code))
    shared = {tuple(a.strip() for i, a in enumerate(c.rsplit(", ", 8)[1:]) if i in (0, 1, 5)) for c in calls}
    assert len(calls) == 3 and len(shared) == 1, calls  # (cos, sin, mask) the same for every layer


@interpreted
def test_compiled_loop_step_draws_no_seeds_and_records_in_one_kernel():
    """CapturedDecode's compiled `advance` with top-k sampling: no seed kernels (the sampler mixes the slot
    into the seeds `generate` drew), the loop's bookkeeping is the one record_step call, and the tokens
    are the eager step's."""
    from torch._inductor.utils import run_and_get_code

    from tformer.generate import CapturedDecode, SamplingConfig, generate
    from tformer.generate.captured import advance
    from tformer.models import with_decode_kernels

    model = with_decode_kernels(_tiny(n_layers=2))
    topk = SamplingConfig(temperature=0.9, top_k=5)
    compiled = CapturedDecode(torch.compile(advance, fullgraph=True, options={"triton.cudagraphs": False}))
    want = generate(model, [[3, 5, 7]], 6, topk, seed=2, step_fn=CapturedDecode(advance))
    got, code = run_and_get_code(generate, model, [[3, 5, 7]], 6, topk, seed=2, step_fn=compiled)
    code = "\n".join(code)
    assert got == want
    assert "tformer.record_step.default(" in code and "tformer.topk_sample.default(" in code
    assert "randint" not in code and "index_copy" not in code, code


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU")
def test_fused_decode_on_cuda_matches_unfused_in_bf16():
    pytest.importorskip("triton")
    from tformer.generate.engine import compiled_decode_step, decode_step
    from tformer.generate.sampling import SamplingConfig
    from tformer.models import with_decode_kernels

    model = _tiny(tie_embeddings=False).to("cuda", torch.bfloat16)
    want = _prefill_and_step(model, "cuda")
    with_decode_kernels(model)
    got = _prefill_and_step(model, "cuda")
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=0, atol=0.03 * w.float().abs().max().item())
    greedy, tok, pos = SamplingConfig(temperature=0), torch.tensor([[9]], device="cuda"), torch.tensor([5], device="cuda")
    tokens = []
    for step in (decode_step, compiled_decode_step()):  # the fused step, eager and CUDA-graphed
        model.setup_caches(1, 16)
        mask = torch.ones(1, model.cache_slots, dtype=torch.long, device="cuda")
        with torch.no_grad():
            model(torch.tensor([[0, 3, 5, 7, 11]], device="cuda"), input_pos=torch.arange(5, device="cuda"),
                  attention_mask=mask)
            tokens.append(step(model, tok, pos, mask, greedy))
        model.clear_caches()
    assert torch.equal(tokens[0], tokens[1])


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU")
def test_programmatic_dependent_launch_changes_no_token_on_cuda():
    """The same greedy tokens with and without PDL, eager and CUDA-graphed, one row and a few (batch 3)."""
    pytest.importorskip("triton")
    from tformer.generate import SamplingConfig, generate
    from tformer.generate.engine import compiled_decode_step
    from tformer.kernels import base
    from tformer.models import with_decode_kernels

    model = with_decode_kernels(_tiny(tie_embeddings=False).to("cuda", torch.bfloat16))
    greedy, prompts = SamplingConfig(temperature=0), [[3, 5, 7, 11], [2, 9], [4, 4, 8]]
    runs, before = {}, base._PDL["enabled"]
    try:
        for pdl in (False, True):
            base.set_pdl(pdl)
            torch._dynamo.reset()  # capture the graphs again under this setting
            for graphed in (False, True):
                step = compiled_decode_step() if graphed else None
                runs[pdl, graphed] = [generate(model, p, 12, greedy, step_fn=step) for p in ([prompts[0]], prompts)]
    finally:
        base.set_pdl(before)
        torch._dynamo.reset()
    assert runs[True, False] == runs[False, False]
    assert runs[True, True] == runs[False, True]


@interpreted
def test_speculative_greedy_through_the_kernels_equals_target_greedy():
    """Drafts of one row, verifies of k + 1 rows (the few-row kernels), eager and compiled rounds:
    in fp32 the tokens are the target's own greedy tokens."""
    from tformer.generate import SamplingConfig, generate
    from tformer.generate.speculative import SpecSteps, spec_round, speculative_generate
    from tformer.models import with_decode_kernels

    small = dict(tie_embeddings=False, vocab_size=64, n_layers=1, ffn_dim=64)  # few interpreted programs
    target, near = _tiny(**small), _tiny(**small)
    with torch.no_grad():
        for p in near.parameters():
            p.add_(torch.randn_like(p) * 0.002)  # agrees with the target most of the time
    greedy, prompt = SamplingConfig(temperature=0), [5, 17, 42, 3]
    want = generate(target, [prompt], 8, greedy)[0]
    with_decode_kernels(target), with_decode_kernels(near)
    compiled = SpecSteps(round=torch.compile(spec_round, backend="aot_eager", fullgraph=True, dynamic=False))
    for steps in (None, compiled):
        out, stats = speculative_generate(target, near, prompt, 8, k=3, sampling=greedy, steps=steps)
        assert out == want
        assert 0 < stats.accepted < stats.proposed


def test_fused_caches_reserve_the_split_counters():
    """The counters come with the caches (eagerly), not from the first kernel call, which may run
    inside a CUDA-graph tree's warm-up and leave them in its memory pool."""
    from tformer.kernels import base
    from tformer.models import with_decode_kernels

    model = with_decode_kernels(_tiny())
    base._COUNTS.clear()
    model.setup_caches(3, 16)
    counts = base._COUNTS[(torch.device("cpu"), "merge")]
    assert counts.numel() >= 3 * model.layers[0].attn.n_heads and not counts.any()


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU")
def test_graphed_step_as_first_call_on_cuda():
    """A CUDA-graphed decode step as the kernels' very first call (no eager call to allocate first)."""
    from tformer.generate import SamplingConfig, generate
    from tformer.generate.engine import compiled_decode_step
    from tformer.kernels import base
    from tformer.models import with_decode_kernels

    model = with_decode_kernels(_tiny(tie_embeddings=False).to("cuda", torch.bfloat16))
    base._COUNTS.clear()
    torch._dynamo.reset()
    greedy = SamplingConfig(temperature=0)
    graphed = generate(model, [[3, 5, 7, 11]], 12, greedy, step_fn=compiled_decode_step())
    assert graphed == generate(model, [[3, 5, 7, 11]], 12, greedy)


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU")
def test_captured_loop_on_cuda_gives_the_graph_trees_tokens():
    """CapturedDecode (one CUDA graph with the loop's bookkeeping) against torch.compile's CUDA-graph
    tree and eager steps: the same greedy tokens, one row and three; seeded top-k sampling repeats
    itself from the first (capturing) call to the next (replaying) one."""
    from tformer.generate import CapturedDecode, SamplingConfig, generate
    from tformer.generate.engine import compiled_decode_step
    from tformer.models import with_decode_kernels

    model = with_decode_kernels(_tiny(tie_embeddings=False).to("cuda", torch.bfloat16))
    greedy, prompts = SamplingConfig(temperature=0), [[3, 5, 7, 11], [2, 9], [4, 4, 8]]
    captured, tree = CapturedDecode(), compiled_decode_step()
    for batch in ([prompts[0]], prompts):
        want = generate(model, batch, 12, greedy)
        assert generate(model, batch, 12, greedy, step_fn=tree) == want
        assert generate(model, batch, 12, greedy, step_fn=captured) == want
        assert generate(model, batch, 12, greedy, step_fn=captured) == want
    topk = SamplingConfig(temperature=0.9, top_k=7, repetition_penalty=1.2)
    runs = [generate(model, prompts, 12, topk, seed=4, stop_ids={5}, step_fn=captured) for _ in range(2)]
    assert runs[0] == runs[1]
    assert all(0 <= t < model.config.vocab_size for row in runs[0] for t in row)


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU")
def test_captured_prefill_on_cuda_gives_the_compiled_prefills_tokens():
    """CapturedPrefill (the prompt's forward and first sample replayed from a CUDA graph) against the same
    padding through compiled_prefill: the same greedy tokens, one row and three, captured and replayed;
    seeded sampling repeats itself from the capturing call to the replaying one."""
    from tformer.generate import CapturedDecode, CapturedPrefill, SamplingConfig, generate
    from tformer.generate.engine import compiled_prefill

    model = _tiny(tie_embeddings=False).to("cuda", torch.bfloat16)
    greedy, prompts = SamplingConfig(temperature=0), [[3, 5, 7, 11], [2, 9], [4, 4, 8]]
    captured, plain = CapturedPrefill(bucket=8), compiled_prefill()
    padded = lambda *a: plain(*a)  # noqa: E731
    padded.padded_length = captured.padded_length  # the same padding, no CUDA graph
    step = CapturedDecode()
    for batch in ([prompts[0]], prompts):
        want = generate(model, batch, 6, greedy, prefill_fn=padded, step_fn=step)
        assert generate(model, batch, 6, greedy, prefill_fn=captured, step_fn=step) == want
        assert generate(model, batch, 6, greedy, prefill_fn=captured, step_fn=step) == want
    topk = SamplingConfig(temperature=0.9, top_k=7)
    runs = [generate(model, prompts, 6, topk, seed=4, prefill_fn=captured, step_fn=step) for _ in range(2)]
    assert runs[0] == runs[1] and len(captured._states) == 3
