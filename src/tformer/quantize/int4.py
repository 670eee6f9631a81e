"""Weight-only int4: asymmetric groups of `group_size` input channels, two weights per byte.

    weight (N, K) float -> q (N, K) in [0, 15], scales/zeros (N, K/g) float   (g = group_size)
    w ~= (q - 8) * scale + zero                 |w - dequant| <= scale / 2 per element
    packed (N, K/2) uint8: byte j = q[:, 2j] << 4 | q[:, 2j+1]

This stored form is device-independent and is what a checkpoint holds. The convention
(offset 8, float zero, even column in the high nibble) is the one of PyTorch's tinygemm
kernel, so on a CUDA GPU (sm80+) the kernel's tiled layout is one call away:
`aten._convert_weight_to_int4pack(packed, inner_k_tiles)` (uint8 input since torch 2.5), used by
`aten._weight_int4pack_mm(x_bf16, w, group_size, scales_and_zeros (K/g, N, 2) bf16)`.
That layout is derived, never saved: it is rebuilt whenever the module moves or is loaded.
A few rows of x (up to `Int4Linear.tinygemm_max_rows`) go to tinygemm; elsewhere (CPU, a prompt,
shapes tinygemm refuses) the forward dequantizes to x.dtype and calls F.linear. For one row a
decode engine reads the stored form directly instead, unless EngineOptions(int4="tinygemm")
(tformer.inference: its matvec kernel, fused with the norm, SwiGLU and residual around the layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUP_SIZES = (32, 64, 128, 256)  # what the tinygemm kernel accepts


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) integers in [0, 15] -> (N, K/2) uint8, even columns in the high nibble."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even number of columns, got shape {tuple(q.shape)}")
    q = q.to(torch.uint8)
    return (q[..., 0::2] << 4) | q[..., 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 in [0, 15]; the inverse of pack_int4."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).flatten(-2)


def check_group_size(in_features: int, group_size: int, name: str = "layer") -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {GROUP_SIZES}, got {group_size}")
    if in_features % group_size:
        fits = [g for g in GROUP_SIZES if in_features % g == 0]
        hint = f"use a group size in {fits}" if fits else "quantize it with int8, or skip it"
        raise ValueError(
            f"int4 group_size {group_size} does not divide in_features {in_features} of {name}: {hint}"
        )


@torch.no_grad()
def quantize_int4(weight: torch.Tensor, group_size: int, scales_dtype: torch.dtype | None = None):
    """(N, K) float -> (packed (N, K/2) uint8, scales (N, K/g), zeros (N, K/g)).

    scales/zeros are rounded to `scales_dtype` (default the weight's dtype) before q is chosen,
    so q is the best code for the stored parameters.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_int4 expects a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    N, K = weight.shape
    check_group_size(K, group_size)
    dtype = scales_dtype or weight.dtype
    w = weight.float().reshape(N, K // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((hi - lo).clamp(min=1e-6) / 15).to(dtype)
    zeros = (lo + 8 * scales.float()).to(dtype)  # the value of code 8: lo = zero - 8 * scale
    q = (w - zeros.float()[..., None]) / scales.float()[..., None] + 8
    q = q.round().clamp(0, 15).reshape(N, K)
    return pack_int4(q), scales, zeros


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, K) weight in `dtype` that the stored form stands for."""
    q = unpack_int4(packed)
    N, K = q.shape
    q = q.reshape(N, K // group_size, group_size).to(dtype)
    w = (q - 8) * scales.to(dtype)[..., None] + zeros.to(dtype)[..., None]
    return w.reshape(N, K)


def _inner_k_tiles(K: int) -> int | None:
    return next((t for t in (8, 4, 2) if K % (16 * t) == 0), None)


def tinygemm_supported(weight: torch.Tensor, in_features: int, group_size: int) -> bool:
    """Whether the CUDA int4 kernel can run this layer (else the dequantizing fallback is used)."""
    if weight.device.type != "cuda" or torch.version.hip is not None:
        return False
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm") or torch.cuda.get_device_capability(weight.device) < (8, 0):
        return False
    return group_size in GROUP_SIZES and weight.shape[0] % 8 == 0 and _inner_k_tiles(in_features) is not None


class Int4Linear(nn.Module):
    """Drop-in for nn.Linear with a grouped int4 weight. Buffers (what a checkpoint stores):
    weight (out, in/2) uint8, scales and zeros (out, in/group_size) float, bias (out,) or absent.
    The non-persistent int4pack / scales_and_zeros hold the CUDA kernel's layout, or None.
    tinygemm_max_rows: more rows of x than this (a prompt) dequantize the weight and run cuBLAS instead
    of tinygemm, whose kernel is built for a few rows."""

    tinygemm_max_rows = 16

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 64,
                 device=None, dtype: torch.dtype | None = None):
        super().__init__()
        check_group_size(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        dtype = dtype or torch.get_default_dtype()
        n_groups = in_features // group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, n_groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.empty(out_features, n_groups, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("int4pack", None, persistent=False)
        self.register_buffer("scales_and_zeros", None, persistent=False)
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, w.device, w.dtype)
        m.weight, m.scales, m.zeros = quantize_int4(w, group_size)
        if linear.bias is not None:
            m.bias = linear.bias.detach().clone()
        m.refresh_layout()
        return m

    @torch.no_grad()
    def refresh_layout(self) -> None:
        """Derive the CUDA kernel's layout from the stored form (None where it does not apply)."""
        self.int4pack = self.scales_and_zeros = None
        if self.weight.is_meta or not tinygemm_supported(self.weight, self.in_features, self.group_size):
            return
        tiles = _inner_k_tiles(self.in_features)
        self.int4pack = torch.ops.aten._convert_weight_to_int4pack(self.weight.contiguous(), tiles)
        sz = torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1)  # (K/g, N, 2)
        self.scales_and_zeros = sz.to(torch.bfloat16).contiguous()

    def _apply(self, fn, recurse=True):
        self.int4pack = self.scales_and_zeros = None  # device-specific: rebuilt below, not converted
        super()._apply(fn, recurse)
        self.refresh_layout()
        return self

    def tinygemm_applies(self, dtype: torch.dtype) -> bool:
        """Whether tinygemm can take x in `dtype`: its layout is built (CUDA) and x is bf16."""
        return self.int4pack is not None and dtype == torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.tinygemm_applies(x.dtype) and x.numel() <= self.tinygemm_max_rows * self.in_features:
            x2 = x.reshape(-1, self.in_features).contiguous()  # (M, K)
            y = torch.ops.aten._weight_int4pack_mm(x2, self.int4pack, self.group_size, self.scales_and_zeros)
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if bias is None else y + bias
        # exactly F.linear with the dequantized weight (the bias inside: the product rounds once with it)
        return F.linear(x, dequantize_int4(self.weight, self.scales, self.zeros, self.group_size, x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}")


def _refresh_after_load(module: Int4Linear, incompatible_keys) -> None:
    module.refresh_layout()
