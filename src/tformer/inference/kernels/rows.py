"""Products for a few rows of x (2 to MAX_ROWS: a speculative verify, a small batch) on tensor cores.

    y (M, N) = x (M, K) W^T, full-precision or int8 W in its stored layout, M <= MAX_ROWS

the same fusions as `matvec`'s one-row kernel (tformer.inference.kernels.gemv): RMSNorm of x, a gated FFN's
second weight, bias, residual. x is padded to MAX_ROWS rows in registers (the tensor cores' least
tile), so a program owns at least 16 weight rows; for a 2048-row weight that is 128 programs, too
few to keep an H100's memory busy. So K can also be split over SPLIT_K programs (for weights of
fewer than SPLIT_K_BELOW rows, as many as give each SM two programs: `split_k`): each writes its
fp32 partial tile to a scratch buffer, and the last of a column block to finish (a merge counter,
tformer/inference/README.md) sums them and applies the epilogue, so it stays one kernel.
"""

from __future__ import annotations

import torch

from tformer.inference.kernels.base import INTERPRET, counters, triton, tuned

MAX_ROWS = 16  # rows of x the kernels take; more is a matmul for cuBLAS
MAX_SPLIT_K = 4
SPLIT_K_BELOW = 16384  # weights with fewer rows may split K (larger ones have programs enough)
_INTERPRETED_SPLIT_K = 2  # the interpreter runs one configuration: a split K, so tests cover the merge
_INTERPRETED_SWAP = 1  # and summed as W x^T (tests/test_kernels.py also runs it unswapped)

