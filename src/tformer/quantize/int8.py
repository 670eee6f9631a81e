"""Weight-only int8: one symmetric absmax scale per output channel.

    weight (N, K) float  ->  q (N, K) int8 in [-128, 127],  scales (N,) float
    w ~= q * scales[:, None]                    |w - q * s| <= s / 2 per element

Activations stay in floating point. The forward dequantizes the weight to x's dtype and calls
F.linear (not `F.linear(x, q) * s`, which inductor lowers to the slow `aten._weight_int8pack_mm`
for prompts). A decode engine reads the stored bytes directly instead (tformer.inference: its
matvec kernel dequantizes in registers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def quantize_int8(weight: torch.Tensor, scales_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (q (N, K) int8, scales (N,) in `scales_dtype`, default the weight's dtype).

    q is computed from the stored (rounded) scales, so the error bound holds for what is saved.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_int8 expects a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).to(scales_dtype or weight.dtype)
    s = scales.float()[:, None]
    q = torch.where(s > 0, w / s, torch.zeros_like(w))  # an all-zero row has scale 0 and stays 0
    return q.round().clamp(-128, 127).to(torch.int8), scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return q.to(dtype) * scales.to(dtype)[:, None]


class Int8Linear(nn.Module):
    """Drop-in for nn.Linear with an int8 weight. Buffers (what a checkpoint stores):
    weight (out, in) int8, scales (out,) float, bias (out,) float or absent."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device=None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, w.device, w.dtype)
        m.weight, m.scales = quantize_int8(w)
        if linear.bias is not None:
            m.bias = linear.bias.detach().clone()
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, dequantize_int8(self.weight, self.scales, x.dtype))  # (..., out)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
