"""Next-token sampling with no host sync: every step is tensor ops on the device.

Shapes: B batch, V vocab, S tokens seen so far.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tformer.inference.kernels.sampling import topk_sample, use_topk_sample
from tformer.inference.workspace import Workspace


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off (nucleus sampling, Holtzman et al. 2020)
    min_p: float = 0.0  # 0: off; keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0  # 1: off (Keskar et al. 2019, CTRL)

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, counts: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's rule: divide positive logits of seen tokens by `penalty`, multiply negative ones.
    counts (B, V): how often each token occurred so far (static shape, so decode can compile)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(counts > 0, penalised, logits)


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks (-inf outside the kept set)."""
    logits = logits.float() / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return _top_p_min_p(logits, cfg)


def _top_p_min_p(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= cfg.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    if cfg.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < cfg.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def sample(logits: torch.Tensor, cfg: SamplingConfig, counts: torch.Tensor | None = None, generator=None,
           step: torch.Tensor | None = None, workspace: Workspace | None = None):
    """logits (B, V) -> next tokens (B,). counts (B, V): token occurrences, for the repetition penalty.

    Top-k keeps every logit tied with the k-th largest, on every path. With a `workspace` (a decode
    engine's, on the kernels' device) top-k alone runs the top-k kernel (tformer.inference.kernels.
    sampling), which draws from the workspace's seeds mixed with `step` ((1,) int64, the token's
    cache slot, different at every call of a request); with a `generator` it draws seeds from it."""
    if counts is not None and cfg.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, counts, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return argmax(logits)
    if workspace is not None and cfg.top_p == 1.0 and cfg.min_p == 0.0 and use_topk_sample(logits, cfg.top_k):
        step = None if generator is not None else step
        return topk_sample(logits, cfg.top_k, cfg.temperature, generator, step, workspace.seeds, workspace.topk,
                           workspace.pdl)
    return race(filter_logits(logits, cfg).softmax(dim=-1), generator)


def race(probs: torch.Tensor, generator=None) -> torch.Tensor:
    """One token per row of probs (R, V), unnormalised allowed, with no host sync.

    Exponential race: argmax(p / E), E ~ Exp(1), is distributed as p. E is kept above 0 so a
    zero-probability token can never win with 0 / 0 = NaN.
    """
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return argmax(probs / noise.clamp_min(torch.finfo(noise.dtype).tiny))


ARGMAX_CHUNK = 1024


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) for x (R, V), ties to the first index, in two parallel stages.

    A compiled argmax over a whole row is one reduction per row, so a 128K vocabulary is scanned
    by one GPU program (tens of microseconds). Here each 1024-wide chunk finds its own maximum
    first, then the row picks the best chunk.
    """
    R, V = x.shape
    if V <= ARGMAX_CHUNK:
        return x.argmax(-1)
    pad = -V % ARGMAX_CHUNK  # -inf padding at the end never wins a tie against a real value
    chunks = F.pad(x, (0, pad), value=float("-inf")).view(R, -1, ARGMAX_CHUNK)
    best, where = chunks.max(-1)  # (R, C)
    c = best.argmax(-1, keepdim=True)  # (R, 1)
    return (c * ARGMAX_CHUNK + where.gather(-1, c)).squeeze(-1)
