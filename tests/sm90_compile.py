"""tformer's Triton kernels compiled for the H100 (sm_90) by Triton's own compiler, no GPU needed.

The interpreter (TRITON_INTERPRET=1, tests/test_kernels.py) runs the kernels' Python, so it accepts
code that the compiler refuses or lowers differently: a loop-carried variable that changes type, an
early return of another shape in a constexpr branch, a GDC call or an atomic that only the PDL path
takes. Here every variant in CASES goes through Triton's IR, LLVM and ptxas (shipped with Triton)
to a cubin, with programmatic dependent launch on, and its PTX is checked for the instructions the
variant must (or must not) contain.

Run as its own process (tests/test_kernels_sm90.py does), which turns the interpreter off:

    python -m tests.sm90_compile

Every case must also hold the PDL wait and give a cubin. It prints one JSON object, case name ->
"ok" or what went wrong, or {"skip": reason} where this Triton cannot compile for sm_90 (none
installed, older than 3.9, no ptxas), and exits 0 when every case is ok or it skips. Nothing here
imports Triton before `main`, so CASES can be read anywhere.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

FLOATS = {"eps", "scale", "inv_t"}  # the kernels' fp32 scalar arguments; the other scalars are int32
MERGE = "atom.global.gpu.acq_rel.add"  # a merge counter (tformer/inference/README.md)
WAIT = "griddepcontrol.wait"  # the PDL wait: every case compiles with PDL=True


@dataclass(frozen=True)
class Case:
    kernel: str  # "module._kernel" under tformer.inference.kernels
    constexprs: dict
    types: dict = field(default_factory=dict)  # pointer types other than *bf16
    expect: dict = field(default_factory=dict)  # PTX text (or a tuple: any of them) -> whether it occurs


def _flags(c: dict) -> str:
    return "+".join(f.lower() for f in ("NORM", "GATED", "BIAS", "RESIDUAL", "EARLY_R") if c.get(f)) or "plain"


def _matvec(fmt, group, norm, gated, bias, residual, early_r, block_n, block_k) -> tuple[str, Case]:
    weight = {0: "*bf16", 1: "*i8", 2: "*u8"}[fmt]
    c = dict(FMT=fmt, GROUP=group, NORM=norm, GATED=gated, BIAS=bias, RESIDUAL=residual, EARLY_R=early_r, PDL=True,
             X_BLOCK=2048, BLOCK_N=block_n, BLOCK_K=block_k)
    name = f"matvec fmt={fmt} {_flags(c)} {block_n}x{block_k}"
    return name, Case("gemv._matvec_kernel", c, {"w_ptr": weight, "w2_ptr": weight})


def _rows(fmt, group, bias_residual, block_n, split_k, swap) -> tuple[str, Case]:
    """Several rows on tensor cores: K whole or split (merged after a count), summed as x W^T or, with
    SWAP, as W x^T (from 64 weight rows: Hopper's warpgroup MMA)."""
    weight = "*i8" if fmt == 1 else "*bf16"
    c = dict(FMT=fmt, GROUP=group, NORM=True, GATED=True, BIAS=bias_residual, RESIDUAL=bias_residual, PDL=True,
             ROWS=16, BLOCK_N=block_n, BLOCK_K=128, SPLIT_K=split_k, SWAP=swap)
    types = {"w_ptr": weight, "w2_ptr": weight, "ws_ptr": "*fp32", "count_ptr": "*i32"}
    name = f"rows fmt={fmt} {_flags(c)} 16x{block_n}x128 split_k={split_k}" + " swap" * swap
    return name, Case("rows._rows_kernel", c, types, {MERGE: split_k > 1, "wgmma.mma_async": bool(swap)})


def _attention(rows: bool, splits, cos, mask) -> tuple[str, Case]:
    """Split softmax states merged by the last split to finish (SPLITS > 1)."""
    c = dict(D=64, BLOCK_D=64, BLOCK_S=64, SPLITS=splits, PDL=True) | (dict(ROWS=32, NEW=16) if rows else {})
    types = {"cos_ptr": cos, "sin_ptr": cos, "pos_ptr": "*i64", "m_ptr": mask, "ws_ptr": "*fp32", "count_ptr": "*i32"}
    kernel = "_cached_attention_rows_kernel" if rows else "_cached_attention_kernel"
    name = f"{kernel[1:-7]} splits={splits} cos={cos[1:]} mask={mask[1:]}"
    return name, Case(f"fused_attention.{kernel}", c, types, {MERGE: splits > 1})


def _sampling(kernel, logits, bits, **c) -> tuple[str, Case]:
    """The top-k sampler: digits counted into histograms (atomics), then the race, whose last program
    (a count) writes the packed (score, token) max."""
    types = {"x_ptr": logits, "seed_ptr": "*i64", "step_ptr": "*i64", "count_ptr": "*i32", "out_ptr": "*i64"}
    if kernel == "digit":
        name, expect = f"digit bits={bits} pass={c['PASS']}", {("red.global", "atom.global"): True}
    else:
        c = dict(PROGRAMS=126) | c
        name, expect = f"draw bits={bits}" + ("" if c["STEP"] else " no_step"), {MERGE: True, "max.u64": True}
    return name, Case(f"sampling._{kernel}_kernel", dict(BITS=bits, PDL=True, BLOCK=1024) | c, types, expect)


def _cases() -> dict[str, Case]:
    every = (True, True, True, True)  # NORM, GATED, BIAS, RESIDUAL
    pairs = [_matvec(fmt, 64, *every, early, 4, 512) for fmt in (0, 1, 2) for early in (False, True)]
    pairs += [_matvec(fmt, group, *flags, block_n, block_k) for fmt, group, flags, block_n, block_k in (
        (0, 0, (True, True, False, False, False), 8, 512), (1, 0, (True, True, False, False, False), 8, 1024),
        (1, 0, (False, False, False, True, True), 16, 2048),  # a whole-row tile after attention
        (2, 64, (True, True, False, False, False), 8, 1024), (2, 64, (False, False, False, True, True), 16, 2048))]
    pairs += [_rows(fmt, 64, True, 32 << swap, split_k, swap)
              for fmt in (0, 1) for split_k, swap in ((1, 0), (4, 0), (4, 1))]
    pairs += [_rows(fmt, 0, False, 64 if swap else 16, split_k, swap)
              for swap, split_k, fmt in ((0, 1, 0), (1, 2, 0), (1, 4, 1), (0, 2, 1))]
    pairs += [_attention(rows, splits, cos, mask) for rows in (False, True) for splits, cos, mask in (
        (1, "*bf16", "*i1"), (4, "*bf16", "*i1"), (1, "*fp32", "*i64"), (8, "*fp32", "*i64"))]
    pairs += [_sampling("digit", logits, bits, PASS=p) for logits, bits in (("*bf16", 16), ("*fp32", 32))
              for p in (0, 1)]
    pairs += [_sampling("draw", "*bf16", 16, STEP=False),  # seeds drawn for the call, or mixed with a step
              _sampling("draw", "*bf16", 16, STEP=True), _sampling("draw", "*fp32", 32, STEP=True)]
    pairs.append(("record", Case("record._record_kernel", dict(PDL=True, BLOCK_B=1),
                                 {n: "*i64" for n in ("nxt_ptr", "token_ptr", "pos_ptr", "history_ptr", "n_ptr")})))
    cases = dict(pairs)
    assert len(cases) == len(pairs), "two cases share a name"
    return cases


CASES = _cases()


def compile_case(case: Case):
    """case.kernel compiled for sm_90 down to its cubin, launched with PDL, four warps."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    module, name = case.kernel.split(".")
    fn = getattr(importlib.import_module(f"tformer.inference.kernels.{module}"), name)
    signature = {n: "constexpr" if n in case.constexprs else case.types.get(n, "*bf16") if n.endswith("_ptr")
                 else "fp32" if n in FLOATS else "i32" for n in fn.arg_names}
    source = triton.compiler.ASTSource(fn, signature, case.constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "launch_pdl": True})


def check(case: Case) -> str:
    """"ok", or why the case's compile or its PTX is wrong."""
    try:
        kernel = compile_case(case)
    except Exception as e:  # noqa: BLE001 - every failure is reported by name
        return f"{type(e).__name__}: {e}"
    ptx = kernel.asm["ptx"]
    wrong = [] if kernel.asm.get("cubin") else ["no cubin"]
    for text, wanted in {WAIT: True, **case.expect}.items():
        if any(t in ptx for t in ((text,) if isinstance(text, str) else text)) != wanted:
            wrong.append(f"PTX {'lacks' if wanted else 'has'} {text!r}")
    return "; ".join(wrong) or "ok"


def _check_quietly(name: str) -> str:
    with contextlib.redirect_stdout(sys.stderr):  # stdout holds the JSON alone
        return check(CASES[name])


def skip_reason() -> str | None:
    """Why this environment cannot compile for sm_90, or None."""
    try:
        import triton
    except ImportError:
        return "Triton is not installed"
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 9):
        return (f"written against Triton 3.9's compiler API, not {triton.__version__}; "
                "on a GPU the CUDA tests compile the kernels")
    try:  # Triton 3.9's lookup; were it to move, the compiles report a missing ptxas themselves
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:
        return None
    try:
        get_ptxas(90).path
    except RuntimeError as e:
        return f"no ptxas for sm_90 in this Triton install: {e}"
    return None


def main() -> int:
    os.environ["TRITON_INTERPRET"] = "0"  # before Triton is imported, here and in the workers: the compiler
    reason = skip_reason()
    if reason is not None:
        print(json.dumps({"skip": reason}))
        return 0
    # LLVM and ptxas take most of a minute of CPU for all cases: one process a core (spawned, not forked
    # from a process whose Triton may hold threads)
    workers = min(len(CASES), os.cpu_count() or 1)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = dict(zip(CASES, pool.map(_check_quietly, CASES)))
    print(json.dumps(results))  # one line: the last of stdout
    return 0 if all(r == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
