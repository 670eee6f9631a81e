"""Matrix-vector products for batch-1 decoding: y = W x with a bf16, int8 or int4 weight (Triton).

At batch 1 a decode step reads every weight once and does two FLOPs per weight, so the only
thing that matters is streaming W from memory at full bandwidth and dequantizing it in
registers. A decode engine routes its linear layers' few-row forwards here through the
`tformer.inference.kernels.linear` classes (int4 ones unless EngineOptions(int4="tinygemm") keeps
PyTorch's tinygemm). The weight formats are exactly the ones tformer stores (no repacking):

    bf16/fp16 W (N, K)
    int8      q (N, K) int8, scales (N,)                 w = q * s
    int4      packed (N, K/2) uint8, scales/zeros (N, K/g)  w = (q - 8) * s + z,
              byte j = q[2j] << 4 | q[2j+1]   (tformer.quantize.int4)

Shapes: x (K,), W (N, K) -> y (N,). A program owns BLOCK_N rows and walks K in steps of BLOCK_K
columns (whole int4 groups, so each group's scale and zero are loaded once per row), accumulating
in fp32; the tiles are autotuned per (format, N, K) (`tuned`; TFORMER_TUNE=0 takes a default).
Each row is summed by one program: at one row of x, splitting K costs a merge and gains nothing.
2 to MAX_ROWS rows of x go to the tensor-core kernel in tformer.inference.kernels.rows.

Quantized codes become floats without int-to-float conversions (a quarter-rate instruction on
the H100): a code u >= 0 ORed into the bits 0x4B000000 is the float 2^23 + u exactly, and one
subtraction removes 2^23 and the code's offset (`kernels.base._code`; int8 codes are offset by 128
first; the few-row kernel's int8 tiles use it too). A group's int4 scale and zero are applied to
partial sums rather than to each weight: sum(((q - 8) s + z) x) = s sum((q - 8) x) + z sum(x).
An int4 tile's nibbles are interleaved back into column order in registers (`tl.join` + reshape),
so the tile has int8's layout and x loads contiguously (splitting x into even and odd columns
instead makes the compiler move whole tiles through shared memory). Timings: BENCHMARKS.md.

Around the product the kernel can fuse what surrounds a weight in a pre-norm decoder block
(tformer.inference.fused): RMSNorm of x (each program sums x^2 itself, x being a few KB), a bias,
a residual add, and a gated FFN's second weight with silu(W x) * (W2 x), rounding as the README
says (tformer/inference/README.md). Before its programmatic-dependent-launch wait a program loads
its first weight tile, int8's row scales and, with `residual_early`, the residual (README.md).

`matvec` is a torch custom op, so a compiled, CUDA-graphed decode step calls it as one kernel.
With TRITON_INTERPRET=1 the same kernel runs on CPU tensors (how the tests check it without a GPU).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from tformer.inference.kernels.base import DEVICE_TYPE, INTERPRET, triton, tuned, use_pdl
from tformer.inference.kernels.inductor import bound_operator_str
from tformer.inference.kernels.rows import MAX_ROWS, rows_matvec

FORMATS = {"float": 0, "int8": 1, "int4": 2}


def use_matvec(x: torch.Tensor, in_features: int, fmt: str = "float") -> bool:
    """Whether a layer with `in_features` inputs and weights in `fmt` should send x through `matvec`:
    at most `max_rows(fmt)` rows of x, on the kernel's device, and no gradient wanted (the kernel
    has no backward)."""
    return (x.device.type == DEVICE_TYPE and 0 < x.numel() <= max_rows(fmt) * in_features
            and not (torch.is_grad_enabled() and x.requires_grad))


def max_rows(fmt: str) -> int:
    """Rows of x that `matvec` takes for weights in `fmt`: MAX_ROWS, but one for int4 (several rows
    of an int4 layer are tinygemm's on CUDA)."""
    return 1 if fmt == "int4" else MAX_ROWS


if triton is not None:
    import triton.language as tl

    from tformer.inference.kernels.base import _code, _configs, _load_x, _wait_for_previous_kernel, _weight

    @triton.jit
    def _weight_tile(w_ptr, rows, k0, K, FMT: tl.constexpr, BLOCK_K: tl.constexpr):
        """Columns k0..k0+BLOCK_K-1 of weight rows `rows` as stored: elements (full precision, int8) or
        the bytes that hold them (int4: BLOCK_K / 2 of them)."""
        if FMT == 2:  # one return: the compiler takes a constexpr branch's return as the function's type
            cols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            width = K // 2
        else:
            cols = k0 + tl.arange(0, BLOCK_K)
            width = K
        return tl.load(w_ptr + rows[:, None] * width + cols[None, :], mask=(cols < width)[None, :], other=0)

    @triton.jit
    def _int4_tile(b, x_ptr, nw_ptr, inv_rms, s_ptr, z_ptr, rows, k0, K, GROUP: tl.constexpr, NORM: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """(BLOCK_N, BLOCK_K / GROUP) fp32: each group's sum of w x over columns k0..k0+BLOCK_K-1, from
        the tile's bytes b (BLOCK_N, BLOCK_K / 2). Byte j holds columns 2j (high nibble) and 2j+1 (low);
        the nibbles are interleaved back into column order in registers (join + reshape), so the tile
        is laid out as int8's; a group's scale and zero apply to its partial sums."""
        NG: tl.constexpr = BLOCK_K // GROUP
        cols = k0 + tl.arange(0, BLOCK_K)
        b = b.to(tl.int32)
        q = tl.join(b >> 4, b & 15).reshape(BLOCK_N, BLOCK_K)  # codes in column order
        x = _load_x(x_ptr, nw_ptr, cols, cols < K, inv_rms, NORM)
        part = tl.sum((_code(q, 8) * x[None, :]).reshape(BLOCK_N, NG, GROUP), axis=2)  # sum (q - 8) x
        x_sum = tl.sum(x.reshape(NG, GROUP), axis=1)
        g = k0 // GROUP + tl.arange(0, NG)[None, :]  # (1, NG)
        g_ok = g < K // GROUP  # whole groups in or out
        s = tl.load(s_ptr + rows[:, None] * (K // GROUP) + g, mask=g_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rows[:, None] * (K // GROUP) + g, mask=g_ok, other=0.0).to(tl.float32)
        return part * s + z * x_sum[None, :]  # sum ((q - 8) s + z) x over each group

    @triton.jit
    def _tile_sum(w, x_ptr, nw_ptr, inv_rms, s_ptr, z_ptr, rows, k0, K, FMT: tl.constexpr, GROUP: tl.constexpr,
                  NORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One weight tile w (`_weight_tile` at k0) times x, dequantized in registers, unsummed: (BLOCK_N,
        BLOCK_K) products, or int4's (BLOCK_N, BLOCK_K / GROUP) group sums (`_int4_tile`)."""
        if FMT == 2:  # one return, as in `_weight_tile`
            part = _int4_tile(w, x_ptr, nw_ptr, inv_rms, s_ptr, z_ptr, rows, k0, K, GROUP, NORM, BLOCK_N, BLOCK_K)
        else:  # bf16/fp16/fp32, or int8 codes (its per-row scale is applied once, by `_rows_dot`)
            cols = k0 + tl.arange(0, BLOCK_K)
            part = _weight(w, FMT) * _load_x(x_ptr, nw_ptr, cols, cols < K, inv_rms, NORM)[None, :]
        return part

    @triton.jit
    def _rows_dot(x_ptr, nw_ptr, inv_rms, w_ptr, s_ptr, z_ptr, rows, K, w_first, row_scale,
                  FMT: tl.constexpr, GROUP: tl.constexpr, NORM: tl.constexpr, PREFETCHED: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """(BLOCK_N,) fp32 dot products of weight rows `rows` with x, dequantized in registers.
        PREFETCHED: w_first holds the first tile (`_weight_tile` at column 0). row_scale: int8's per-row
        scales (`_row_scales`), loaded by the caller before the wait."""
        if FMT == 2:
            acc = tl.zeros((BLOCK_N, BLOCK_K // GROUP), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        start = 0
        if PREFETCHED:
            acc += _tile_sum(w_first, x_ptr, nw_ptr, inv_rms, s_ptr, z_ptr, rows, 0, K, FMT, GROUP, NORM,
                             BLOCK_N, BLOCK_K)
            start = BLOCK_K
        for k0 in range(start, K, BLOCK_K):
            w = _weight_tile(w_ptr, rows, k0, K, FMT, BLOCK_K)
            acc += _tile_sum(w, x_ptr, nw_ptr, inv_rms, s_ptr, z_ptr, rows, k0, K, FMT, GROUP, NORM, BLOCK_N, BLOCK_K)
        y = tl.sum(acc, axis=1)
        if FMT == 1:
            y = y * row_scale
        return y

    @triton.jit
    def _row_scales(s_ptr, rows, FMT: tl.constexpr):
        """int8's per-row scales of `rows` in fp32 (other formats: 0, unused)."""
        scale = 0.0
        if FMT == 1:
            scale = tl.load(s_ptr + rows).to(tl.float32)
        return scale

    @triton.jit
    def _inv_rms(x_ptr, K, eps, X_BLOCK: tl.constexpr):
        """RMSNorm's 1 / rms(x) for x (K,), summed in fp32 by every program itself (x is a few KB, read
        from L2: no extra kernel); X_BLOCK >= K loads x in one round trip."""
        sq = tl.zeros((X_BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, X_BLOCK):
            cols = k0 + tl.arange(0, X_BLOCK)
            x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            sq += x * x
        return tl.rsqrt(tl.sum(sq, axis=0) / K + eps)

    @triton.jit
    def _matvec_kernel(x_ptr, nw_ptr, w_ptr, s_ptr, z_ptr, w2_ptr, s2_ptr, z2_ptr, b_ptr, r_ptr, out_ptr,
                       N, K, eps, FMT: tl.constexpr, GROUP: tl.constexpr, NORM: tl.constexpr,
                       GATED: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, EARLY_R: tl.constexpr,
                       PDL: tl.constexpr, X_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One program: BLOCK_N rows of y. Before the PDL wait it loads what no kernel of the step writes
        (the first weight tiles, int8's row scales) and, with EARLY_R, the residual (`matvec`'s
        residual_early)."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        row_ok = rows < N
        rows = tl.where(row_ok, rows, 0)  # the tail reads row 0 and stores nothing
        dtype = out_ptr.dtype.element_ty
        w_first = 0
        w2_first = 0
        if PDL:  # the weights' first tiles before the wait
            w_first = _weight_tile(w_ptr, rows, 0, K, FMT, BLOCK_K)
            if GATED:
                w2_first = _weight_tile(w2_ptr, rows, 0, K, FMT, BLOCK_K)
        scale = _row_scales(s_ptr, rows, FMT)
        scale2 = _row_scales(s2_ptr, rows, FMT if GATED else 0)
        r = 0.0
        if RESIDUAL and EARLY_R:  # L2, not a stale L1 line: the buffer is rewritten every step
            r = tl.load(r_ptr + rows, cache_modifier=".cg").to(tl.float32)
        _wait_for_previous_kernel(PDL)
        inv_rms = 1.0
        if NORM:
            inv_rms = _inv_rms(x_ptr, K, eps, X_BLOCK)
        y = _rows_dot(x_ptr, nw_ptr, inv_rms, w_ptr, s_ptr, z_ptr, rows, K, w_first, scale, FMT, GROUP, NORM, PDL,
                      BLOCK_N, BLOCK_K)
        if GATED:  # silu(W x) * (W2 x), each rounded as the unfused modules round them
            up = _rows_dot(x_ptr, nw_ptr, inv_rms, w2_ptr, s2_ptr, z2_ptr, rows, K, w2_first, scale2, FMT, GROUP,
                           NORM, PDL, BLOCK_N, BLOCK_K)
            gate = y.to(dtype).to(tl.float32)
            gate = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
            y = gate * up.to(dtype).to(tl.float32)
        if BIAS:
            y = y.to(dtype).to(tl.float32) + tl.load(b_ptr + rows).to(tl.float32)
        if RESIDUAL:
            if not EARLY_R:
                r = tl.load(r_ptr + rows).to(tl.float32)
            y = r + y.to(dtype).to(tl.float32)
        tl.store(out_ptr + rows, y.to(dtype), mask=row_ok)


    # (BLOCK_N, BLOCK_K, warps): 1-4 KB of weight per row and step, a few rows per program
    _KEY = ["N", "K", "GROUP", "NORM", "GATED", "PDL"]
    _TUNED = {
        0: tuned(_configs([(2, 1024, 4), (4, 512, 4), (4, 1024, 8), (8, 256, 4), (8, 512, 4), (16, 256, 4),
                           (16, 512, 8)]), _KEY)(_matvec_kernel),
        1: tuned(_configs([(2, 2048, 4), (4, 1024, 4), (4, 2048, 8), (8, 512, 4), (8, 1024, 4), (16, 512, 4),
                           (16, 1024, 8)]), _KEY)(_matvec_kernel),
        2: tuned(_configs([(4, 1024, 4), (4, 2048, 8), (8, 512, 4), (8, 1024, 4), (16, 256, 4), (16, 512, 8),
                           (32, 256, 8)]), _KEY)(_matvec_kernel),
    }

    # whole rows (BLOCK_K = K rounded up to a power of two): a program's weights all load before its
    # PDL wait, 4-32 KB of them (int4: up to 16 KB), so a product after a short kernel reads its weights
    # during that kernel
    def _whole(max_weights: int):
        tiles = [(bn, bk, 8 if bn * bk >= 8192 else 4) for bk in (64, 128, 256, 512, 1024, 2048, 4096)
                 for bn in (1, 2, 4, 8, 16, 32, 64) if 2048 <= bn * bk <= max_weights]
        return _configs(tiles, stages=(1,))

    def _whole_rows_only(configs, named_args, **kwargs):
        return [c for c in configs if c.kwargs["BLOCK_K"] == triton.next_power_of_2(named_args["K"])]

    _WHOLE_ROWS = {fmt: tuned(_whole(max_weights), _KEY, prune=_whole_rows_only)(_matvec_kernel)
                   for fmt, max_weights in ((0, 16384), (1, 32768), (2, 32768))}
    WHOLE_ROWS_K = (64, 4096)  # the K that whole-row tiles cover


@torch.library.custom_op("tformer::matvec", mutates_args=())
def matvec_op(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None, zeros: torch.Tensor | None,
              fmt: int, group_size: int, weight2: torch.Tensor | None = None, scales2: torch.Tensor | None = None,
              zeros2: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
              bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
              whole_rows: bool = False, residual_early: bool = False, counts: torch.Tensor | None = None,
              pdl: bool = False) -> torch.Tensor:
    """(M, N) in x.dtype, accumulated in fp32. x (M, K) contiguous, M <= MAX_ROWS; residual (M, N)
    contiguous; the optional parts as in `matvec`; pdl already resolved (`use_pdl`)."""
    (M, K), N = x.shape, weight.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    s, z = (t if t is not None else weight for t in (scales, zeros))
    w2, s2, z2 = (t if t is not None else weight for t in (weight2, scales2, zeros2))
    nw, b, r = (t if t is not None else x for t in (norm_weight, bias, residual))
    flags = (norm_weight is not None, weight2 is not None, bias is not None, residual is not None, pdl)
    if M > 1:
        return rows_matvec(x, nw, weight, s, z, w2, s2, z2, b, r, out, M, N, K, eps, fmt, group_size, flags, pdl,
                           counts)
    args = (x, nw, weight, s, z, w2, s2, z2, b, r, out, N, K, eps, fmt, group_size, *flags[:4],
            residual_early, pdl, min(triton.next_power_of_2(K), 8192))
    if INTERPRET:  # one fixed tile: the interpreter cannot time configurations
        _matvec_kernel[(triton.cdiv(N, 4),)](*args, BLOCK_N=4, BLOCK_K=max(128, group_size))
    else:
        whole = whole_rows and pdl and fmt in _WHOLE_ROWS and WHOLE_ROWS_K[0] <= K <= WHOLE_ROWS_K[1]
        (_WHOLE_ROWS if whole else _TUNED)[fmt][lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, launch_pdl=pdl)
    return out


@matvec_op.register_fake
def _(x, weight, scales, zeros, fmt, group_size, weight2=None, scales2=None, zeros2=None, norm_weight=None,
      eps=0.0, bias=None, residual=None, whole_rows=False, residual_early=False, counts=None, pdl=False):
    bound_operator_str()  # before inductor lowers this op (tformer.inference.kernels.inductor)
    return x.new_empty(x.shape[0], weight.shape[0])


class StoredWeight(NamedTuple):
    """A linear layer's weight in one of the FORMATS, as the kernel reads it (see the module docstring)."""

    weight: torch.Tensor
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    fmt: str = "float"
    group_size: int = 0


def matvec(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None,
           zeros: torch.Tensor | None = None, fmt: str = "float", group_size: int = 0, *,
           norm: tuple[torch.Tensor, float] | None = None, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, up: StoredWeight | None = None,
           whole_rows: bool = False, residual_early: bool = False, counts: torch.Tensor | None = None,
           pdl: bool | None = None) -> torch.Tensor:
    """x (..., K) with at most `max_rows(fmt)` rows in all -> (..., N) in x.dtype; W in one of the
    FORMATS (module docstring).

    The fusions a decoder block needs, rounded as tformer/inference/README.md says:
      norm=(weight, eps)  RMSNorm x first          bias      + bias
      residual (..., N)   + residual at the end    up        silu(W x) * (up x): a gated FFN's
                                                             gate and up weights (same format)

    whole_rows: for one row of x after a short kernel (attention, before its output projection), each
    program loads its rows of W whole before it waits for that kernel (PDL), so W streams in while
    the short kernel runs (64 <= K <= 4096 and PDL on; otherwise no effect).
    residual_early: the caller promises the residual was written at least two kernels back (in a
    decode block: wo's residual is the block's input, w2's is wo's output), so one row of x loads it
    before the PDL wait; a residual written by the previous kernel would be read stale.
    counts: int32 counters, zero between kernels, for a few-row product that splits K (`base.counters`;
    None: fresh ones). pdl: launch with programmatic dependent launch where the GPU has it (None:
    TFORMER_PDL's default). Invariants: tformer/inference/README.md.
    """
    K = x.shape[-1]
    M = x.numel() // K
    if not 0 < M <= max_rows(fmt):
        raise ValueError(f"matvec takes 1 to {max_rows(fmt)} rows of x for {fmt} weights, got x of shape "
                         f"{tuple(x.shape)}")
    weights = [weight] + ([up.weight] if up is not None else [])
    if not all(w.is_contiguous() for w in weights):
        raise ValueError("matvec reads the weight row by row: pass a contiguous weight (weight.contiguous())")
    if up is not None and (up.fmt, up.group_size, up.weight.shape) != (fmt, group_size, weight.shape):
        raise ValueError("matvec's gate and up weights must have the same format, group size and shape")
    norm_weight, eps = norm if norm is not None else (None, 0.0)
    up = up or StoredWeight(None)
    N = weight.shape[0]
    residual = None if residual is None else residual.reshape(M, N).contiguous()
    y = matvec_op(x.reshape(M, K).contiguous(), weight, scales, zeros, FORMATS[fmt], group_size,
                  up.weight, up.scales, up.zeros, norm_weight, float(eps), bias, residual, whole_rows,
                  residual_early, counts, use_pdl(x.device, pdl))
    return y.reshape(*x.shape[:-1], N)
