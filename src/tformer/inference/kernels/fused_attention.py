"""Decode attention fused with what comes before it, for tformer's fused decode blocks (Triton).

    qkv (B, T, (H + 2 Hkv) D), rope, caches (B, Hkv, S, D), input_pos (T,), mask  ->  (B, T, H*D)

`cached_attention` (used by tformer.inference.fused) goes one step beyond
`tformer.inference.kernels.attention`: from the projected q|k|v it applies RoPE to q and the new k,
writes the new k and v into the cache and attends, all in one kernel. Every program uses the new
token's k and v from registers; one program per key/value head stores them, and none reads that
slot back, so the write races with nothing. The cache can also be split into parts
(flash-decoding; the autotuner picks 1 to 8 per cache size), so a head's keys are read by several
programs at once; each writes its partial softmax state, and the last of a head to finish (a merge
counter) merges them, so it stays one kernel. For a few new tokens (a speculative verify) one
program takes a key/value head's whole group of queries on tensor cores, and the split matters
more: unsplit, a model with 8 key/value heads would run 8 programs a sequence.

The kernels read no cache slot after the last new token's, so the mask must be causal
(tformer/inference/README.md); a step's reads then follow the tokens so far, not the cache's size.
The parts stay fixed shares of the whole cache (a part past the last token reads nothing), and the
one-token kernel's autotuner only times the splits whose parts hold the fewest tiles (one tile
each up to 8 x 128 slots, when a part's whole share loads before the wait). Autotuning runs at one
position, the first decode step's, where parts sized to the tokens so far, or one part of several
tiles, look cheapest but cost more as the tokens grow.

A one-token program reads the slot index, the key mask and its first tile of cached keys and values
before it waits for the kernel before it, the q|k|v projection (programmatic dependent launch;
README.md): the cache slots were written by earlier steps, the index and mask before that
projection. Only the new token's own slot, which comes from q|k|v, has to wait. The few-token
kernel waits before anything else.
"""

from __future__ import annotations

import math

import torch

from tformer.inference.kernels.attention import _batch_stride, _key_mask
from tformer.inference.kernels.base import DEVICE_TYPE, INTERPRET, counters, triton, tuned, use_pdl
from tformer.inference.kernels.inductor import bound_operator_str

