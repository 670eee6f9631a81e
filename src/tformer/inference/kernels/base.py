"""What tformer's Triton kernels share: the optional Triton import, where they run, the launch
switches (programmatic dependent launch, autotuning), counters for in-kernel merges, and small
jit helpers.

On compute capability 9.0 and later the kernels launch with programmatic dependent launch (PDL),
so a chain of small kernels keeps memory busy across kernel boundaries. Each kernel's `pdl=`
(None: TFORMER_PDL's default, on unless TFORMER_PDL=0; an engine passes EngineOptions.pdl) turns
it on or off. What a kernel may do before `_wait_for_previous_kernel`, and the counters' rules,
are in tformer/inference/README.md.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: use_matvec() is then always False
    triton = None
try:  # grid dependency control, for programmatic dependent launch (Triton 3.5 and later)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    HAS_GDC = True
except ImportError:
    HAS_GDC = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE_TYPE = None if triton is None else ("cpu" if INTERPRET else "cuda")  # where the kernel runs

PDL_DEFAULT = os.environ.get("TFORMER_PDL", "1") != "0"  # TFORMER_PDL=0: launch without PDL by default
TUNE = os.environ.get("TFORMER_TUNE", "1") != "0"  # TFORMER_TUNE=0: each kernel's first tile, no timing


def tuned(configs: list, key: list[str], prune=None):
    """triton.autotune over `configs`: each new key times them all (those `prune(configs, named_args)`
    keeps, if given) and keeps the fastest; with TFORMER_TUNE=0 it launches the first (each list puts
    a good default first) and times nothing, for quick starts and tests."""
    def first_unless_tuning(configs, named_args, **kwargs):
        configs = prune(configs, named_args) if prune is not None else configs
        return configs if TUNE else configs[:1]

    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": first_unless_tuning})


def use_pdl(device: torch.device, enabled: bool | None = None) -> bool:
    """Whether kernels on `device` launch with programmatic dependent launch: when `enabled`
    (None: PDL_DEFAULT), compiled (not interpreted), Triton has the intrinsics (3.5 and later), and
    on compute capability 9.0 or later."""
    enabled = PDL_DEFAULT if enabled is None else enabled
    return (enabled and HAS_GDC and not INTERPRET and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def counters(counts: torch.Tensor | None, n: int, device) -> torch.Tensor:
    """`counts` (int32, zero between kernels) checked to hold n counters; None: n fresh zeros.

    Kernels that merge partial results inside one launch (split attention, split-K products, the
    top-k sampler's histograms) count finished programs here; the last to finish merges and sets its
    counter back to zero. A decode engine passes its workspace's arrays (tformer.inference.workspace),
    allocated once so that captured CUDA graphs keep valid addresses; fresh zeros serve direct calls."""
    if counts is None:
        return torch.zeros(max(n, 1), dtype=torch.int32, device=device)
    if counts.dtype != torch.int32 or counts.numel() < n:
        raise ValueError(f"the kernel needs {n} int32 counters, got {counts.numel()} {counts.dtype}: "
                         "size the workspace for this batch (DecodeEngine's max_batch_size)")
    return counts


if triton is not None:
    _INTERPRETED = tl.constexpr(INTERPRET)

    @triton.jit
    def _dot_t(a, b):
        """a @ b^T in fp32 (fp32 inputs exactly, not as TF32)."""
        if _INTERPRETED or a.dtype == tl.float32:  # Triton 3.9's interpreter multiplies bf16 wrongly
            return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
        return tl.dot(a, tl.trans(b))

    @triton.jit
    def _load_x(x_ptr, nw_ptr, cols, ok, inv_rms, NORM: tl.constexpr):
        """x at x_ptr + cols (x_ptr: one row, or a column of row starts) in fp32; with NORM, RMSNorm's
        output (`_norm_x`)."""
        return _norm_x(tl.load(x_ptr + cols, mask=ok, other=0.0), nw_ptr, cols, ok, inv_rms, NORM).to(tl.float32)

    @triton.jit
    def _norm_x(x, nw_ptr, cols, ok, inv_rms, NORM: tl.constexpr):
        """With NORM, RMSNorm's output for x (columns cols, ok) in x's dtype, rounded as the module rounds
        it: x * inv_rms, then * the norm weight (nw_ptr + cols); else x."""
        if NORM:
            h = (x.to(tl.float32) * inv_rms).to(x.dtype)
            x = (h.to(tl.float32) * tl.load(nw_ptr + cols, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
        return x

    @triton.jit
    def _code(u, OFFSET: tl.constexpr):
        """u - OFFSET in fp32, for integers 0 <= u < 2^23, without an int-to-float conversion (a
        quarter-rate instruction on the H100): the bits 0x4B000000 | u are the float 2^23 + u exactly."""
        return (u | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)

    @triton.jit
    def _weight(w, FMT: tl.constexpr):
        """A full-precision or int8 weight tile in fp32 (int8: its code, through `_code`)."""
        if FMT == 1:
            return _code(w.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x80, 128)  # byte q + 128, then q
        return w.to(tl.float32)

    @triton.jit
    def _wait_for_previous_kernel(PDL: tl.constexpr):
        """Under programmatic dependent launch: wait until the previous kernel has finished and its
        writes are visible, then let the next kernel's programs start. What may come before it:
        tformer/inference/README.md."""
        if PDL:
            if not _INTERPRETED:  # the interpreter runs one kernel at a time (and knows no GDC)
                tl.extra.cuda.gdc_wait()
                tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _last_to_finish(count_ptr, group, PARTS: tl.constexpr):
        """Call after storing this program's part of a group's partial results (`counters`):
        whether it is the group's last part to finish. If so, every other part's stores are visible
        to it; it merges them and sets the group's counter back to zero (tl.atomic_xchg)."""
        tl.debug_barrier()  # every thread's stores done before the count says so
        return tl.atomic_add(count_ptr + group, 1) == PARTS - 1  # acq_rel

    def _configs(tiles, stages=(2, 3, 4), **fixed):
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, **fixed}, num_warps=w, num_stages=st)
                for bn, bk, w in tiles for st in stages]
