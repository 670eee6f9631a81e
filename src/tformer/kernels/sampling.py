"""Top-k sampling in one kernel (Triton): no sort, no list of the k best, nothing vocabulary-sized but scratch.

    logits (R, V) bf16/fp16/fp32, 0 < k < V, temperature > 0  ->  one token a row (R,) int64

`torch.topk` over a 128K vocabulary is a radix select of about twenty small kernels (four 8-bit
passes of three kernels each, scans, a gather); with the softmax and the exponential race after it
that was about 70 microseconds of a 1B model's 1.16 ms decode step on the H100. Here one program a row:

1. finds the k-th largest logit tau exactly by a radix select over the logits' bits: each pass
   histograms one 8-bit digit of the logits that share the digits found so far and takes the digit
   where the count from the top reaches k (two passes for 16-bit floats, four for fp32);
2. writes the indices of the logits >= tau to scratch (ties at tau are all kept, as
   `filter_logits` keeps them);
3. draws among them with the exponential race of `tformer.generate.sampling.race` in log form:
   argmax x/T - log E, E ~ Exp(1) from Philox keyed by (the row's seed, the token id), which is
   distributed as softmax(x/T) over the kept tokens.

Between passes the logits stay in L2 (256 KB for 128K bf16). The seeds come from torch's generator
(`torch.randint`), so `torch.manual_seed` and the CUDA-graph-safe RNG state apply.
"""

from __future__ import annotations

import torch

from tformer.kernels.base import DEVICE_TYPE, INTERPRET, triton, tuned, use_pdl

_BITS = {torch.bfloat16: 16, torch.float16: 16, torch.float32: 32}


def use_topk_sample(logits: torch.Tensor, k: int) -> bool:
    """Whether `topk_sample` applies: (R, V) logits of a float type on the kernel's device, 0 < k < V."""
    return (logits.device.type == DEVICE_TYPE and logits.dim() == 2 and logits.dtype in _BITS
            and 0 < k < logits.shape[-1])