if triton is not None:
    import triton.language as tl

    from tformer.inference.kernels.attention import _attend_cache, _cache_tile, _fold
    from tformer.inference.kernels.base import _dot_t, _last_to_finish, _wait_for_previous_kernel

    @triton.jit
    def _rope(ptr, cos_ptr, sin_ptr, d, D, R):
        """One head's vector at ptr (D,), its first R dims rotated "rotate half" style, in fp32."""
        half = R // 2
        rot = d < R
        partner = tl.where(d < half, d + half, d - half)
        x = tl.load(ptr + d, mask=d < D, other=0.0).to(tl.float32)
        x_partner = tl.load(ptr + partner, mask=rot, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + d, mask=rot, other=1.0).to(tl.float32)
        s = tl.load(sin_ptr + d, mask=rot, other=0.0).to(tl.float32)
        return tl.where(rot, x * c + tl.where(d < half, -x_partner, x_partner) * s, x)

    @triton.jit
    def _cached_attention_kernel(qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, out_ptr, ws_ptr, count_ptr,
                                 S, H, HKV, R, scale, s_qkv, s_cos, sk_b, sk_h, sk_s, sm_b, sm_s,
                                 D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS: tl.constexpr,
                                 PDL: tl.constexpr):
        """Program (sequence x query head, split): the split's share of the cache slots. With
        SPLITS > 1 each writes its partial (max, sum, output) to ws and the last of a head to finish
        (a merge counter) merges them, so one kernel still does everything. The first tile of the
        split's slots loads before the wait (module docstring)."""
        bh, split = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        kvh = h // (H // HKV)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        dtype = k_ptr.dtype.element_ty
        pos = tl.load(pos_ptr)
        head = b * sk_b + kvh * sk_h
        chunk = tl.cdiv(tl.cdiv(S, SPLITS), BLOCK_S) * BLOCK_S
        lo = split * chunk
        hi = tl.minimum(lo + chunk, pos)  # slots before the new token's: a causal mask keeps none after it
        k_first, v_first, keep_first = _cache_tile(k_ptr, v_ptr, m_ptr, head, b, lo, hi, sk_s, sm_b, sm_s, d, d_ok,
                                                   BLOCK_S)
        _wait_for_previous_kernel(PDL)
        row, cos, sin = qkv_ptr + b * s_qkv, cos_ptr + b * s_cos, sin_ptr + b * s_cos
        # RoPE, rounded to the cache's dtype as the unfused path stores q and k
        q = _rope(row + h * D, cos, sin, d, D, R).to(dtype).to(tl.float32) * scale
        k_new = _rope(row + (H + kvh) * D, cos, sin, d, D, R).to(dtype)
        v_new = tl.load(row + (H + HKV + kvh) * D + d, mask=d_ok, other=0.0).to(dtype)
        if h % (H // HKV) == 0:  # one query head of the group writes the new slot; no one reads it back
            if split == 0:
                tl.store(k_ptr + head + pos * sk_s + d, k_new, mask=d_ok)
                tl.store(v_ptr + head + pos * sk_s + d, v_new, mask=d_ok)
        if split == 0:  # the new token sees itself: split 0's softmax starts there
            m_i = tl.sum(q * k_new.to(tl.float32), axis=0)
            l_i = tl.full((), 1.0, tl.float32)
            acc = v_new.to(tl.float32)
        else:
            m_i = tl.full((), float("-inf"), tl.float32)
            l_i = tl.zeros((), tl.float32)
            acc = tl.zeros((BLOCK_D,), tl.float32)
        m_i, l_i, acc = _fold(q, k_first, v_first, keep_first, m_i, l_i, acc)
        m_i, l_i, acc = _attend_cache(q, k_ptr, v_ptr, m_ptr, head, b, lo + BLOCK_S, hi, m_i, l_i, acc,
                                      sk_s, sm_b, sm_s, d, d_ok, BLOCK_S)
        if SPLITS == 1:
            tl.store(out_ptr + bh * D + d, acc / l_i, mask=d_ok)
        else:  # ws per (sequence x head): SPLITS rows of [max, sum, output (BLOCK_D)]
            part = ws_ptr + (bh * SPLITS + split) * (BLOCK_D + 2)
            tl.store(part, m_i)
            tl.store(part + 1, l_i)
            tl.store(part + 2 + d, acc)
            if _last_to_finish(count_ptr, bh, SPLITS):  # then the other splits' rows are visible
                rows = ws_ptr + (bh * SPLITS + tl.arange(0, SPLITS)) * (BLOCK_D + 2)
                ms = tl.load(rows, cache_modifier=".cg")
                ls = tl.load(rows + 1, cache_modifier=".cg")
                accs = tl.load(rows[:, None] + 2 + d[None, :], cache_modifier=".cg")  # (SPLITS, BLOCK_D)
                w = tl.exp(ms - tl.max(ms, axis=0))  # split 0 always holds the new token: a finite max
                out = tl.sum(accs * w[:, None], axis=0) / tl.sum(ls * w, axis=0)
                tl.store(out_ptr + bh * D + d, out, mask=d_ok)
                tl.atomic_xchg(count_ptr + bh, 0)  # ready for the next call

    @triton.jit
    def _cached_attention_rows_kernel(qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, out_ptr, ws_ptr,
                                      count_ptr, S, T, H, HKV, R, scale, sq_b, sq_t, sc_b, sc_t, sk_b, sk_h, sk_s, sm_b,
                                      sm_t, sm_s, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                                      ROWS: tl.constexpr, NEW: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr):
        """`_cached_attention_kernel` for T new tokens a sequence: one program per (sequence, key/value
        head, part of the cache) takes every query of the group (T tokens x H/HKV heads, ROWS padded) on
        tensor cores. Part 0 also writes the new keys and values and attends to them from registers;
        with SPLITS > 1 each part writes its partial softmax state to ws and the last of a group to
        finish merges them, so one kernel still does everything."""
        _wait_for_previous_kernel(PDL)
        bh, split = tl.program_id(0), tl.program_id(1)
        b, kvh = bh // HKV, bh % HKV
        G = H // HKV
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        dtype = k_ptr.dtype.element_ty
        r = tl.arange(0, ROWS)  # query rows: token r // G, head kvh * G + r % G
        r_ok = r < T * G
        t = tl.where(r_ok, r // G, 0)
        h = kvh * G + r % G
        q_row = qkv_ptr + b * sq_b + t * sq_t
        q = _rope((q_row + h * D)[:, None], (cos_ptr + b * sc_b + t * sc_t)[:, None],
                  (sin_ptr + b * sc_b + t * sc_t)[:, None], d[None, :], D, R).to(dtype)  # (ROWS, BLOCK_D)
        j = tl.arange(0, NEW)  # the new tokens, NEW padded
        j_ok = j < T
        tj = tl.where(j_ok, j, 0)
        pos = tl.load(pos_ptr + tj)  # (NEW,)
        head = b * sk_b + kvh * sk_h
        rows_mask = m_ptr + b * sm_b + t[:, None] * sm_t  # (ROWS, 1)
        if split == 0:  # the new keys first, from registers (this program alone writes them, and reads them back never)
            row = qkv_ptr + b * sq_b + tj * sq_t
            k_new = _rope((row + (H + kvh) * D)[:, None], (cos_ptr + b * sc_b + tj * sc_t)[:, None],
                          (sin_ptr + b * sc_b + tj * sc_t)[:, None], d[None, :], D, R).to(dtype)  # (NEW, BLOCK_D)
            v_new = tl.load((row + (H + HKV + kvh) * D)[:, None] + d[None, :], mask=d_ok[None, :], other=0.0).to(dtype)
            new_ok = j_ok[:, None] & d_ok[None, :]
            tl.store(k_ptr + head + pos[:, None] * sk_s + d[None, :], k_new, mask=new_ok)
            tl.store(v_ptr + head + pos[:, None] * sk_s + d[None, :], v_new, mask=new_ok)
            keep = (tl.load(rows_mask + pos[None, :] * sm_s) != 0) & j_ok[None, :] & r_ok[:, None]  # (ROWS, NEW)
            scores = tl.where(keep, _dot_t(q, k_new) * scale, float("-inf"))
            m_i = tl.max(scores, axis=1)
            m_i = tl.where(m_i == float("-inf"), 0.0, m_i)  # padding rows (nothing kept): any finite value
            p = tl.exp(scores - m_i[:, None])
            l_i = tl.sum(p, axis=1)
            acc = _dot_t(p.to(dtype), tl.trans(v_new))  # (ROWS, BLOCK_D)
        else:
            m_i = tl.full((ROWS,), float("-inf"), tl.float32)
            l_i = tl.zeros((ROWS,), tl.float32)
            acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
        chunk = tl.cdiv(tl.cdiv(S, SPLITS), BLOCK_S) * BLOCK_S
        lo = split * chunk
        hi = tl.minimum(lo + chunk, tl.max(tl.where(j_ok, pos, 0), axis=0) + 1)  # causal: none after the last new slot
        for s0 in range(lo, hi, BLOCK_S):  # then this part of the cache, without the new slots
            s = s0 + tl.arange(0, BLOCK_S)
            in_range = s < hi
            fresh = tl.max((s[None, :] == pos[:, None]).to(tl.int32), axis=0) != 0  # (BLOCK_S,)
            kept = (tl.load(rows_mask + s[None, :] * sm_s, mask=in_range[None, :], other=0) != 0) & (
                in_range & ~fresh)[None, :]  # (ROWS, BLOCK_S)
            used = tl.max(kept.to(tl.int32), axis=0) != 0  # slots some row keeps; unwritten ones may hold NaN
            offs = s[:, None] * sk_s + d[None, :]
            kv_ok = used[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + head + offs, mask=kv_ok, other=0.0)
            v = tl.load(v_ptr + head + offs, mask=kv_ok, other=0.0)
            block_scores = tl.where(kept, _dot_t(q, k) * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(block_scores, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing kept yet (parts after the first)
            alpha = tl.exp(m_i - m_ref)
            block_p = tl.exp(block_scores - m_ref[:, None])
            acc = acc * alpha[:, None] + _dot_t(block_p.to(dtype), tl.trans(v))
            l_i = l_i * alpha + tl.sum(block_p, axis=1)
            m_i = m_new
        out = out_ptr + ((b * T + t) * H + h)[:, None] * D + d[None, :]
        out_ok = r_ok[:, None] & d_ok[None, :]
        if SPLITS == 1:
            tl.store(out, acc / tl.where(r_ok, l_i, 1.0)[:, None], mask=out_ok)  # padding rows kept nothing
        else:  # ws per (sequence x key/value head): SPLITS parts of [max (ROWS), sum (ROWS), output (ROWS, BLOCK_D)]
            PART: tl.constexpr = ROWS * (BLOCK_D + 2)
            part = ws_ptr + bh * (SPLITS * PART)
            tl.store(part + split * PART + r, m_i)
            tl.store(part + split * PART + ROWS + r, l_i)
            tl.store(part + split * PART + 2 * ROWS + r[:, None] * BLOCK_D + d[None, :], acc)
            if _last_to_finish(count_ptr, bh, SPLITS):  # then the other parts are visible
                m_all = tl.full((ROWS,), float("-inf"), tl.float32)
                for i in tl.static_range(SPLITS):
                    m_all = tl.maximum(m_all, tl.load(part + i * PART + r, cache_modifier=".cg"))
                l_all = tl.zeros((ROWS,), tl.float32)
                acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
                for i in tl.static_range(SPLITS):  # part 0 holds the new tokens: m_all is finite
                    w = tl.exp(tl.load(part + i * PART + r, cache_modifier=".cg") - m_all)
                    l_all += w * tl.load(part + i * PART + ROWS + r, cache_modifier=".cg")
                    acc += w[:, None] * tl.load(part + i * PART + 2 * ROWS + r[:, None] * BLOCK_D + d[None, :],
                                                cache_modifier=".cg")
                tl.store(out, acc / tl.where(r_ok, l_all, 1.0)[:, None], mask=out_ok)
                tl.atomic_xchg(count_ptr + bh, 0)  # ready for the next call

    # the cache split in 1 to MAX_SPLITS parts (flash-decoding), whichever is fastest for the cache size
    _SPLIT_CONFIGS = [triton.Config({"BLOCK_S": bs, "SPLITS": sp}, num_warps=w, num_stages=1)
                      for sp in (4, 8, 1) for bs in (64, 128, 32) for w in (4, 2)]

    def _fewest_tiles(configs, named_args, **kwargs):
        """The configurations whose parts hold the fewest tiles (one, up to 8 x 128 slots): a part's first
        tile loads before the PDL wait, so then each part's whole share does. Tuning runs at the first
        decode step's position, where the slots after it read nothing, so parts of several tiles (one
        part of the whole cache, say) would look cheaper than they are at later positions."""
        tiles = {id(c): triton.cdiv(triton.cdiv(named_args["S"], c.kwargs["SPLITS"]), c.kwargs["BLOCK_S"])
                 for c in configs}
        fewest = min(tiles.values())
        return [c for c in configs if tiles[id(c)] == fewest]

    _tuned_cached_attention = tuned(_SPLIT_CONFIGS, ["S", "D", "PDL"], prune=_fewest_tiles)(_cached_attention_kernel)
    # a few new tokens a sequence: the cache split like the one-token kernel's, or whole
    _ROWS_CONFIGS = [triton.Config({"BLOCK_S": bs, "SPLITS": sp}, num_warps=w, num_stages=st)
                     for sp in (4, 8, 2, 1) for bs in (64, 32) for w in (4, 8) for st in (1, 3)]
    _tuned_cached_attention_rows = tuned(_ROWS_CONFIGS, ["S", "D", "T", "PDL"])(_cached_attention_rows_kernel)

MAX_NEW_TOKENS = 16  # new tokens a sequence that `cached_attention` takes in one call
_INTERPRETED_SPLITS = 2  # the interpreter runs one configuration: a split cache, so tests cover the merge
MAX_SPLITS = 8  # parts of the cache that `cached_attention` may split the keys into


# flexible_layout: inductor hands every layer the same rope and mask buffers; without it, it gives each
# layer's call its own copy of them, one more small kernel a layer in a compiled step.
@torch.library.custom_op("tformer::cached_attention", mutates_args=("k_cache", "v_cache"),
                         tags=(torch.Tag.flexible_layout,) if hasattr(torch.Tag, "flexible_layout") else ())
def cached_attention_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor, n_heads: int,
                        rot_dim: int, counts: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
    """qkv (B, T, (H + 2 Hkv) D) unit stride in the last dim; cos, sin (B or 1, T, rot_dim) (0: no RoPE,
    never read); caches (B, Hkv, S, D) with unit stride in D; input_pos (T,); mask (B or 1, 1, T, S)
    bool; counts as `cached_attention`'s; pdl resolved (`use_pdl`). Returns (B, T, H, D). The shared
    tensors go in unsliced, so a compiled step builds them once for all layers."""
    B, T = qkv.shape[:2]
    Hkv, S, D = k_cache.shape[1:]
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():  # the layout the kernel reads them in
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(B, T, n_heads, D, device=qkv.device, dtype=qkv.dtype)
    common = (qkv, cos, sin, k_cache, v_cache, input_pos, mask, out)
    strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), _batch_stride(mask))
    fixed = {"BLOCK_S": 64, "PDL": False} if INTERPRET else {"PDL": pdl, "launch_pdl": pdl}
    if T == 1:  # one program per (sequence, query head, part of the cache)
        block_d = triton.next_power_of_2(D)
        ws = torch.empty(B * n_heads * MAX_SPLITS * (block_d + 2), device=qkv.device, dtype=torch.float32)
        counts = counters(counts, B * n_heads, qkv.device)
        args = (*common, ws, counts, S, n_heads, Hkv, rot_dim, 1.0 / math.sqrt(D), qkv.stride(0), _batch_stride(cos),
                *strides, mask.stride(3))
        if INTERPRET:  # small blocks, so both splits hold keys in the tests' short caches
            _cached_attention_kernel[(B * n_heads, _INTERPRETED_SPLITS)](*args, D=D, BLOCK_D=block_d,
                                                                         SPLITS=_INTERPRETED_SPLITS,
                                                                         **{**fixed, "BLOCK_S": 8})
        else:
            _tuned_cached_attention[lambda meta: (B * n_heads, meta["SPLITS"])](*args, D=D, BLOCK_D=block_d, **fixed)
        return out
    rows, block_d = max(16, triton.next_power_of_2(T * (n_heads // Hkv))), max(16, triton.next_power_of_2(D))
    ws = torch.empty(B * Hkv * MAX_SPLITS * rows * (block_d + 2), device=qkv.device, dtype=torch.float32)
    counts = counters(counts, B * Hkv, qkv.device)
    args = (*common, ws, counts, S, T, n_heads, Hkv, rot_dim, 1.0 / math.sqrt(D), qkv.stride(0), qkv.stride(1),
            _batch_stride(cos), cos.stride(1), *strides[:3], strides[3], mask.stride(2), mask.stride(3))
    meta = dict(D=D, BLOCK_D=block_d, ROWS=rows, NEW=max(16, triton.next_power_of_2(T)), **fixed)
    if INTERPRET:  # a split cache, so the tests cover the merge
        _cached_attention_rows_kernel[(B * Hkv, _INTERPRETED_SPLITS)](*args, SPLITS=_INTERPRETED_SPLITS,
                                                                      **{**meta, "BLOCK_S": 16})
    else:
        _tuned_cached_attention_rows[lambda m: (B * Hkv, m["SPLITS"])](*args, **meta)
    return out


@cached_attention_op.register_fake
def _(qkv, cos, sin, k_cache, v_cache, input_pos, mask, n_heads, rot_dim, counts=None, pdl=False):
    bound_operator_str()  # before inductor lowers this op (tformer.inference.kernels.inductor)
    return qkv.new_empty(*qkv.shape[:2], n_heads, k_cache.shape[-1])


def use_cached_attention(qkv: torch.Tensor, k_cache, v_cache, mask, rope, n_heads: int) -> bool:
    """Whether `cached_attention` applies: up to MAX_NEW_TOKENS new tokens a sequence on the kernel's
    device, a cache for exactly this batch, a boolean key mask shared by all heads, RoPE over an even
    share of D."""
    if triton is None or qkv.device.type != DEVICE_TYPE or qkv.dim() != 3 or not 0 < qkv.shape[1] <= MAX_NEW_TOKENS:
        return False
    B, T = qkv.shape[:2]
    if k_cache is None or k_cache.shape[0] != B or k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        return False
    if not _key_mask(mask, B, T, k_cache.shape[2]):
        return False
    Hkv, D = k_cache.shape[1], k_cache.shape[3]
    if n_heads % Hkv or qkv.shape[-1] != (n_heads + 2 * Hkv) * D or qkv.stride(-1) != 1:
        return False
    if T > 1 and T * (n_heads // Hkv) > 128:  # the rows kernel holds a group's queries in registers
        return False
    if rope is None:
        return True
    cos, sin = rope
    return (cos.shape == sin.shape and cos.stride() == sin.stride() and cos.stride(-1) == 1 and cos.shape[1] == T
            and cos.shape[0] in (1, B) and cos.shape[-1] % 2 == 0 and cos.shape[-1] <= D)


def cached_attention(qkv: torch.Tensor, rope, k_cache: torch.Tensor, v_cache: torch.Tensor, input_pos: torch.Tensor,
                     mask: torch.Tensor, n_heads: int, counts: torch.Tensor | None = None,
                     pdl: bool | None = None) -> torch.Tensor:
    """Attention for T new tokens a sequence from the projected q|k|v (B, T, (H + 2 Hkv) D) in one
    kernel: RoPE on q and the new k, the new k and v written into the caches (B, Hkv, S, D) at slots
    input_pos (T,), and softmax(q k^T / sqrt(D), masked) v over the cache -> (B, T, H*D).
    rope: (cos, sin) (B or 1, T, R) or None; mask: (B or 1, 1, T, S) bool, True = attend (a token's
    own slot always is), causal: slots after the last new token's are never read, whatever it says.
    T = 1 is a decode step; a few tokens, a speculative verify. counts: int32 counters, zero between
    kernels, at least B * H (`base.counters`; None: fresh ones); pdl as `matvec`'s. Invariants:
    tformer/inference/README.md."""
    cos, sin = rope if rope is not None else (qkv, qkv)
    rot_dim = 0 if rope is None else cos.shape[-1]
    out = cached_attention_op(qkv, cos, sin, k_cache, v_cache, input_pos, mask, n_heads, rot_dim, counts,
                              use_pdl(qkv.device, pdl))
    return out.view(*qkv.shape[:2], -1)
