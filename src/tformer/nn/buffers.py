"""Modules whose buffers are derived from the config (RoPE frequencies, sinusoids, ALiBi slopes)."""

from __future__ import annotations

import torch
from torch import nn


class DerivedBuffers(nn.Module):
    """Buffers are recomputed by `reset_buffers()` and always kept in fp32.

    `model.to(torch.bfloat16)` would otherwise round RoPE frequencies to 8 bits of mantissa,
    which visibly shifts positions past a few hundred tokens.
    """

    def reset_buffers(self) -> None:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name, buf in list(self._buffers.items()):
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32 and not buf.is_meta:
                self._buffers[name] = torch.empty(buf.shape, dtype=torch.float32, device=buf.device)
                self.reset_buffers()
        return self
