"""tformer.kernels.matvec against PyTorch references, on CPU through Triton's interpreter.

The kernels are Triton code; with TRITON_INTERPRET=1 the very same kernel runs on CPU tensors. The
interpreter must be on before Triton is imported, so `test_kernels_under_interpreter` runs this file
again in a child process with it set; there the other tests run (elsewhere they skip).
"""

import os
import subprocess
import sys

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the child process with TRITON_INTERPRET=1")


def test_kernels_under_interpreter():
    triton = pytest.importorskip("triton")
    if INTERPRETED:
        pytest.skip("already the child process")
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip("Triton's interpreter before 3.9 fails on this kernel (the compiled kernel is tested on CUDA)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "34 passed" in r.stdout, r.stdout[-2000:]  # the child ran the kernel tests


SHAPES = [(37, 320, 32), (37, 320, 64), (64, 2048, 64)]  # tails of rows and of K steps (interpreted: 128 a step)


@interpreted
@pytest.mark.parametrize("rows", [1, 5])  # one row, or the tensor-core kernel for a few
@pytest.mark.parametrize("n,k,group", SHAPES)
def test_matvec_formats_match_dequantized_reference(n, k, group, rows):
    from tformer.kernels import matvec
    from tformer.quantize import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8

    torch.manual_seed(0)
    w, x = torch.randn(n, k), torch.randn(rows, k)
    q8, s8 = quantize_int8(w)
    p4, s4, z4 = quantize_int4(w, group)
    cases = {
        "float": (matvec(x, w), w),
        "int8": (matvec(x, q8, s8, fmt="int8"), dequantize_int8(q8, s8)),
    }
    if rows == 1:
        cases["int4"] = (matvec(x, p4, s4, z4, fmt="int4", group_size=group), dequantize_int4(p4, s4, z4, group))
    else:  # several rows of an int4 layer are tinygemm's (or dequantized), not the kernel's
        with pytest.raises(ValueError, match="1 to 1 rows of x for int4"):
            matvec(x, p4, s4, z4, fmt="int4", group_size=group)
    for fmt, (y, w_ref) in cases.items():
        assert y.shape == (rows, n), fmt
        torch.testing.assert_close(y, x @ w_ref.T, rtol=1e-5, atol=1e-4, msg=fmt)


@interpreted
def test_matvec_rounds_once_in_low_precision():
    from tformer.kernels import matvec

    torch.manual_seed(0)
    w, x = torch.randn(48, 512).bfloat16(), torch.randn(1, 1, 512).bfloat16()
    y = matvec(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (1, 1, 48)
    torch.testing.assert_close(y, (x.float() @ w.float().T).bfloat16())  # fp32 accumulation, one rounding


@interpreted
def test_matvec_refuses_many_rows():
    from tformer.kernels import matvec
    from tformer.kernels.gemv import MAX_ROWS

    with pytest.raises(ValueError, match=f"1 to {MAX_ROWS} rows"):
        matvec(torch.randn(MAX_ROWS + 1, 64), torch.randn(8, 64))
    with pytest.raises(ValueError, match="contiguous"):
        matvec(torch.randn(1, 64), torch.randn(64, 8).T)


@interpreted
def test_quantized_layers_take_the_kernel_for_a_few_rows_only():
    from tformer.kernels import use_matvec
    from tformer.kernels.gemv import MAX_ROWS
    from tformer.quantize import Int4Linear, Int8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96, bias=True)
    x = torch.randn(MAX_ROWS + 1, 1, 128)
    assert use_matvec(x[:1], 128) and use_matvec(x[:MAX_ROWS], 128) and not use_matvec(x, 128)
    assert not use_matvec(x[:1].clone().requires_grad_(), 128)  # the kernel has no backward
    for q in (Int8Linear.from_linear(lin), Int4Linear.from_linear(lin, 64)):
        with torch.no_grad():
            one, few = q(x[:1]), q(x[:3])
            many = q(x)  # the dequantizing F.linear path
        torch.testing.assert_close(one, many[:1], rtol=1e-5, atol=1e-5, msg=type(q).__name__)
        torch.testing.assert_close(few, many[:3], rtol=1e-5, atol=1e-5, msg=type(q).__name__)


@interpreted
@pytest.mark.parametrize("pdl", [False, True])  # True: the first weight tiles loaded before the wait
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matvec_fusions_round_like_the_modules(dtype, rows, pdl, monkeypatch):
    from tformer.kernels import StoredWeight, gemv, matvec
    from tformer.nn.norm import RMSNorm
    from tformer.quantize import Int8Linear

    monkeypatch.setattr(gemv, "use_pdl", lambda device: pdl)
    torch.manual_seed(0)
    k, n = 320, 96
    norm = RMSNorm(k, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(k) + 0.5)
    b = torch.randn(n).to(dtype)
    w1, w3 = (torch.randn(n, k).to(dtype) for _ in range(2))
    x, r = torch.randn(rows, 1, k).to(dtype), torch.randn(rows, 1, n).to(dtype)

    def lin(inp, w):  # what the unfused modules compute: fp32 products, one rounding
        return (inp.float() @ w.float().T).to(dtype)

    with torch.no_grad():
        h = norm(x)
        cases = {
            "norm": (matvec(x, w1, norm=(norm.weight, norm.eps)), lin(h, w1)),
            "bias": (matvec(x, w1, bias=b), lin(x, w1) + b),
            "residual": (matvec(x, w1, residual=r), r + lin(x, w1)),
            "gated": (matvec(x, w1, norm=(norm.weight, norm.eps), up=StoredWeight(w3)),
                      torch.nn.functional.silu(lin(h, w1)) * lin(h, w3)),
        }
        q1, q3 = (Int8Linear.from_linear(torch.nn.Linear(k, n, bias=False).to(dtype)) for _ in range(2))
        cases["int8 gated"] = (matvec(x, *q1.matvec_weight(), norm=(norm.weight, norm.eps), up=q3.matvec_weight()),
                               torch.nn.functional.silu(q1(h)) * q3(h))
    for name, (got, want) in cases.items():
        assert got.dtype == dtype and got.shape == want.shape, name
        # bf16: the kernel's sum of squares may round the norm's output one ulp apart, so a few ulps of the largest value
        tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 0, "atol": 0.03 * want.abs().max().item()}
        torch.testing.assert_close(got, want, **tol, msg=name)
    with pytest.raises(ValueError, match="same format"):
        matvec(x, w1, up=q3.matvec_weight())


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_reference_with_grouped_heads_and_padding(dtype):
    from tformer.kernels import decode_attention, use_decode_attention
    from tformer.nn.attention import reference_attention
    from tformer.nn.masks import causal_mask

    torch.manual_seed(0)
    B, H, Hkv, S, D = 2, 8, 2, 80, 48  # a head_dim that is not a power of two; S spans two blocks
    q = torch.randn(B, 1, H, D).to(dtype).transpose(1, 2)  # the layout attention hands over
    k, v = (torch.randn(B, Hkv, S, D).to(dtype) for _ in range(2))
    valid = torch.ones(B, S, dtype=torch.long)
    valid[1, :30] = 0  # row 1 is left padded
    mask = causal_mask(torch.tensor([70]), S, valid)  # (B, 1, 1, S): slots past 70 not yet written
    k[:, :, 71:] = float("nan")  # never read
    v[:, :, 71:] = float("nan")
    assert use_decode_attention(q, k, v, mask, 0.0)
    assert not use_decode_attention(q, k, v, None, 0.0) and not use_decode_attention(q, k, v, mask, 0.1)
    got = decode_attention(q, k, v, mask)
    want, _ = reference_attention(q.float(), k.float().nan_to_num(), v.float().nan_to_num(), mask)
    assert got.shape == (B, H, 1, D) and got.dtype == dtype
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got.float(), want, **tol)


