"""Rotary position embeddings (RoFormer, Su et al. 2021) and context-extension variants.

Shapes: B batch, T query length, H heads, D head_dim, R rotated dims (= D unless partial).
Layout is "rotate half" (the first R/2 dims pair with the last R/2), the layout HF checkpoints
use; interleaved checkpoints (GGUF, DeepSeek's MLA) are reordered by `interleaved_to_half`.
"""

from __future__ import annotations

import math

import torch

from tformer.config import RopeConfig
from tformer.nn.buffers import DerivedBuffers


def rope_inv_freq(rope: RopeConfig, rot_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (R/2,) for the static schemes, and the cos/sin scale (YaRN's mscale)."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    if rope.scaling == "linear":  # position interpolation: positions / factor
        return inv_freq / rope.factor, 1.0
    if rope.scaling == "llama3":
        return _llama3_inv_freq(inv_freq, rope), 1.0
    if rope.scaling == "yarn":
        return _yarn_inv_freq(inv_freq, rope, rot_dim)
    return inv_freq, 1.0  # "none"; "dynamic" rescales per call in RotaryEmbedding


def _llama3_inv_freq(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Llama 3.1: long wavelengths are interpolated by `factor`, short ones kept, a smooth band between.
    old_len = rope.original_max_seq_len
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(inv_freq: torch.Tensor, rope: RopeConfig, rot_dim: int) -> tuple[torch.Tensor, float]:
    # YaRN (Peng et al. 2023): interpolate low frequencies, extrapolate high ones, linear ramp between
    # the dims that complete beta_fast and beta_slow rotations over the original context.
    def correction_dim(n_rot: float) -> float:
        return rot_dim * math.log(rope.original_max_seq_len / (n_rot * 2 * math.pi)) / (2 * math.log(rope.theta))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), rot_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rot_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = inv_freq / rope.factor * (1 - extrapolate) + inv_freq * extrapolate
    scale = rope.attention_factor
    if scale is None:
        scale = 0.1 * math.log(rope.factor) + 1.0 if rope.factor > 1 else 1.0
    return inv_freq, scale


class RotaryEmbedding(DerivedBuffers):
    """positions (B, T) -> (cos, sin), each (B, T, R), computed in fp32 per call (cheap, static)."""

    def __init__(self, rope: RopeConfig, head_dim: int):
        super().__init__()
        self.config = rope
        self.rot_dim = int(head_dim * rope.partial_rotary_factor)
        self.dynamic = rope.scaling == "dynamic"
        self.register_buffer("inv_freq", torch.empty(self.rot_dim // 2), persistent=False)
        self.scale = 1.0
        self.reset_buffers()

    def reset_buffers(self) -> None:
        inv_freq, self.scale = rope_inv_freq(self.config, self.rot_dim)
        with torch.no_grad():
            self.inv_freq.copy_(inv_freq.to(self.inv_freq.device))

    def _dynamic_inv_freq(self, positions: torch.Tensor) -> torch.Tensor:
        # Dynamic NTK: past the original context, grow the base with the current length (no host sync).
        r = self.config
        seq_len = positions.max().float() + 1
        ratio = (r.factor * seq_len / r.original_max_seq_len - (r.factor - 1)).clamp(min=1.0)
        base = r.theta * ratio ** (self.rot_dim / (self.rot_dim - 2))
        base = torch.where(seq_len > r.original_max_seq_len, base, torch.full_like(base, r.theta))
        exps = torch.arange(0, self.rot_dim, 2, device=positions.device, dtype=torch.float32) / self.rot_dim
        return 1.0 / base**exps

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self._dynamic_inv_freq(positions) if self.dynamic else self.inv_freq
        freqs = positions.float()[..., None] * inv_freq  # (B, T, R/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, R)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D); cos/sin (B, T, R). Rotates the first R dims of every head."""
    rot_dim = cos.shape[-1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
    if rot_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def interleaved_to_half(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Reorder rotated dims from interleaved pairs (x0, x1), (x2, x3), ... to our rotate-half layout
    (x0, x2, ..., x1, x3, ...) along `dim`, whose size is one head's rotated dims R.

    For a checkpoint whose RoPE rotates interleaved pairs, apply this to the q and k projection
    rows of every head (weight viewed (H, R, in), dim=1): `apply_rope` then gives the same scores.
    """
    R = x.shape[dim]
    order = torch.cat((torch.arange(0, R, 2), torch.arange(1, R, 2))).to(x.device)
    return x.index_select(dim, order)
