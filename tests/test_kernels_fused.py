"""Whole models through tformer's decode kernels (tformer.inference.fused, as a DecodeEngine swaps
them in): fused steps match the unfused modules, a block is the expected five kernels, compiled
steps keep them, speculative decoding through them is exact. Interpreted on CPU without a GPU
(tests/conftest.py); the CUDA tests run on a GPU.
"""

import pytest
import torch

from tests.test_kernels import INTERPRETED, interpreted


def _tiny(name: str = "tiny-llama", **overrides):
    from tformer.models import build_model
    from tformer.presets import get_preset

    torch.manual_seed(0)
    return build_model(get_preset(name).replace(**overrides)).eval()


def _fuse(model, rows: int = 4):
    """The model with the decode kernels swapped in, over a workspace for `rows` sequences."""
    from tformer.inference.fused import with_decode_kernels
    from tformer.inference.workspace import Workspace

    return with_decode_kernels(model, Workspace(next(model.parameters()).device, rows, model.config.n_heads))


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
    from tformer.inference.fused import FusedBlock, FusedDecoder, without_decode_kernels
    from tformer.inference.kernels.linear import MatvecLayer, MatvecLinear
    from tformer.quantize import quantize_model

    model = _tiny(preset, tie_embeddings=False, **({"ffn_dim": 192} if quant else {}))  # int4 groups of 32
    if quant:
        quantize_model(model, quant, group_size=32)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    want = _prefill_and_step(model)
    _fuse(model)
    fused = [type(b) is FusedBlock for b in model.layers]
    assert all(fused) if preset != "tiny-mla-moe" else not any(fused)  # latent attention keeps its own path
    assert quant or type(model.output) is MatvecLinear
    assert type(model) is FusedDecoder
    got = _prefill_and_step(model)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    without_decode_kernels(model)
    assert not any(isinstance(m, (FusedBlock, FusedDecoder, MatvecLayer)) for m in model.modules())


@interpreted
def test_fused_block_takes_the_fused_kernels():
    """The Llama block's one-row step is four matvec calls (norms, residuals and SwiGLU inside) plus
    one attention kernel that also applies RoPE and writes the cache."""
    from tformer.inference.kernels import fused_attention as attention, gemv

    model = _fuse(_tiny("tiny-llama", tie_embeddings=False))
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
    from tformer.inference.kernels import gemv

    model = _fuse(_tiny("tiny-llama", tie_embeddings=False))
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
    from tformer.inference.sampling import SamplingConfig
    from tformer.inference.steps import decode_step
    from tformer.quantize import quantize_model

    model = _fuse(quantize_model(_tiny(tie_embeddings=False, ffn_dim=192), "int4", group_size=32, skip=()))
    assert model.output.__class__.__name__ == "MatvecInt8Linear"  # the untied head: int8, the rest int4
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

    from tformer.inference.sampling import SamplingConfig
    from tformer.inference.steps import decode_step

    model = _fuse(_tiny(n_layers=3))
    step = torch.compile(decode_step, fullgraph=True, options={"triton.cudagraphs": False})
    with torch.no_grad():
        model.setup_caches(1, 16)
        mask = torch.ones(1, model.cache_slots, dtype=torch.long)
        _, code = run_and_get_code(step, model, torch.tensor([[3]]), torch.tensor([0]), mask, SamplingConfig(temperature=0))
        model.clear_caches()
    calls = re.findall(r"tformer\.cached_attention\.default\((.*)\)", "\n".join(code))
    # after qkv: cos, sin, k_cache, v_cache, input_pos, mask, n_heads, rot_dim, counts (pdl False: not printed)
    shared = {tuple(a.strip() for i, a in enumerate(c.rsplit(", ", 9)[1:]) if i in (0, 1, 5)) for c in calls}
    assert len(calls) == 3 and len(shared) == 1, calls  # (cos, sin, mask) the same for every layer