if triton is not None:
    import triton.language as tl

    from tformer.inference.kernels.base import (_configs, _dot_t, _last_to_finish, _norm_x, _wait_for_previous_kernel,
                                      _weight)

    @triton.jit
    def _operand(w, dtype, FMT: tl.constexpr):
        """A weight tile in x's dtype for the tensor cores (int8 through fp32: `_weight`, no int-to-float
        conversion; its codes are exact in x's dtype)."""
        if FMT == 1:
            w = _weight(w, FMT)
        return w.to(dtype)

    @triton.jit
    def _dot_rows(x, w, SWAP: tl.constexpr):
        """x (ROWS, BLOCK_K) times w (BLOCK_N, BLOCK_K)^T, or with SWAP its transpose, w x^T."""
        if SWAP:
            d = _dot_t(w, x)
        else:
            d = _dot_t(x, w)
        return d

    @triton.jit
    def _tile_dots(x_rows, m_ok, nw_ptr, inv_rms, w_ptr, s_ptr, w2_ptr, s2_ptr, n, lo, hi, K, dtype,
                   FMT: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr):
        """(ROWS, BLOCK_N) fp32 products over columns lo..hi-1 of the x rows starting at x_rows (ROWS, 1)
        with weight rows n, and with the second weight's if GATED (else zeros), on tensor
        cores: each x tile is loaded once for both weights, each weight tile converted once for every
        row. Padding rows (not m_ok) are zeros, never loaded. SWAP: summed as W x^T (BLOCK_N, ROWS) and
        transposed once at the end, so the weight tile is the tensor cores' left operand (from 64 rows:
        Hopper's warpgroup MMA, which reads it from shared memory as it arrives)."""
        SHAPE: tl.constexpr = (BLOCK_N, ROWS) if SWAP else (ROWS, BLOCK_N)
        acc = tl.zeros(SHAPE, dtype=tl.float32)
        acc2 = tl.zeros(SHAPE, dtype=tl.float32)
        for k0 in range(lo, hi, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            ok = cols < hi
            x = tl.load(x_rows + cols[None, :], mask=m_ok[:, None] & ok[None, :], other=0.0)
            x = _norm_x(x, nw_ptr, cols[None, :], ok[None, :], inv_rms, NORM).to(dtype)
            w = tl.load(w_ptr + n[:, None] * K + cols[None, :], mask=ok[None, :], other=0)
            acc += _dot_rows(x, _operand(w, dtype, FMT), SWAP)
            if GATED:
                w2 = tl.load(w2_ptr + n[:, None] * K + cols[None, :], mask=ok[None, :], other=0)
                acc2 += _dot_rows(x, _operand(w2, dtype, FMT), SWAP)
        if SWAP:
            acc = tl.trans(acc)
            acc2 = tl.trans(acc2)
        if FMT == 1:  # the per-row scales come last
            acc = acc * tl.load(s_ptr + n).to(tl.float32)[None, :]
            if GATED:
                acc2 = acc2 * tl.load(s2_ptr + n).to(tl.float32)[None, :]
        return acc, acc2

    @triton.jit
    def _epilogue(y, up, n, n_ok, m, m_ok, b_ptr, r_ptr, out_ptr, N, dtype, GATED: tl.constexpr,
                  BIAS: tl.constexpr, RESIDUAL: tl.constexpr):
        """silu(y) * up, + bias, + residual, each on the rounded value before it
        (tformer/inference/README.md); store."""
        if GATED:
            gate = y.to(dtype).to(tl.float32)
            gate = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
            y = gate * up.to(dtype).to(tl.float32)
        if BIAS:
            y = y.to(dtype).to(tl.float32) + tl.load(b_ptr + n).to(tl.float32)[None, :]
        out = m[:, None] * N + n[None, :]
        if RESIDUAL:
            y = tl.load(r_ptr + out).to(tl.float32) + y.to(dtype).to(tl.float32)
        tl.store(out_ptr + out, y.to(dtype), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _rows_kernel(x_ptr, nw_ptr, w_ptr, s_ptr, z_ptr, w2_ptr, s2_ptr, z2_ptr, b_ptr, r_ptr, out_ptr, ws_ptr,
                     count_ptr, M, N, K, eps, FMT: tl.constexpr, GROUP: tl.constexpr, NORM: tl.constexpr,
                     GATED: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                     SWAP: tl.constexpr):
        """Program (column block, part of K). With SPLIT_K > 1 each writes its partial tiles to ws and
        the last of a column block to finish merges them (module docstring)."""
        block, split = tl.program_id(0), tl.program_id(1)
        n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        n = tl.where(n_ok, n, 0)
        chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        lo = split * chunk
        hi = tl.minimum(lo + chunk, K)
        _wait_for_previous_kernel(PDL)
        m = tl.arange(0, ROWS)
        m_ok = m < M
        m = tl.where(m_ok, m, 0)  # padding rows load nothing and store nothing
        x_rows = x_ptr + m[:, None] * K  # (ROWS, 1)
        dtype = out_ptr.dtype.element_ty
        inv_rms = tl.full((ROWS, 1), 1.0, tl.float32)
        if NORM:  # over all of K, in every program (x is a few KB a row, read from L2)
            sq = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_rows + cols[None, :], mask=m_ok[:, None] & (cols < K)[None, :], other=0.0).to(tl.float32)
                sq += x * x
            inv_rms = tl.rsqrt(tl.sum(sq, axis=1) / K + eps)[:, None]
        y, up = _tile_dots(x_rows, m_ok, nw_ptr, inv_rms, w_ptr, s_ptr, w2_ptr, s2_ptr, n, lo, hi, K, dtype,
                           FMT, NORM, GATED, ROWS, BLOCK_N, BLOCK_K, SWAP)
        if SPLIT_K == 1:
            _epilogue(y, up, n, n_ok, m, m_ok, b_ptr, r_ptr, out_ptr, N, dtype, GATED, BIAS, RESIDUAL)
        else:  # ws per column block: SPLIT_K parts of [y tile, up tile], each (ROWS, BLOCK_N) fp32
            TILE: tl.constexpr = ROWS * BLOCK_N
            tile = tl.arange(0, ROWS)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            rows_ok = m_ok[:, None] & (tile >= 0)
            part = ws_ptr + (block * SPLIT_K + split) * (2 * TILE) + tile
            tl.store(part, y, mask=rows_ok)
            if GATED:
                tl.store(part + TILE, up, mask=rows_ok)
            if _last_to_finish(count_ptr, block, SPLIT_K):  # then the other parts are visible
                y = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
                up = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
                for s in tl.static_range(SPLIT_K):
                    part = ws_ptr + (block * SPLIT_K + s) * (2 * TILE) + tile
                    y += tl.load(part, mask=rows_ok, other=0.0, cache_modifier=".cg")
                    if GATED:
                        up += tl.load(part + TILE, mask=rows_ok, other=0.0, cache_modifier=".cg")
                _epilogue(y, up, n, n_ok, m, m_ok, b_ptr, r_ptr, out_ptr, N, dtype, GATED, BIAS, RESIDUAL)
                tl.atomic_xchg(count_ptr + block, 0)  # ready for the next kernel

    def _split_configs(tiles, swap: int):
        return [c for sk in (1, 2, MAX_SPLIT_K) for c in _configs(tiles, stages=(3, 4), SPLIT_K=sk, SWAP=swap)]

    def _fits(configs, named_args):
        """Each tile with the one split of K that `split_k` gives it (the rest are never timed)."""
        return [c for c in configs if c.kwargs["SPLIT_K"] == split_k(named_args["N"], c.kwargs["BLOCK_N"])]

    # tensor-core tiles, at least 16 weight rows and 32 columns a program; the first is the default. M is
    # not in the key: x is padded to MAX_ROWS rows whatever M is, so one tuning serves every row count.
    # Swapped tiles (W x^T) of 64 and 128 rows run on Hopper's warpgroup MMA.
    _TUNED_ROWS = tuned(_split_configs([(16, 128, 4), (16, 256, 4), (16, 512, 8), (32, 128, 4), (32, 256, 4),
                                        (32, 256, 8), (64, 128, 4)], swap=0)
                        + _split_configs([(64, 128, 4), (64, 256, 4), (128, 128, 4)], swap=1),
                        ["N", "K", "GROUP", "NORM", "GATED", "PDL"], prune=_fits)(_rows_kernel)


def split_k(n: int, block_n: int, programs_per_sm: int = 2) -> int:
    """Parts to split K into for a weight of n rows in blocks of block_n: the fewest (1, 2 or MAX_SPLIT_K)
    that give every SM `programs_per_sm` programs; 1 from SPLIT_K_BELOW rows (what the scratch buffer
    and the merge counters are sized for)."""
    if n >= SPLIT_K_BELOW:
        return 1
    want = programs_per_sm * _sm_count()
    blocks = -(-n // block_n)
    return next((s for s in (1, 2) if blocks * s >= want), MAX_SPLIT_K)


def _sm_count() -> int:
    """The current GPU's SMs (an H100's 132 where there is none: the interpreter, CPU tests)."""
    if not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def rows_matvec(x, nw, weight, s, z, w2, s2, z2, b, r, out, M, N, K, eps, fmt, group_size, flags, pdl: bool,
                counts=None):
    """Launch the few-row kernel (matvec_op's arguments, the optional ones already filled in)."""
    split_ok = N < SPLIT_K_BELOW
    ws = torch.empty(triton.cdiv(N, 64) * 64 * MAX_ROWS * 2 * MAX_SPLIT_K if split_ok else 1, device=x.device,
                     dtype=torch.float32)
    counts = counters(counts, triton.cdiv(N, 16), x.device) if split_ok else ws
    args = (x, nw, weight, s, z, w2, s2, z2, b, r, out, ws, counts, M, N, K, eps, fmt, group_size, *flags)
    if INTERPRET:  # one fixed tile: the interpreter cannot time configurations
        split = _INTERPRETED_SPLIT_K if split_ok else 1
        _rows_kernel[(triton.cdiv(N, 16), split)](*args, ROWS=MAX_ROWS, BLOCK_N=16, BLOCK_K=64, SPLIT_K=split,
                                                  SWAP=_INTERPRETED_SWAP)
    else:
        _TUNED_ROWS[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])](*args, ROWS=MAX_ROWS,
                                                                                     launch_pdl=pdl)
    return out
