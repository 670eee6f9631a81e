"""Linear layers whose few-row forwards read their stored weights through the `matvec` kernel.

Each is a subclass of a layer tformer builds (nn.Linear, Int8Linear, Int4Linear) that only overrides
`forward`, so a decode engine swaps the class in place: weights stay shared (a tied head stays tied)
and checkpoints are unaffected. Calls the kernel does not take (many rows, gradients, other devices)
run the parent's forward.
"""

from __future__ import annotations

from torch import nn

from tformer.inference.kernels.gemv import StoredWeight, matvec, use_matvec
from tformer.quantize.int4 import Int4Linear
from tformer.quantize.int8 import Int8Linear


class MatvecLayer(nn.Module):
    """Mixin: `workspace` (tformer.inference.workspace.Workspace) is set by the engine that swaps it in."""

    workspace = None

    def stored_weight(self) -> StoredWeight | None:
        raise NotImplementedError

    def forward(self, x):
        w = self.stored_weight()
        if w is not None and use_matvec(x, self.in_features, w.fmt):
            ws = self.workspace
            return matvec(x, *w, bias=self.bias, counts=ws.merge, pdl=ws.pdl)
        return super().forward(x)


class MatvecLinear(MatvecLayer, nn.Linear):
    def stored_weight(self) -> StoredWeight | None:
        return StoredWeight(self.weight) if self.weight.is_contiguous() else None


class MatvecInt8Linear(MatvecLayer, Int8Linear):
    def stored_weight(self) -> StoredWeight:
        return StoredWeight(self.weight, self.scales, fmt="int8")


class MatvecInt4Linear(MatvecLayer, Int4Linear):
    def stored_weight(self) -> StoredWeight:
        return StoredWeight(self.weight, self.scales, self.zeros, "int4", self.group_size)


MATVEC_CLASSES = {nn.Linear: MatvecLinear, Int8Linear: MatvecInt8Linear, Int4Linear: MatvecInt4Linear}
