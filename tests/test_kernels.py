"""tformer.inference.kernels (matvec, decode and cached attention) against PyTorch references, on CPU
through Triton's interpreter.

The kernels are Triton code; with TRITON_INTERPRET=1 the very same kernel runs on CPU tensors.
tests/conftest.py turns the interpreter on for machines without a GPU; on a GPU the `interpreted`
tests skip and the CUDA ones run.
"""

import functools
import os

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs the kernels through Triton's interpreter (no GPU)")


@interpreted
def test_record_step_writes_the_loops_bookkeeping():
    from tformer.inference.kernels.record import record_step

    history, n = torch.zeros(4, 3, dtype=torch.long), torch.tensor([2])
    token, pos = torch.zeros(3, 1, dtype=torch.long), torch.tensor([9])
    record_step(torch.tensor([4, 5, 6]), token, pos, history, n)
    assert history.tolist() == [[0, 0, 0], [0, 0, 0], [4, 5, 6], [0, 0, 0]]
    assert (n.item(), pos.item(), token.flatten().tolist()) == (3, 10, [4, 5, 6])


def merge_counters(device="cpu") -> torch.Tensor:
    """Zeroed int32 counters for the kernels' in-kernel merges, as an engine's workspace holds them."""
    return torch.zeros(4096, dtype=torch.int32, device=device)


def stored(layer):
    """The weight of an Int8Linear / Int4Linear as `matvec` reads it."""
    from tformer.inference.kernels.linear import MATVEC_CLASSES

    return MATVEC_CLASSES[type(layer)].stored_weight(layer)


SHAPES = [(37, 320, 32), (37, 320, 64), (64, 2048, 64)]  # tails of rows and of K steps (interpreted: 128 a step)


@interpreted
@pytest.mark.parametrize("rows,swap", [(1, 0), (5, 0), (5, 1)])  # one row, or the tensor-core kernel (x W^T, W x^T)
@pytest.mark.parametrize("n,k,group", SHAPES)
def test_matvec_formats_match_dequantized_reference(n, k, group, rows, swap, monkeypatch):
    from tformer.inference.kernels import matvec, rows as rows_kernel
    from tformer.quantize import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8

    monkeypatch.setattr(rows_kernel, "_INTERPRETED_SWAP", swap)
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


def test_untuned_kernels_launch_their_first_configuration(monkeypatch):
    """TFORMER_TUNE=0 (`TUNE` off): every autotuned kernel keeps the first configuration it would time,
    and times none."""
    pytest.importorskip("triton")
    from tformer.inference.kernels import attention, base, fused_attention, gemv, rows

    for tuner in (*gemv._TUNED.values(), *gemv._WHOLE_ROWS.values(), rows._TUNED_ROWS,
                  fused_attention._tuned_cached_attention, fused_attention._tuned_cached_attention_rows,
                  attention._tuned_decode_attention):
        tuner.nargs = {"N": 4096, "K": 2048, "S": 384}  # what launches pass (rows split K below SPLIT_K_BELOW rows)
        monkeypatch.setattr(base, "TUNE", True)
        kept = tuner.prune_configs({})
        monkeypatch.setattr(base, "TUNE", False)
        assert tuner.prune_configs({}) == kept[:1] and len(kept) > 1
        if tuner is rows._TUNED_ROWS:  # each tile with the split of K that gives the SMs programs enough
            assert [c.kwargs["SPLIT_K"] for c in kept] == [rows.split_k(4096, c.kwargs["BLOCK_N"]) for c in kept]
            tile = lambda c: (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["SWAP"], c.num_warps, c.num_stages)  # noqa: E731
            assert {tile(c) for c in kept} == {tile(c) for c in tuner.configs}
        elif any(tuner is whole for whole in gemv._WHOLE_ROWS.values()):  # the tiles that take rows of K = 2048 whole
            assert {c.kwargs["BLOCK_K"] for c in kept} == {2048}
        elif tuner is fused_attention._tuned_cached_attention:  # parts of one tile: 4 x 128 or 8 x 64-128 slots
            assert {(c.kwargs["SPLITS"], c.kwargs["BLOCK_S"]) for c in kept} == {(4, 128), (8, 64), (8, 128)}
        else:
            assert kept == tuner.configs