if triton is not None:
    import triton.language as tl

    from tformer.kernels.base import _wait_for_previous_kernel

    @triton.jit
    def _keys(x, BITS: tl.constexpr):
        """Unsigned keys of floats x in the order of their values (IEEE bits: flip a negative's bits,
        set a positive's sign bit)."""
        if BITS == 16:
            b = x.to(tl.int16, bitcast=True).to(tl.int32)  # sign-extended
            key = ((b ^ ((b >> 15) | -32768)) & 0xFFFF).to(tl.uint32)
        else:
            b = x.to(tl.int32, bitcast=True)
            key = (b ^ ((b >> 31) | -2147483648)).to(tl.uint32, bitcast=True)
        return key

    @triton.jit
    def _topk_sample_kernel(x_ptr, seed_ptr, ids_ptr, out_ptr, V, k, inv_t, BITS: tl.constexpr,
                            PDL: tl.constexpr, BLOCK: tl.constexpr, DRAW: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row, ids_row = x_ptr + row * V, ids_ptr + row * V
        digits = tl.arange(0, 256)
        _wait_for_previous_kernel(PDL)
        need = k  # how many of the logits sharing the digits found so far still belong to the k best
        prefix = tl.zeros((), dtype=tl.uint32)
        for p in tl.static_range(BITS // 8):  # 1. the k-th largest key, one 8-bit digit a pass
            hist = tl.zeros((256,), dtype=tl.int32)
            for s in range(0, V, BLOCK):
                cols = s + tl.arange(0, BLOCK)
                ok = cols < V
                key = _keys(tl.load(x_row + cols, mask=ok, other=0.0), BITS)
                if p > 0:
                    ok = ok & ((key >> (BITS - 8 * p)) == prefix)
                hist += tl.histogram(((key >> (BITS - 8 * (p + 1))) & 255).to(tl.int32), 256, mask=ok)
            above = tl.sum(hist, 0) - tl.cumsum(hist, 0)  # counts in higher digits
            digit = tl.max(tl.where(above + hist >= need, digits, -1), 0)
            need -= tl.sum(tl.where(digits == digit, above, 0), 0)
            prefix = (prefix << 8) | digit.to(tl.uint32)
        n = tl.zeros((), dtype=tl.int32)
        for s in range(0, V, BLOCK):  # 2. the indices of the keys >= tau, in order
            cols = s + tl.arange(0, BLOCK)
            keep = (cols < V) & (_keys(tl.load(x_row + cols, mask=cols < V, other=0.0), BITS) >= prefix)
            keep = keep.to(tl.int32)
            tl.store(ids_row + n + tl.cumsum(keep, 0) - 1, cols, mask=keep != 0)
            n += tl.sum(keep, 0)
        tl.debug_barrier()  # the block's index stores visible to all its threads
        seed = tl.load(seed_ptr + row)
        best = tl.full((), float("-inf"), dtype=tl.float32)
        best_id = tl.load(ids_row)  # a kept token, should every score be -inf
        for j0 in range(0, n, DRAW):  # 3. the exponential race among them
            j = j0 + tl.arange(0, DRAW)
            ok = j < n
            idx = tl.load(ids_row + j, mask=ok, other=0)
            x = tl.load(x_row + idx, mask=ok, other=0.0).to(tl.float32)
            e = -tl.log(tl.rand(seed, idx))  # Exp(1); a draw of exactly 0 gives inf, which never wins
            score = tl.where(ok, x * inv_t - tl.log(e), float("-inf"))
            m = tl.max(score, 0)
            first = tl.min(tl.where(ok & (score == m), idx, V), 0)  # ties to the lowest id
            best_id = tl.where(m > best, first, best_id)
            best = tl.maximum(best, m)
        tl.store(out_ptr + row, best_id.to(tl.int64))

    _TUNED = tuned([triton.Config({"BLOCK": b, "DRAW": 256}, num_warps=w)
                    for b, w in ((4096, 16), (2048, 8), (4096, 8), (8192, 16), (8192, 32))],
                   ["V", "BITS", "PDL"])(_topk_sample_kernel)


@torch.library.custom_op("tformer::topk_sample", mutates_args=())
def topk_sample_op(logits: torch.Tensor, seeds: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """(R,) int64 tokens; logits (R, V) contiguous, seeds (R,) int64 (module docstring)."""
    R, V = logits.shape
    out = torch.empty(R, dtype=torch.int64, device=logits.device)
    ids = torch.empty(R, V, dtype=torch.int32, device=logits.device)  # scratch: the kept indices
    pdl = use_pdl(logits.device)
    args = (logits, seeds, ids, out, V, k, 1.0 / temperature, _BITS[logits.dtype], pdl)
    if INTERPRET:
        _topk_sample_kernel[(R,)](*args, BLOCK=256, DRAW=64)
    else:
        _TUNED[(R,)](*args, launch_pdl=pdl)
    return out


@topk_sample_op.register_fake
def _(logits, seeds, k, temperature):
    return logits.new_empty(logits.shape[0], dtype=torch.int64)


def topk_sample(logits: torch.Tensor, k: int, temperature: float, generator=None) -> torch.Tensor:
    """One token a row of logits (R, V), drawn from softmax(logits / temperature) over the row's k
    largest logits (all of them tied with the k-th kept); see the module docstring."""
    if not use_topk_sample(logits, k):
        raise ValueError(f"topk_sample takes (R, V) float logits on {DEVICE_TYPE} and 0 < k < V; got "
                         f"{tuple(logits.shape)} {logits.dtype} on {logits.device.type}, k={k}")
    if not temperature > 0:
        raise ValueError(f"topk_sample needs temperature > 0 (temperature 0 is argmax), got {temperature}")
    seeds = torch.randint(0, 2**62, (logits.shape[0],), device=logits.device, generator=generator)
    return topk_sample_op(logits.contiguous(), seeds, int(k), float(temperature))
