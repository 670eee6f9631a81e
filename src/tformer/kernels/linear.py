"""Decode-time nn.Linear: a call with a few rows goes through the `matvec` kernel, anything else through F.linear.

Only the class changes (MatvecLinear is an nn.Linear), so weights stay shared (a tied head stays
tied) and checkpoints are unaffected; `tformer.models.fused.with_decode_kernels` does the swap. On
the H100 the kernel beat cuBLAS for every bf16 weight of a Llama-3.2-1B decode step
(bench/gemv.py), the head by 14%. Quantized layers (tformer.quantize) call the kernel themselves.

Every layer the kernel can read offers `matvec_weight()`: its weight as a `StoredWeight`, or None
when it should not go through the kernel (then fused callers call the layer instead).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from tformer.kernels.gemv import StoredWeight, matvec, use_matvec


class MatvecLinear(nn.Linear):
    def matvec_weight(self) -> StoredWeight | None:
        return StoredWeight(self.weight) if self.weight.is_contiguous() else None

    def forward(self, x):
        w = self.matvec_weight()
        if w is not None and use_matvec(x, self.in_features):
            return matvec(x, *w, bias=self.bias)
        return F.linear(x, self.weight, self.bias)
