"""tformer's Triton kernels compile for an H100 (sm_90) on a machine without a GPU.

The interpreter (tests/test_kernels.py) checks what the kernels compute, not whether the
compiler takes them: a loop-carried variable that changes type, a GDC call or an atomic that a
backend rejects only fails on the GPU. Here Triton's own compiler takes each kernel through its
IR, LLVM and ptxas (shipped with Triton) for sm_90, with programmatic dependent launch on.
"""

import os

import pytest

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiles kernels; the interpreter run is tests/test_kernels.py", allow_module_level=True)
if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 9):
    pytest.skip("written against Triton 3.9's compiler API; on a GPU the CUDA tests compile the kernels",
                allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tformer.kernels import fused_attention, gemv, rows, sampling  # noqa: E402

ACTIVATIONS = ("qkv_ptr", "cos_ptr", "sin_ptr", "k_ptr", "v_ptr", "out_ptr")
MATVEC_PTRS = ("x_ptr", "nw_ptr", "w_ptr", "w2_ptr", "b_ptr", "r_ptr", "out_ptr", "s_ptr", "z_ptr", "s2_ptr", "z2_ptr")


def _compile(fn, types: dict, constexprs: dict, **options):
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    try:
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, **options})
    except (FileNotFoundError, RuntimeError) as e:
        if "ptxas" in str(e) and "not found" in str(e).lower():
            pytest.skip(f"no ptxas in this Triton install: {e}")
        raise


@pytest.mark.parametrize("splits", [1, 4])
def test_cached_attention_compiles(splits):
    types = {**dict.fromkeys(ACTIVATIONS, "*bf16"), "pos_ptr": "*i64", "m_ptr": "*i1", "ws_ptr": "*fp32",
             "count_ptr": "*i32", "scale": "fp32"}
    kernel = _compile(fused_attention._cached_attention_kernel, types,
                      dict(D=64, BLOCK_D=64, BLOCK_S=64, SPLITS=splits, PDL=True), launch_pdl=True)
    ptx = kernel.asm["ptx"]
    assert "griddepcontrol.wait" in ptx
    assert ("atom.global.gpu.acq_rel.add" in ptx) == (splits > 1)  # the merge of split softmax states


@pytest.mark.parametrize("splits", [1, 4])
def test_cached_attention_rows_compiles(splits):
    types = {**dict.fromkeys(ACTIVATIONS, "*bf16"), "pos_ptr": "*i64", "m_ptr": "*i1", "ws_ptr": "*fp32",
             "count_ptr": "*i32", "scale": "fp32"}
    kernel = _compile(fused_attention._cached_attention_rows_kernel, types,
                      dict(D=64, BLOCK_D=64, BLOCK_S=64, ROWS=32, NEW=16, SPLITS=splits, PDL=True), launch_pdl=True)
    assert ("atom.global.gpu.acq_rel.add" in kernel.asm["ptx"]) == (splits > 1)


@pytest.mark.parametrize("fmt,weight", [(0, "*bf16"), (1, "*i8"), (2, "*u8")])
def test_matvec_compiles(fmt, weight):
    types = {**dict.fromkeys(MATVEC_PTRS, "*bf16"), "w_ptr": weight, "w2_ptr": weight, "eps": "fp32"}
    flags = dict(FMT=fmt, GROUP=64, NORM=True, GATED=True, BIAS=True, RESIDUAL=True, PDL=True)
    for early in (False, True):  # the residual loaded after the wait, or before it
        _compile(gemv._matvec_kernel, types, dict(flags, EARLY_R=early, X_BLOCK=2048, BLOCK_N=4, BLOCK_K=512),
                 launch_pdl=True)
    if fmt == 2:  # several rows of int4 are tinygemm's
        return
    types.update(ws_ptr="*fp32", count_ptr="*i32")
    for split_k, swap in ((1, 0), (4, 0), (4, 1)):  # several rows: tensor-core tiles, K whole or split (merged
        # after an atomic count), summed as x W^T or as W x^T (then on Hopper's warpgroup MMA)
        ptx = _compile(rows._rows_kernel, types, dict(flags, ROWS=16, BLOCK_N=32 << swap, BLOCK_K=128, SPLIT_K=split_k,
                                                      SWAP=swap), launch_pdl=True).asm["ptx"]
        assert ("atom.global.gpu.acq_rel.add" in ptx) == (split_k > 1)
        assert ("wgmma.mma_async" in ptx) == bool(swap)


@pytest.mark.parametrize("logits,bits", [("*bf16", 16), ("*fp32", 32)])
def test_topk_sample_compiles(logits, bits):
    types = {"x_ptr": logits, "seed_ptr": "*i64", "step_ptr": "*i64", "count_ptr": "*i32", "out_ptr": "*i64",
             "inv_t": "fp32"}
    for p in (0, 1):
        ptx = _compile(sampling._digit_kernel, types, dict(BITS=bits, PASS=p, PDL=True, BLOCK=1024),
                       launch_pdl=True).asm["ptx"]
        assert "griddepcontrol.wait" in ptx and ("red.global" in ptx or "atom.global" in ptx)
    ptx = _compile(sampling._draw_kernel, types, dict(PROGRAMS=126, BITS=bits, STEP=True, PDL=True, BLOCK=1024),
                   launch_pdl=True).asm["ptx"]
    assert "atom.global.gpu.acq_rel.add" in ptx and "max.u64" in ptx  # the count, the packed (score, token) max