@interpreted
def test_compiled_loop_step_draws_no_seeds_and_records_in_one_kernel():
    """The engine's compiled `advance` with top-k sampling: no seed kernels (the sampler mixes the slot
    into the seeds the engine drew for the request), the loop's bookkeeping is the one record_step
    call, and the tokens are the eager step's."""
    from torch._inductor.utils import run_and_get_code

    from tformer.inference import DecodeEngine, SamplingConfig

    topk, model = SamplingConfig(temperature=0.9, top_k=5), _tiny(n_layers=2)
    with DecodeEngine(model, kernels=True, cuda_graphs=True, max_batch_size=1) as eager:
        want = eager.generate([[3, 5, 7]], 6, topk, seed=2)
    with DecodeEngine(model, kernels=True, compile=True, cuda_graphs=True, max_batch_size=1) as compiled:
        got, code = run_and_get_code(compiled.generate, [[3, 5, 7]], 6, topk, seed=2)
    code = [c for c in code if "tformer.record_step.default(" in c]  # the decode step's graph, not the prompt's
    assert got == want and len(code) == 1
    code = code[0]
    assert "tformer.record_step.default(" in code and "tformer.topk_sample.default(" in code
    assert "randint" not in code and "index_copy" not in code, code


CUDA = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU")


@CUDA
def test_fused_decode_on_cuda_matches_unfused_in_bf16():
    pytest.importorskip("triton")
    model = _tiny(tie_embeddings=False).to("cuda", torch.bfloat16)
    want = _prefill_and_step(model, "cuda")
    got = _prefill_and_step(_fuse(model), "cuda")
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=0, atol=0.03 * w.float().abs().max().item())


GPU_FAMILIES = [("tiny-llama", None), ("tiny-llama", "int8"), ("tiny-llama", "int4"), ("tiny-gpt2", None),
                ("tiny-mistral", None), ("tiny-qwen2", None), ("tiny-moe", None), ("tiny-mla-moe", None)]


@CUDA
@pytest.mark.parametrize("preset,quant", GPU_FAMILIES)
def test_engine_on_cuda_gives_the_plain_models_greedy_tokens_in_fp32(preset, quant):
    """For every family the engine serves: greedy tokens in fp32 through the kernels (eager, and
    compiled with CUDA graphs) equal the plain model's, one prompt and a left-padded batch of three."""
    from tformer.inference import DecodeEngine, SamplingConfig
    from tformer.quantize import quantize_model

    model = _tiny(preset, tie_embeddings=False, **({"ffn_dim": 192} if quant else {})).to("cuda")
    if quant:
        quantize_model(model, quant, group_size=32)
    greedy, prompts = SamplingConfig(temperature=0), [[3, 5, 7, 11, 2, 6], [2, 9], [4, 4, 8]]
    for batch in ([prompts[0]], prompts):
        with DecodeEngine(model, kernels=False, max_batch_size=3) as plain:
            want = plain.generate(batch, 10, greedy)
        for compile in (False, True):
            with DecodeEngine(model, kernels=True, compile=compile, max_batch_size=3) as engine:
                assert engine.generate(batch, 10, greedy) == want, (preset, quant, compile)
                assert engine.generate(batch, 10, greedy) == want  # replayed
                assert engine.workspace.at_rest()


@CUDA
def test_programmatic_dependent_launch_changes_no_token_on_cuda():
    """The same greedy tokens with and without PDL, eager and CUDA-graphed, one row and a few (batch 3)."""
    pytest.importorskip("triton")
    from tformer.inference import DecodeEngine, SamplingConfig

    model = _tiny(tie_embeddings=False).to("cuda", torch.bfloat16)
    greedy, prompts = SamplingConfig(temperature=0), [[3, 5, 7, 11], [2, 9], [4, 4, 8]]
    runs = {}
    for pdl in (False, True):
        for graphed in (False, True):
            with DecodeEngine(model, pdl=pdl, compile=graphed, max_batch_size=3) as engine:
                runs[pdl, graphed] = [engine.generate(p, 12, greedy) for p in ([prompts[0]], prompts)]
    assert runs[True, False] == runs[False, False]
    assert runs[True, True] == runs[False, True]


@interpreted
def test_speculative_greedy_through_the_kernels_equals_target_greedy():
    """Drafts of one row, verifies of k + 1 rows (the few-row kernels), eager and compiled rounds:
    in fp32 the tokens are the target's own greedy tokens."""
    from tformer.inference import DecodeEngine, SamplingConfig, generate, speculative_generate

    small = dict(tie_embeddings=False, vocab_size=64, n_layers=1, ffn_dim=64)  # few interpreted programs
    target, near = _tiny(**small), _tiny(**small)
    with torch.no_grad():
        for p in near.parameters():
            p.add_(torch.randn_like(p) * 0.002)  # agrees with the target most of the time
    greedy, prompt = SamplingConfig(temperature=0), [5, 17, 42, 3]
    want = generate(target, [prompt], 8, greedy, options=None)[0]
    for compile in (False, True):
        engines = [DecodeEngine(m, kernels=True, compile=compile, max_batch_size=1, debug=True) for m in (target, near)]
        out, stats = speculative_generate(*engines, prompt, 8, k=3, sampling=greedy)
        for e in engines:
            e.close()
        assert out == want
        assert 0 < stats.accepted < stats.proposed


