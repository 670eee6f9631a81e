"""Decode attention: one query per sequence against a static KV cache, grouped heads read in place (Triton).

    q (B, H, 1, D), cache k/v (B, Hkv, S, D), mask (B or 1, 1, 1, S) bool  ->  (B, H, 1, D)

For a single new token, torch's masked SDPA wants equal head counts, so grouped-query attention
first copies K and V Hq/Hkv times (two copy kernels a layer), then runs a kernel built for long
queries. Here one program per (sequence, query head) reads its key/value head straight from the
cache (tiles autotuned per cache size), masks padding and slots not yet written, and keeps an online
softmax in fp32 (scores, running max and sum), so the step is one small kernel. The output is
written in (B, 1, H, D) order, the layout the output projection reads, so no transpose copy follows.

Its jit helpers (`_cache_tile`, `_fold`, `_attend_cache`) also serve `tformer.inference.kernels.fused_attention`.
"""

from __future__ import annotations

import math

import torch

from tformer.inference.kernels.base import DEVICE_TYPE, INTERPRET, triton, tuned
from tformer.inference.kernels.inductor import bound_operator_str

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _fold(q, k, v, keep, m_i, l_i, acc):
        """Folds one tile of cache slots (k, v (BLOCK_S, BLOCK_D), keep (BLOCK_S,)) into the online
        softmax of q (BLOCK_D,) fp32, pre-scaled: the running (max, sum, output)."""
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        scores = tl.where(keep, tl.sum(k * q[None, :], axis=1), float("-inf"))  # (BLOCK_S,)
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with nothing kept adds nothing
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(scores - m_ref)
        acc = acc * alpha + tl.sum(tl.where(keep[:, None], p[:, None] * v, 0.0), axis=0)  # masked: any value
        return m_new, l_i * alpha + tl.sum(p, axis=0), acc

    @triton.jit
    def _cache_tile(k_ptr, v_ptr, m_ptr, head, b, s0, hi, sk_s, sm_b, sm_s, d, d_ok, BLOCK_S: tl.constexpr):
        """Cache slots s0..s0+BLOCK_S-1 of one key/value head: k, v (BLOCK_S, BLOCK_D) and which slots
        are kept (below hi, True in the mask)."""
        s = s0 + tl.arange(0, BLOCK_S)
        in_range = s < hi
        keep = (tl.load(m_ptr + b * sm_b + s * sm_s, mask=in_range, other=0) != 0) & in_range
        offs = s[:, None] * sk_s + d[None, :]
        kv_ok = in_range[:, None] & d_ok[None, :]
        return tl.load(k_ptr + head + offs, mask=kv_ok, other=0.0), tl.load(v_ptr + head + offs, mask=kv_ok, other=0.0), keep

    @triton.jit
    def _attend_cache(q, k_ptr, v_ptr, m_ptr, head, b, lo, hi, m_i, l_i, acc, sk_s, sm_b, sm_s, d, d_ok,
                      BLOCK_S: tl.constexpr):
        """Online softmax of q (BLOCK_D,) fp32, pre-scaled, over the kept cache slots lo..hi-1 of one
        key/value head; folds them into the running (max, sum, output)."""
        for s0 in range(lo, hi, BLOCK_S):  # loads do not wait on the mask, so they can be in flight together
            k, v, keep = _cache_tile(k_ptr, v_ptr, m_ptr, head, b, s0, hi, sk_s, sm_b, sm_s, d, d_ok, BLOCK_S)
            m_i, l_i, acc = _fold(q, k, v, keep, m_i, l_i, acc)
        return m_i, l_i, acc

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, m_ptr, out_ptr, S, H, GROUP, scale,
                                 sq_b, sq_h, sk_b, sk_h, sk_s, sm_b, sm_s,
                                 D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
        b, h = tl.program_id(0) // H, tl.program_id(0) % H
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q = tl.load(q_ptr + b * sq_b + h * sq_h + d, mask=d_ok, other=0.0).to(tl.float32) * scale
        head = b * sk_b + (h // GROUP) * sk_h  # this query head's key/value head
        m_i, l_i, acc = _attend_cache(q, k_ptr, v_ptr, m_ptr, head, b, 0, S, tl.full((), float("-inf"), tl.float32),
                                      tl.zeros((), tl.float32), tl.zeros((BLOCK_D,), tl.float32),
                                      sk_s, sm_b, sm_s, d, d_ok, BLOCK_S)
        tl.store(out_ptr + (b * H + h) * D + d, acc / l_i, mask=d_ok)

    _CONFIGS = [triton.Config({"BLOCK_S": bs}, num_warps=w, num_stages=st)
                for bs in (32, 64, 128) for w in (2, 4, 8) for st in (1, 3)]
    _tuned_decode_attention = tuned(_CONFIGS, ["S", "D"])(_decode_attention_kernel)


def _key_mask(mask, batch: int, n_queries: int, n_slots: int) -> bool:
    """Whether `mask` is what the kernels read: (batch or 1, 1, n_queries, n_slots) bool, one row of
    keys a query, shared by every head of a sequence."""
    return (mask is not None and mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1:3] == (1, n_queries)
            and mask.shape[0] in (1, batch) and mask.shape[3] == n_slots)


def _batch_stride(t: torch.Tensor) -> int:
    """Stride between sequences of a tensor shared by the batch (0 when it has one row for all)."""
    return t.stride(0) if t.shape[0] > 1 else 0


@torch.library.custom_op("tformer::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q (B, H, D) with unit stride in D; k, v (B, Hkv, S, D) with equal strides; mask (B or 1, 1, 1, S)
    bool. Returns (B, H, D) contiguous, in q.dtype."""
    B, H, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    out = torch.empty(B, H, D, device=q.device, dtype=q.dtype)
    kernel = _decode_attention_kernel if INTERPRET else _tuned_decode_attention
    kernel[(B * H,)](
        q, k, v, mask, out, S, H, H // Hkv, 1.0 / math.sqrt(D),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), _batch_stride(mask), mask.stride(3),
        D=D, BLOCK_D=triton.next_power_of_2(D), **({"BLOCK_S": 64} if INTERPRET else {}))
    return out


@decode_attention_op.register_fake
def _(q, k, v, mask):
    bound_operator_str()  # before inductor lowers this op (tformer.inference.kernels.inductor)
    return q.new_empty(q.shape)


def use_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, dropout_p: float) -> bool:
    """Whether `decode_attention` applies: one query a sequence on the kernel's device, a boolean
    key mask shared by all heads and that query, K/V of the same layout, no dropout or gradient."""
    if triton is None or q.device.type != DEVICE_TYPE or q.shape[2] != 1 or dropout_p > 0:
        return False
    if not _key_mask(mask, q.shape[0], 1, k.shape[2]):
        return False
    if q.shape[1] % k.shape[1] or k.stride(-1) != 1 or v.stride() != k.stride():
        return False
    return not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D), masked) v for q (B, H, 1, D) against k/v (B, Hkv, S, D) -> (B, H, 1, D).

    mask: (B or 1, 1, 1, S) bool, True = attend. The result is a view of a (B, 1, H, D) tensor."""
    B, H, _, D = q.shape
    out = decode_attention_op(q[:, :, 0] if q.stride(-1) == 1 else q[:, :, 0].contiguous(), k, v, mask)
    return out.view(B, 1, H, D).transpose(1, 2)
