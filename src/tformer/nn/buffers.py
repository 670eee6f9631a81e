"""Modules whose floating buffers stay fp32: derived tables (RoPE frequencies, sinusoids, ALiBi
slopes) and counters or small learned offsets (MoE token counts, DeepSeek-V3's expert bias)."""

from __future__ import annotations

import torch
from torch import nn


class FP32Buffers(nn.Module):
    """Floating buffers keep dtype fp32 and their values through `model.to(dtype)`.

    `model.to(torch.bfloat16)` would otherwise round RoPE frequencies to 8 bits of mantissa (which
    visibly shifts positions past a few hundred tokens), stop token counts at 256, and swallow the
    small steps of an expert-bias update.
    """

    def _apply(self, fn, recurse=True):
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, buf in list(self._buffers.items()):
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                old = before[name]
                self._buffers[name] = (torch.empty(buf.shape, dtype=torch.float32, device=buf.device) if old.is_meta
                                       else old.to(device=buf.device, dtype=torch.float32))
        return self


class DerivedBuffers(FP32Buffers):
    """Buffers computed from the config by `reset_buffers()` (after a meta build), kept in fp32."""

    def reset_buffers(self) -> None:
        raise NotImplementedError
