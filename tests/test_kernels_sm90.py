"""The Triton kernels compile for the H100 (sm_90) on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1, tests/test_kernels.py) runs the kernels' Python, so it accepts
code that Triton's compiler refuses: an early return of another shape in a constexpr branch, a
branch only the PDL path takes (the interpreter launches without it). Here the compiler itself
lowers the kernels' GPU-only variants to a cubin, ahead of time, as a launch on the H100 would.
"""

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402

from tformer.kernels import gemv  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)


FLOATS = {"eps", "scale", "inv_t"}  # the kernels' fp32 scalar arguments; the other scalars are int32


def compile_kernel(fn, pointer_types: dict[str, str], constexprs: dict):
    """fn compiled for sm_90 down to its cubin: pointers bf16 unless `pointer_types` says otherwise."""
    signature = {n: "constexpr" if n in constexprs else pointer_types.get(n, "*bf16") if n.endswith("_ptr")
                 else "fp32" if n in FLOATS else "i32" for n in fn.arg_names}
    try:
        return triton.compile(triton.compiler.ASTSource(fn, signature, constexprs), target=SM90)
    except RuntimeError as e:  # a Triton without the NVIDIA toolchain (ptxas) cannot make the cubin
        if "ptxas" in str(e):
            pytest.skip(f"no ptxas: {e}")
        raise


@pytest.mark.parametrize("fmt,gated,norm,residual,block", [
    (0, True, True, False, (8, 512)),
    (1, True, True, False, (8, 1024)),
    (1, False, False, True, (16, 2048)),  # a whole-row tile after attention
    (2, True, True, False, (8, 1024)),
    (2, False, False, True, (16, 2048)),
])
def test_matvec_compiles_for_sm90_with_pdl(fmt, gated, norm, residual, block):
    weight = {0: "*bf16", 1: "*i8", 2: "*u8"}[fmt]
    constexprs = dict(FMT=fmt, GROUP=64 if fmt == 2 else 0, NORM=norm, GATED=gated, BIAS=False, RESIDUAL=residual,
                      EARLY_R=residual, PDL=True, X_BLOCK=2048, BLOCK_N=block[0], BLOCK_K=block[1])
    assert compile_kernel(gemv._matvec_kernel, {"w_ptr": weight, "w2_ptr": weight}, constexprs).asm["cubin"]


@pytest.mark.parametrize("swap,split_k,fmt", [(0, 1, 0), (1, 2, 0), (1, 4, 1), (0, 2, 1)])
def test_rows_kernel_compiles_for_sm90_with_pdl(swap, split_k, fmt):
    from tformer.kernels import rows

    weight = "*i8" if fmt == 1 else "*bf16"
    types = {"w_ptr": weight, "w2_ptr": weight, "ws_ptr": "*fp32", "count_ptr": "*i32"}
    block_n = 64 if swap else 16
    constexprs = dict(FMT=fmt, GROUP=0, NORM=True, GATED=True, BIAS=False, RESIDUAL=False, PDL=True, ROWS=16,
                      BLOCK_N=block_n, BLOCK_K=128, SPLIT_K=split_k, SWAP=swap)
    assert compile_kernel(rows._rows_kernel, types, constexprs).asm["cubin"]


@pytest.mark.parametrize("splits", [1, 8])
def test_cached_attention_compiles_for_sm90_with_pdl(splits):
    from tformer.kernels import fused_attention as fa

    types = {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "pos_ptr": "*i64", "m_ptr": "*i64", "ws_ptr": "*fp32",
             "count_ptr": "*i32"}
    one = dict(D=64, BLOCK_D=64, BLOCK_S=64, SPLITS=splits, PDL=True)
    assert compile_kernel(fa._cached_attention_kernel, types, one).asm["cubin"]
    assert compile_kernel(fa._cached_attention_rows_kernel, types, {**one, "ROWS": 32, "NEW": 16}).asm["cubin"]


def test_topk_sampling_kernels_compile_for_sm90_with_pdl():
    from tformer.kernels import sampling

    types = {"count_ptr": "*i32", "seed_ptr": "*i64", "step_ptr": "*i64", "out_ptr": "*i64"}
    for p in range(2):
        assert compile_kernel(sampling._digit_kernel, types, dict(BITS=16, PASS=p, PDL=True, BLOCK=1024)).asm["cubin"]
    for step in (False, True):  # seeds drawn for the call, or the kept seeds mixed with a step
        draw = dict(PROGRAMS=126, BITS=16, STEP=step, PDL=True, BLOCK=1024)
        assert compile_kernel(sampling._draw_kernel, types, draw).asm["cubin"]


def test_record_kernel_compiles_for_sm90_with_pdl():
    from tformer.kernels import record

    types = {n: "*i64" for n in record._record_kernel.arg_names if n.endswith("_ptr")}
    assert compile_kernel(record._record_kernel, types, dict(PDL=True, BLOCK_B=1)).asm["cubin"]
