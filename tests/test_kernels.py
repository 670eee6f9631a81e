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
    assert "8 passed" in r.stdout, r.stdout[-2000:]  # the child ran the kernel tests


SHAPES = [(37, 320, 32), (37, 320, 64), (64, 2048, 64)]  # tails of rows and of K steps (interpreted: 128 a step)


@interpreted
@pytest.mark.parametrize("n,k,group", SHAPES)
def test_matvec_formats_match_dequantized_reference(n, k, group):
    from tformer.kernels import matvec
    from tformer.quantize import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8

    torch.manual_seed(0)
    w, x = torch.randn(n, k), torch.randn(1, k)
    q8, s8 = quantize_int8(w)
    p4, s4, z4 = quantize_int4(w, group)
    cases = {
        "float": (matvec(x, w), w),
        "int8": (matvec(x, q8, s8, fmt="int8"), dequantize_int8(q8, s8)),
        "int4": (matvec(x, p4, s4, z4, fmt="int4", group_size=group), dequantize_int4(p4, s4, z4, group)),
    }
    for fmt, (y, w_ref) in cases.items():
        assert y.shape == (1, n), fmt
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
def test_matvec_refuses_several_rows():
    from tformer.kernels import matvec

    with pytest.raises(ValueError, match="single row"):
        matvec(torch.randn(2, 64), torch.randn(8, 64))
    with pytest.raises(ValueError, match="contiguous"):
        matvec(torch.randn(1, 64), torch.randn(64, 8).T)


@interpreted
def test_quantized_layers_take_the_kernel_for_one_row_only():
    from tformer.kernels import use_matvec
    from tformer.quantize import Int4Linear, Int8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96, bias=True)
    x1 = torch.randn(1, 1, 128)
    assert use_matvec(x1, 128) and not use_matvec(x1.expand(2, 1, 128), 128)
    assert not use_matvec(x1.clone().requires_grad_(), 128)  # the kernel has no backward
    for q in (Int8Linear.from_linear(lin), Int4Linear.from_linear(lin, 64)):
        with torch.no_grad():
            kernel = q(x1)
            rows = q(x1.expand(2, 1, 128))  # two rows: the dequantizing F.linear path
        torch.testing.assert_close(kernel, rows[:1], rtol=1e-5, atol=1e-5, msg=type(q).__name__)


@interpreted
def test_with_matvec_swaps_full_precision_linears_in_place():
    from torch import nn

    from tformer.kernels import MatvecLinear, with_matvec, without_matvec

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 96, bias=True), nn.Linear(96, 32))
    weight = model[0].weight
    x1, x3 = torch.randn(1, 1, 128), torch.randn(3, 128)
    with torch.no_grad():
        want1, want3 = model(x1), model(x3)
        with_matvec(model)
        assert type(model[0]) is MatvecLinear and model[0].weight is weight
        torch.testing.assert_close(model(x1), want1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x3), want3)
    assert list(model.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert type(without_matvec(model)[0]) is nn.Linear


@interpreted
def test_compiled_model_keeps_the_kernel_in_one_graph():
    from tformer.config import ModelConfig
    from tformer.generate.engine import decode_step
    from tformer.generate.sampling import SamplingConfig
    from tformer.models import build_model
    from tformer.quantize import quantize_model

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=32,
                      tie_embeddings=False)
    model = quantize_model(build_model(cfg).eval(), "int4", group_size=32, skip=())
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
    for n, k in [(3072, 2048), (2048, 8192), (1000, 320)]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        q8, s8 = quantize_int8(w)
        p4, s4, z4 = quantize_int4(w, 64)
        cases = {
            "float": (matvec(x, w), w),
            "int8": (matvec(x, q8, s8, fmt="int8"), dequantize_int8(q8, s8)),
            "int4": (matvec(x, p4, s4, z4, fmt="int4", group_size=64), dequantize_int4(p4, s4, z4, 64)),
        }
        for fmt, (y, w_ref) in cases.items():
            ref = x.float() @ w_ref.float().T
            err = ((y.float() - ref).norm() / ref.norm()).item()
            assert y.dtype == torch.bfloat16 and err < 5e-3, (fmt, n, k, err)