def test_whole_row_tiles_cover_every_k_they_take():
    pytest.importorskip("triton")
    from tformer.inference.kernels import gemv

    lo, hi = gemv.WHOLE_ROWS_K
    for fmt, tuner in gemv._WHOLE_ROWS.items():
        for K in (lo, 100, 256, 576, 2048, 3000, hi):
            kept = gemv._whole_rows_only(tuner.configs, {"K": K})
            assert kept and all(c.kwargs["BLOCK_K"] >= K for c in kept), (fmt, K)


def test_rows_split_k_gives_every_sm_two_programs(monkeypatch):
    pytest.importorskip("triton")
    from tformer.inference.kernels import rows
    from tformer.inference.kernels.rows import MAX_SPLIT_K, SPLIT_K_BELOW, split_k

    sms = 132  # an H100's, whatever GPU runs the test
    monkeypatch.setattr(rows, "_sm_count", lambda: sms)
    assert split_k(8192, 16) == 1 and split_k(3072, 16) == 2 and split_k(2048, 16) == MAX_SPLIT_K
    assert split_k(2048, 64) == MAX_SPLIT_K and split_k(SPLIT_K_BELOW, 16) == 1
    for n in (256, 2048, 3072, 8192):
        for bn in (16, 32, 64):
            s = split_k(n, bn)
            assert s == MAX_SPLIT_K or -(-n // bn) * s >= 2 * sms


@interpreted
def test_matvec_rounds_once_in_low_precision():
    from tformer.inference.kernels import matvec

    torch.manual_seed(0)
    w, x = torch.randn(48, 512).bfloat16(), torch.randn(1, 1, 512).bfloat16()
    y = matvec(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (1, 1, 48)
    torch.testing.assert_close(y, (x.float() @ w.float().T).bfloat16())  # fp32 accumulation, one rounding


@interpreted
def test_matvec_refuses_many_rows():
    from tformer.inference.kernels import matvec
    from tformer.inference.kernels.gemv import MAX_ROWS

    with pytest.raises(ValueError, match=f"1 to {MAX_ROWS} rows"):
        matvec(torch.randn(MAX_ROWS + 1, 64), torch.randn(8, 64))
    with pytest.raises(ValueError, match="contiguous"):
        matvec(torch.randn(1, 64), torch.randn(64, 8).T)


@interpreted
def test_quantized_layers_take_the_kernel_for_a_few_rows_only():
    from tformer.inference.kernels import use_matvec
    from tformer.inference.kernels.gemv import MAX_ROWS
    from tformer.inference.kernels.linear import MATVEC_CLASSES
    from tformer.inference.workspace import Workspace
    from tformer.quantize import Int4Linear, Int8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96, bias=True)
    x = torch.randn(MAX_ROWS + 1, 1, 128)
    assert use_matvec(x[:1], 128) and use_matvec(x[:MAX_ROWS], 128) and not use_matvec(x, 128)
    assert not use_matvec(x[:1].clone().requires_grad_(), 128)  # the kernel has no backward
    for q in (Int8Linear.from_linear(lin), Int4Linear.from_linear(lin, 64)):
        q.__class__, q.workspace = MATVEC_CLASSES[type(q)], Workspace("cpu", 1, 1)  # as an engine swaps it
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
    from tformer.inference.kernels import StoredWeight, gemv, matvec
    from tformer.nn.norm import RMSNorm
    from tformer.quantize import Int4Linear, Int8Linear, dequantize_int4

    monkeypatch.setattr(gemv, "use_pdl", lambda device, enabled=None: pdl)
    counts = merge_counters()
    mv = functools.partial(matvec, counts=counts)
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
            "norm": (mv(x, w1, norm=(norm.weight, norm.eps)), lin(h, w1)),
            "bias": (mv(x, w1, bias=b), lin(x, w1) + b),
            "residual": (mv(x, w1, residual=r), r + lin(x, w1)),
            "gated": (mv(x, w1, norm=(norm.weight, norm.eps), up=StoredWeight(w3)),
                      torch.nn.functional.silu(lin(h, w1)) * lin(h, w3)),
        }
        q1, q3 = (Int8Linear.from_linear(torch.nn.Linear(k, n, bias=False).to(dtype)) for _ in range(2))
        cases["int8 gated"] = (mv(x, *stored(q1), norm=(norm.weight, norm.eps), up=stored(q3)),
                               torch.nn.functional.silu(q1(h)) * q3(h))
        if rows == 1:  # int4's kernel takes one row (with pdl, its first tile's bytes before the wait)
            g1, g3 = (Int4Linear.from_linear(torch.nn.Linear(k, n, bias=False).to(dtype), 64) for _ in range(2))
            d1, d3 = (dequantize_int4(g.weight, g.scales, g.zeros, 64) for g in (g1, g3))  # fp32, as the kernel
            cases["int4 gated"] = (mv(x, *stored(g1), norm=(norm.weight, norm.eps), up=stored(g3)),
                                   torch.nn.functional.silu(lin(h, d1)) * lin(h, d3))
            cases["int4 residual"] = (mv(x, *stored(g1), residual=r),  # against the fp32 dequantized weight
                                      r + lin(x, dequantize_int4(g1.weight, g1.scales, g1.zeros, 64)))
    for name, (got, want) in cases.items():
        assert got.dtype == dtype and got.shape == want.shape, name
        # fp32: sums in another order, whose error the gate multiplies (up to ~1e-6 of the largest value); bf16: the
        # kernel's sum of squares may round the norm's output one ulp apart, so a few ulps of the largest value
        largest = want.abs().max().item()
        # int4 in bf16: the kernel scales each group's partial sums (s * sum((q - 8) x) + z * sum(x)), another order
        tol = ({"rtol": 1e-5, "atol": 1e-4 + 1e-6 * largest} if dtype == torch.float32
               else {"rtol": 0, "atol": (0.05 if "int4" in name else 0.03) * largest})
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{name}: {m}")
    assert not counts.any()  # several rows: K split in two, merged by the last part to finish
    with pytest.raises(ValueError, match="same format"):
        matvec(x, w1, up=stored(q3))


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_reference_with_grouped_heads_and_padding(dtype):
    from tformer.inference.kernels import decode_attention, use_decode_attention
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
    """A decode step (T = 1) and a verify-sized one (T new tokens a sequence), each with the cache
    split in two parts merged by the last to finish: RoPE, cache write and causal attention over
    the cache in one kernel, against RoPE, the cache update and the reference attention."""
    _check_cached_attention(dtype, "cpu", T)