@interpreted
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_attention_matches_reference(dtype, T):
    """A decode step (T = 1: the cache split in two parts, merged by the last to finish) and a
    verify-sized one (T new tokens a sequence): RoPE, cache write and causal attention over the
    cache in one kernel, against RoPE, the cache update and the reference attention."""
    _check_cached_attention(dtype, "cpu", T)


def _check_cached_attention(dtype, device, T):
    from tformer.kernels import attention
    from tformer.config import RopeConfig
    from tformer.kernels import cached_attention, use_cached_attention
    from tformer.nn.attention import reference_attention
    from tformer.nn.masks import causal_mask
    from tformer.nn.rope import RotaryEmbedding, apply_rope

    torch.manual_seed(0)
    B, H, Hkv, S, D = 2, 8, 2, 80, 48  # head_dim not a power of two, RoPE on 32 of its 48 dims
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D).to(device, dtype)
    slots = torch.arange(66, 66 + T, device=device)
    valid = torch.ones(B, S, dtype=torch.long, device=device)
    valid[1, :30] = 0  # row 1 is left padded
    positions = (valid.cumsum(-1) - 1).gather(1, slots.expand(B, -1))
    cos, sin = RotaryEmbedding(RopeConfig(partial_rotary_factor=2 / 3), D).to(device)(positions, dtype)
    mask = causal_mask(slots, S, valid)  # (B, 1, T, S)
    k_cache, v_cache = (torch.randn(B, Hkv, S, D).to(device, dtype) for _ in range(2))
    for c in (k_cache, v_cache):
        c[:, :, 66:] = float("nan")  # the new slots and those not yet written: never read
    assert use_cached_attention(qkv, k_cache, v_cache, mask, (cos, sin), H)
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k = apply_rope(q.view(B, T, H, D), cos, sin), apply_rope(k.view(B, T, Hkv, D), cos, sin)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    k_want[:, :, slots], v_want[:, :, slots] = k.transpose(1, 2), v.view(B, T, Hkv, D).transpose(1, 2)
    want, _ = reference_attention(q.transpose(1, 2).float(), k_want.float().nan_to_num(),
                                  v_want.float().nan_to_num(), mask)
    got = cached_attention(qkv, (cos, sin), k_cache, v_cache, slots, mask, H)
    assert got.shape == (B, T, H * D) and got.dtype == dtype
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got.float(), want.transpose(1, 2).reshape(B, T, H * D), **tol)
    # RoPE in fp32, rounded once (the module rounds each bf16 op): an ulp or so apart in bf16
    torch.testing.assert_close(k_cache[:, :, slots], k_want[:, :, slots], **tol)
    torch.testing.assert_close(v_cache[:, :, slots], v_want[:, :, slots], rtol=0, atol=0)
    if T == 1:  # every count of finished splits is back at zero for the next call
        assert all(not counts.any() for counts in attention._COUNTS.values())


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
    from tformer.models.fused import FusedBlock
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
    got = _prefill_and_step(model)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    without_decode_kernels(model)
    assert not any(isinstance(m, (FusedBlock, MatvecLinear)) for m in model.modules())


