"""Top-k sampling in a few short kernels (Triton): no sort, no list of the k best.

    logits (R, V) bf16/fp16/fp32, 0 < k < V, temperature > 0  ->  one token a row (R,) int64

`torch.topk` over a large vocabulary is a radix select of many small kernels, with a softmax and
the exponential race after it. Here each row is split over many programs of BLOCK logits, so a
pass over the row is one wave of short programs, not one program's long loop:

1. the k-th largest logit tau, exactly, by a radix select over the logits' bits, one kernel per 8-bit
   digit (two for 16-bit floats, four for fp32): each program histograms the digit among its logits
   that share the digits found so far and adds its counts into the row's histogram (atomics); the
   next kernel's programs each read the histograms and take the digit where the count from the top
   reaches k;
2. one more kernel draws among the logits >= tau (ties at tau all kept, as `filter_logits` keeps them)
   with the exponential race of `tformer.inference.sampling.race` in log form: argmax x/T - log E,
   E ~ Exp(1) from Philox keyed by (the row's seed, the token id), which is distributed as
   softmax(x/T) over the kept tokens. Each program offers its best (score, token) packed in 64 bits
   to an atomic max; the last program of the row to finish writes the token and sets the row's
   histograms and counters back to zero for the next call.

The histograms and counts live in int32 counters passed as `counts` (a decode engine's
`Workspace.topk`; None: fresh zeros), which follow the merge counters' rules in
tformer/inference/README.md. Programs that hold none of the kept logits (most of them: k of V)
skip the race.

Seeds, one a row: by default drawn from torch's generator (`torch.randint`), so `torch.manual_seed`
and the CUDA-graph-safe RNG state apply. A decode step passes `step` instead, a (1,) device tensor
that differs at every call of a request (the token's cache slot), and `seeds`: the kernel mixes
the step into these kept seeds (`Workspace.seeds`, drawn from torch's generator once per request by
`DecodeEngine.prepare`), so a step launches no kernel for its seeds and a seeded request repeats.
"""

from __future__ import annotations

import torch

from tformer.inference.kernels.base import DEVICE_TYPE, INTERPRET, counters, triton, use_pdl
from tformer.inference.kernels.inductor import bound_operator_str

_BITS = {torch.bfloat16: 16, torch.float16: 16, torch.float32: 32}
_BINS = 256  # one 8-bit digit a pass
ROW_COUNTERS = 4 + 4 * _BINS  # a row's best (two int32s), its count of finished programs, padding, histograms
BLOCK = 1024  # logits a program (interpreted: 128, so the tests' rows span several programs)


def use_topk_sample(logits: torch.Tensor, k: int) -> bool:
    """Whether `topk_sample` applies: (R, V) logits of a float type on the kernel's device, 0 < k < V."""
    return (logits.device.type == DEVICE_TYPE and logits.dim() == 2 and logits.dtype in _BITS
            and 0 < k < logits.shape[-1] <= 65535 * BLOCK)


def draw_seeds(rows: int, device, generator=None) -> torch.Tensor:
    """(rows,) int64 seeds from torch's generator (or `generator`)."""
    # randint's generator overload takes no symbolic sizes: a step compiled for any batch size calls it without one
    rng = {} if generator is None else {"generator": generator}
    return torch.randint(0, 2**62, (rows,), device=device, **rng)


