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


def compile_sm90(fn, pointers: dict[str, str], scalars: dict[str, str], constexprs: dict):
    signature = {name: pointers.get(name) or scalars.get(name) or "constexpr" for name in fn.arg_names}
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
    pointers = {name: "*bf16" for name in gemv._matvec_kernel.arg_names if name.endswith("_ptr")}
    pointers.update(w_ptr=weight, w2_ptr=weight)
    constexprs = dict(FMT=fmt, GROUP=64 if fmt == 2 else 0, NORM=norm, GATED=gated, BIAS=False, RESIDUAL=residual,
                      PDL=True, BLOCK_N=block[0], BLOCK_K=block[1])
    kernel = compile_sm90(gemv._matvec_kernel, pointers, {"N": "i32", "K": "i32", "eps": "fp32"}, constexprs)
    assert kernel.asm["cubin"]
