"""Decode attention: one query per sequence against a static KV cache, grouped heads read in place (Triton).

    q (B, H, 1, D), cache k/v (B, Hkv, S, D), mask (B or 1, 1, 1, S) bool  ->  (B, H, 1, D)

For a single new token, torch's masked SDPA wants equal head counts, so grouped-query attention
first copies K and V Hq/Hkv times (two copy kernels a layer), then runs a kernel built for long
queries. Here one program per (sequence, query head) reads its key/value head straight from the
cache (tiles autotuned per cache size), masks padding and slots not yet written, and keeps an online
softmax in fp32 (scores, running max and sum), so the step is one small kernel. The output is
written in (B, 1, H, D) order, the layout the output projection reads, so no transpose copy follows.
"""

from __future__ import annotations

import math

import torch

from tformer.kernels.gemv import DEVICE_TYPE, INTERPRET, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, m_ptr, out_ptr, S, H, GROUP, scale,
                                 sq_b, sq_h, sk_b, sk_h, sk_s, sm_b, sm_s,
                                 D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
        b, h = tl.program_id(0) // H, tl.program_id(0) % H
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q = tl.load(q_ptr + b * sq_b + h * sq_h + d, mask=d_ok, other=0.0).to(tl.float32) * scale
        head = b * sk_b + (h // GROUP) * sk_h  # this query head's key/value head
        m_i = tl.full((), float("-inf"), tl.float32)
        l_i = tl.zeros((), tl.float32)
        acc = tl.zeros((BLOCK_D,), tl.float32)
        for s0 in range(0, S, BLOCK_S):  # loads do not wait on the mask, so they can be in flight together
            s = s0 + tl.arange(0, BLOCK_S)
            in_range = s < S
            keep = (tl.load(m_ptr + b * sm_b + s * sm_s, mask=in_range, other=0) != 0) & in_range
            offs = s[:, None] * sk_s + d[None, :]
            kv_ok = in_range[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + head + offs, mask=kv_ok, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + head + offs, mask=kv_ok, other=0.0).to(tl.float32)
            scores = tl.where(keep, tl.sum(k * q[None, :], axis=1), float("-inf"))  # (BLOCK_S,)
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with nothing kept adds nothing
            alpha = tl.exp(m_i - m_ref)
            p = tl.exp(scores - m_ref)
            acc = acc * alpha + tl.sum(tl.where(keep[:, None], p[:, None] * v, 0.0), axis=0)  # masked: any value
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        tl.store(out_ptr + (b * H + h) * D + d, acc / l_i, mask=d_ok)

    _tuned_decode_attention = triton.autotune(
        [triton.Config({"BLOCK_S": bs}, num_warps=w, num_stages=st)
         for bs in (32, 64, 128) for w in (2, 4, 8) for st in (1, 3)], key=["S", "D"])(_decode_attention_kernel)


@torch.library.custom_op("tformer::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """q (B, H, D) with unit stride in D; k, v (B, Hkv, S, D) with equal strides; keep (B, S) bool
    (any strides). Returns (B, H, D) contiguous, in q.dtype."""
    B, H, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    out = torch.empty(B, H, D, device=q.device, dtype=q.dtype)
    kernel = _decode_attention_kernel if INTERPRET else _tuned_decode_attention
    kernel[(B * H,)](
        q, k, v, keep, out, S, H, H // Hkv, 1.0 / math.sqrt(D),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), keep.stride(0), keep.stride(1),
        D=D, BLOCK_D=triton.next_power_of_2(D), **({"BLOCK_S": 64} if INTERPRET else {}))
    return out


@decode_attention_op.register_fake
def _(q, k, v, keep):
    return q.new_empty(q.shape)


def use_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, dropout_p: float) -> bool:
    """Whether `decode_attention` applies: one query a sequence on the kernel's device, a boolean
    key mask shared by all heads and that query, K/V of the same layout, no dropout or gradient."""
    if triton is None or q.device.type != DEVICE_TYPE or q.shape[2] != 1 or dropout_p > 0:
        return False
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        return False
    if q.shape[1] % k.shape[1] or k.stride(-1) != 1 or v.stride() != k.stride():
        return False
    return not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D), masked) v for q (B, H, 1, D) against k/v (B, Hkv, S, D) -> (B, H, 1, D).

    mask: (B or 1, 1, 1, S) bool, True = attend. The result is a view of a (B, 1, H, D) tensor."""
    B, H, _, D = q.shape
    keep = mask[:, 0, 0, :].expand(B, -1)
    out = decode_attention_op(q[:, :, 0] if q.stride(-1) == 1 else q[:, :, 0].contiguous(), k, v, keep)
    return out.view(B, 1, H, D).transpose(1, 2)