def _check_cached_attention(dtype, device, T):
    from tformer.config import RopeConfig
    from tformer.inference.kernels import cached_attention, use_cached_attention
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
    counts = merge_counters(device)
    got = cached_attention(qkv, (cos, sin), k_cache, v_cache, slots, mask, H, counts=counts)
    assert got.shape == (B, T, H * D) and got.dtype == dtype
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got.float(), want.transpose(1, 2).reshape(B, T, H * D), **tol)
    future = mask.clone()
    future[..., 66 + T:] = True  # slots after the last new token (NaN): never read, whatever the mask says
    torch.testing.assert_close(cached_attention(qkv, (cos, sin), k_cache, v_cache, slots, future, H, counts=counts), got,
                               rtol=0, atol=0)
    # RoPE in fp32, rounded once (the module rounds each bf16 op): an ulp or so apart in bf16
    torch.testing.assert_close(k_cache[:, :, slots], k_want[:, :, slots], **tol)
    torch.testing.assert_close(v_cache[:, :, slots], v_want[:, :, slots], rtol=0, atol=0)
    # every count of finished splits is back at zero for the next call
    assert not counts.any()


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU")
def test_matvec_on_cuda_matches_dequantized_reference():
    pytest.importorskip("triton")
    from tformer.inference.kernels import matvec
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
            cases["float whole rows"] = (matvec(x, w, whole_rows=True), w)
            cases["int8 whole rows"] = (matvec(x, q8, s8, fmt="int8", whole_rows=True), dequantize_int8(q8, s8))
            cases["int4"] = (matvec(x, p4, s4, z4, fmt="int4", group_size=64), dequantize_int4(p4, s4, z4, 64))
            cases["int4 whole rows"] = (matvec(x, p4, s4, z4, fmt="int4", group_size=64, whole_rows=True),
                                        dequantize_int4(p4, s4, z4, 64))
        for fmt, (y, w_ref) in cases.items():
            ref = x.float() @ w_ref.float().T
            err = ((y.float() - ref).norm() / ref.norm()).item()
            assert y.dtype == torch.bfloat16 and err < 5e-3, (fmt, n, k, rows, err)


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU")
def test_cached_attention_on_cuda_matches_reference():
    pytest.importorskip("triton")
    for T in (1, 4):
        _check_cached_attention(torch.bfloat16, "cuda", T)