if triton is not None:
    import triton.language as tl

    from tformer.inference.kernels.base import _last_to_finish, _wait_for_previous_kernel

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
    def _row_counters(count_ptr, row):
        """A row's counters (`ROW_COUNTERS`): its best at 0-1, its count of finished programs at 2, the
        histograms of the four digits from 4."""
        return count_ptr + row * (4 + 4 * 256)

    @triton.jit
    def _found(hist_row, k, DONE: tl.constexpr):
        """The digits of tau found by the first DONE passes' histograms: (prefix, how many of the logits
        sharing it still belong to the k best)."""
        digits = tl.arange(0, 256)
        need = k
        prefix = tl.zeros((), dtype=tl.uint32)
        for p in tl.static_range(DONE):
            hist = tl.load(hist_row + p * 256 + digits, cache_modifier=".cg")  # atomics of the kernels before
            above = tl.sum(hist, 0) - tl.cumsum(hist, 0)  # counts in higher digits
            digit = tl.max(tl.where(above + hist >= need, digits, -1), 0)
            need -= tl.sum(tl.where(digits == digit, above, 0), 0)
            prefix = (prefix << 8) | digit.to(tl.uint32)
        return prefix, need

    @triton.jit
    def _digit_kernel(x_ptr, count_ptr, V, k, BITS: tl.constexpr, PASS: tl.constexpr, PDL: tl.constexpr,
                      BLOCK: tl.constexpr):
        """Pass PASS of the radix select: this program's counts of digit PASS among its logits that
        share the digits found so far, added into the row's histogram."""
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < V
        x_row = x_ptr + row.to(tl.int64) * V
        hist_row = _row_counters(count_ptr, row) + 4
        if PASS > 0:  # the logits came several kernels ago: read them before the wait
            x = tl.load(x_row + cols, mask=ok, other=0.0)
        _wait_for_previous_kernel(PDL)
        if PASS == 0:
            x = tl.load(x_row + cols, mask=ok, other=0.0)
        key = _keys(x, BITS)
        if PASS > 0:
            prefix, need = _found(hist_row, k, PASS)
            ok = ok & ((key >> (BITS - 8 * PASS)) == prefix)
        hist = tl.histogram(((key >> (BITS - 8 * (PASS + 1))) & 255).to(tl.int32), 256, mask=ok)
        tl.atomic_add(hist_row + PASS * 256 + tl.arange(0, 256), hist, mask=hist > 0, sem="relaxed")

    @triton.jit
    def _draw_kernel(x_ptr, seed_ptr, step_ptr, count_ptr, out_ptr, V, k, inv_t, PROGRAMS: tl.constexpr,
                     BITS: tl.constexpr, STEP: tl.constexpr, PDL: tl.constexpr, BLOCK: tl.constexpr):
        """The race among this program's logits >= tau; the row's last program writes the winner.
        STEP: the row's seed is mixed with the step at step_ptr (module docstring)."""
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < V
        x = tl.load(x_ptr + row.to(tl.int64) * V + cols, mask=ok, other=0.0)
        seed = tl.load(seed_ptr + row)  # seeds and step come from kernels before the digits' (or the host)
        if STEP:  # an odd 64-bit multiplier (wrapping): every step its own Philox key
            seed = seed + tl.load(step_ptr).to(tl.int64) * 0x1E3779B97F4A7C15
        counts_row = _row_counters(count_ptr, row)
        best_ptr = (counts_row).to(tl.pointer_type(tl.uint64))
        _wait_for_previous_kernel(PDL)
        tau, need = _found(counts_row + 4, k, BITS // 8)
        keep = ok & (_keys(x, BITS) >= tau)
        if tl.max(keep.to(tl.int32), 0) > 0:  # most programs hold none of the k best: no draws for them
            e = -tl.log(tl.rand(seed, cols))  # Exp(1); a draw of exactly 0 gives inf, which never wins
            score = x.to(tl.float32) * inv_t - tl.log(e)
            # (score's key, then the lower token id on ties) as one unsigned 64-bit number; 0 = nothing kept
            packed = (_keys(score, 32).to(tl.uint64) << 32) | (~cols).to(tl.uint32, bitcast=True).to(tl.uint64)
            tl.atomic_max(best_ptr, tl.max(tl.where(keep, packed, 0), 0), sem="relaxed")
        if _last_to_finish(counts_row + 2, 0, PROGRAMS):  # every program's offer is in
            won = tl.atomic_xchg(best_ptr, tl.zeros((), dtype=tl.uint64))
            tl.store(out_ptr + row, (~won.to(tl.uint32)).to(tl.int64))  # the low half holds ~token
            tl.store(counts_row + 4 + tl.arange(0, 4 * 256), tl.zeros((4 * 256,), dtype=tl.int32))
            tl.atomic_xchg(counts_row + 2, 0)  # ready for the next call


@torch.library.custom_op("tformer::topk_sample", mutates_args=())
def topk_sample_op(logits: torch.Tensor, seeds: torch.Tensor, step: torch.Tensor | None, counts: torch.Tensor | None,
                   k: int, temperature: float, pdl: bool = False) -> torch.Tensor:
    """(R,) int64 tokens; logits (R, V) contiguous; seeds (R,) int64, mixed with step (1,) int64 when
    given (module docstring); counts as `topk_sample`'s; pdl resolved (`use_pdl`)."""
    R, V = logits.shape
    out = torch.empty(R, dtype=torch.int64, device=logits.device)
    counts = counters(counts, R * ROW_COUNTERS, logits.device)
    block = 128 if INTERPRET else BLOCK
    grid = (R, triton.cdiv(V, block))  # rows first: a grid's second axis stops at 65535
    bits = _BITS[logits.dtype]
    launch = {} if INTERPRET else {"launch_pdl": pdl, "num_warps": 4}
    for p in range(bits // 8):
        _digit_kernel[grid](logits, counts, V, k, BITS=bits, PASS=p, PDL=pdl, BLOCK=block, **launch)
    _draw_kernel[grid](logits, seeds, seeds if step is None else step, counts, out, V, k, 1.0 / temperature,
                       grid[1], BITS=bits, STEP=step is not None, PDL=pdl, BLOCK=block, **launch)
    return out


@topk_sample_op.register_fake
def _(logits, seeds, step, counts, k, temperature, pdl=False):
    bound_operator_str()  # before inductor lowers this op (tformer.inference.kernels.inductor)
    return logits.new_empty(logits.shape[0], dtype=torch.int64)


def topk_sample(logits: torch.Tensor, k: int, temperature: float, generator=None, step: torch.Tensor | None = None,
                seeds: torch.Tensor | None = None, counts: torch.Tensor | None = None,
                pdl: bool | None = None) -> torch.Tensor:
    """One token a row of logits (R, V), drawn from softmax(logits / temperature) over the row's k
    largest logits (all of them tied with the k-th kept); see the module docstring.

    Seeds: drawn from torch's generator (or `generator`) at each call, or with `step` ((1,) int64 on
    the logits' device, different at every call) the given `seeds` (R,) int64, mixed with it.
    counts: int32 counters, zero between calls, at least R * ROW_COUNTERS (`base.counters`; None:
    fresh ones). pdl as `matvec`'s."""
    if not use_topk_sample(logits, k):
        raise ValueError(f"topk_sample takes (R, V) float logits on {DEVICE_TYPE} and 0 < k < V; got "
                         f"{tuple(logits.shape)} {logits.dtype} on {logits.device.type}, k={k}")
    if not temperature > 0:
        raise ValueError(f"topk_sample needs temperature > 0 (temperature 0 is argmax), got {temperature}")
    R = logits.shape[0]
    if step is not None:
        if step.shape != (1,) or step.dtype != torch.int64 or step.device != logits.device:
            raise ValueError(f"topk_sample's step must be a (1,) int64 tensor on {logits.device}, got "
                             f"{tuple(step.shape)} {step.dtype} on {step.device}")
        if seeds is None or seeds.dtype != torch.int64 or seeds.numel() < R:
            raise ValueError(f"topk_sample with a step needs seeds: at least {R} int64 values kept between calls")
        seeds = seeds[:R]
    else:
        seeds = draw_seeds(R, logits.device, generator)
    return topk_sample_op(logits.contiguous(), seeds, step, counts, int(k), float(temperature),
                          use_pdl(logits.device, pdl))