@interpreted
def test_fused_block_takes_the_fused_kernels():
    """The Llama block's one-row step is four matvec calls (norms, residuals and SwiGLU inside) plus
    one attention kernel that also applies RoPE and writes the cache."""
    from tformer.kernels import attention, gemv
    from tformer.models import with_decode_kernels

    model = with_decode_kernels(_tiny("tiny-llama", tie_embeddings=False))
    calls = []
    original = gemv.matvec_op

    def spy(*args):
        given = dict(zip(["up", "norm", "bias", "residual"], (args[i] is not None for i in (6, 9, 11, 12))))
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
    assert calls == [["norm"], "attention", ["residual"], ["norm", "up"], ["residual"]] * 2  # wqkv, wo, w1 + w3, w2
    assert (k_written.abs().sum(-1) > 0).all()  # the new tokens' keys went into slots 0..3


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


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU")
def test_matvec_on_cuda_matches_dequantized_reference():
    pytest.importorskip("triton")
    from tformer.kernels import matvec
    from tformer.quantize import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8

    torch.manual_seed(0)
    for n, k, rows in [(3072, 2048, 1), (2048, 8192, 1), (1000, 320, 1), (3072, 2048, 6), (1000, 320, 3)]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        q8, s8 = quantize_int8(w)
        p4, s4, z4 = quantize_int4(w, 64)
        cases = {
            "float": (matvec(x, w), w),
            "int8": (matvec(x, q8, s8, fmt="int8"), dequantize_int8(q8, s8)),
        }
        if rows == 1:
            cases["int4"] = (matvec(x, p4, s4, z4, fmt="int4", group_size=64), dequantize_int4(p4, s4, z4, 64))
        for fmt, (y, w_ref) in cases.items():
            ref = x.float() @ w_ref.float().T
            err = ((y.float() - ref).norm() / ref.norm()).item()
            assert y.dtype == torch.bfloat16 and err < 5e-3, (fmt, n, k, rows, err)


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU")
def test_cached_attention_on_cuda_matches_reference():
    pytest.importorskip("triton")
    for T in (1, 4):
        _check_cached_attention(torch.bfloat16, "cuda", T)


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
    from tformer.kernels import gemv
    from tformer.models import with_decode_kernels

    model = with_decode_kernels(_tiny(tie_embeddings=False).to("cuda", torch.bfloat16))
    greedy, prompts = SamplingConfig(temperature=0), [[3, 5, 7, 11], [2, 9], [4, 4, 8]]
    runs, before = {}, gemv._PDL["enabled"]
    try:
        for pdl in (False, True):
            gemv.set_pdl(pdl)
            torch._dynamo.reset()  # capture the graphs again under this setting
            for graphed in (False, True):
                step = compiled_decode_step() if graphed else None
                runs[pdl, graphed] = [generate(model, p, 12, greedy, step_fn=step) for p in ([prompts[0]], prompts)]
    finally:
        gemv.set_pdl(before)
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
