"""Decode-time nn.Linear: a one-row call goes through the `matvec` kernel, anything else through F.linear.

    with_matvec(model)   # every full-precision nn.Linear, in place; parameters and state dict unchanged

Only the class changes (MatvecLinear is an nn.Linear), so weights stay shared (a tied head stays
tied), checkpoints are unaffected and `without_matvec` undoes it. On the H100 the kernel beat
cuBLAS for every bf16 weight of a Llama-3.2-1B decode step (bench/gemv.py), the head by 14%.
Quantized layers (tformer.quantize) call the kernel themselves.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from tformer.kernels.gemv import matvec, use_matvec


class MatvecLinear(nn.Linear):
    def forward(self, x):
        if use_matvec(x, self.in_features) and self.weight.is_contiguous():
            y = matvec(x, self.weight)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


def with_matvec(model: nn.Module) -> nn.Module:
    """Route the one-row products of every full-precision nn.Linear in `model` through `matvec`, in place."""
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = MatvecLinear
    return model


def without_matvec(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if type(m) is MatvecLinear:
            m.__class__ = nn.Linear
    return model