def test_the_workspace_is_sized_once_and_larger_requests_are_refused():
    """The counters are allocated when the engine is made, for its largest request, and never move
    (a captured graph holds their address); a larger batch is refused instead of reallocating them."""
    pytest.importorskip("triton")
    if not INTERPRETED and not torch.cuda.is_available():
        pytest.skip("the kernels run on neither this CPU nor a GPU")
    from tformer.inference import DecodeEngine, SamplingConfig

    device = "cpu" if INTERPRETED else "cuda"
    model = _tiny(n_layers=1).to(device)
    with DecodeEngine(model, kernels=True, max_batch_size=2, debug=True) as engine:
        ws = engine.workspace
        addresses = (ws.merge.data_ptr(), ws.topk.data_ptr(), ws.seeds.data_ptr())
        assert ws.merge.numel() >= 2 * model.config.n_heads and not ws.merge.any()
        topk = SamplingConfig(temperature=0.9, top_k=5)
        engine.generate([[3, 5]], 2, topk)
        engine.generate([[3, 5], [7]], 2, topk)
        with pytest.raises(ValueError, match="at most 2"):
            engine.generate([[1], [2], [3], [4]], 2, topk)
        assert (ws.merge.data_ptr(), ws.topk.data_ptr(), ws.seeds.data_ptr()) == addresses
        assert ws.at_rest()


@interpreted
@pytest.mark.parametrize("overrides", [dict(positions="alibi"), dict(norm_placement="post"),
                                       dict(positions="learned"), dict(norm="layernorm", activation="gelu"),
                                       dict(sliding_window=4)])
def test_configs_the_kernels_do_not_fuse_compute_as_the_modules_do(overrides):
    """Blocks the fused kernels do not implement keep their modules (or fall back per call) and give
    the plain model's logits."""
    from tformer.inference.fused import FusedBlock, fusable

    model = _tiny("tiny-llama", tie_embeddings=False, **overrides)
    want = _prefill_and_step(model)
    plain_blocks = [fusable(b) for b in model.layers]
    got = _prefill_and_step(_fuse(model))
    assert [type(b) is FusedBlock for b in model.layers] == plain_blocks
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@CUDA
def test_captured_prefill_and_loop_on_cuda_repeat_seeded_sampling():
    """The engine's CUDA graphs: the same greedy tokens as eager steps, one row and three, captured and
    replayed; seeded top-k sampling repeats itself from the capturing call to the replaying one."""
    from tformer.inference import DecodeEngine, SamplingConfig

    model = _tiny(tie_embeddings=False).to("cuda", torch.bfloat16)
    greedy, prompts = SamplingConfig(temperature=0), [[3, 5, 7, 11], [2, 9], [4, 4, 8]]
    batches = ([prompts[0]], prompts)
    with DecodeEngine(model, max_batch_size=3) as eager:  # one engine at a time runs a model's kernels
        wants = [eager.generate(batch, 12, greedy) for batch in batches]
    with DecodeEngine(model, compile=True, max_batch_size=3, prefill_bucket=8) as graphed:
        for batch, want in zip(batches, wants):
            assert graphed.generate(batch, 12, greedy) == want
            assert graphed.generate(batch, 12, greedy) == want
        topk = SamplingConfig(temperature=0.9, top_k=7, repetition_penalty=1.2)
        runs = [graphed.generate(prompts, 12, topk, seed=4, stop_ids={5}) for _ in range(2)]
        assert runs[0] == runs[1]
        assert all(0 <= t < model.config.vocab_size for row in runs[0] for t in row)


@interpreted
def test_a_second_engine_with_kernels_on_one_model_is_refused():
    from tformer.inference import DecodeEngine

    model = _tiny(n_layers=1)
    with DecodeEngine(model, kernels=True, max_batch_size=1):
        with pytest.raises(ValueError, match="another engine"):
            DecodeEngine(model, kernels=True, max_batch_size=1)
    DecodeEngine(model, kernels=True, max_batch_size=1).close()  # once the first is closed
