"""Sampling for a batch of unrelated requests, each with its own settings and its own random stream.

A request's randomness is a function of (its seed, the index of the token it samples, the vocabulary
entry), computed by integer hashing: no generator state is shared with batch-mates, so a seeded
request draws the same tokens alone as in any batch. A token is drawn by the Gumbel-max trick:

    token = argmax_v (logits_v / temperature + g_v),   g_v = -log(-log(u(seed, step, v)))

which samples softmax(logits / temperature) exactly; top-k, top-p and min-p first set the logits
they drop to -inf. Shapes: B rows, V vocabulary.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds), on int64 tensors holding 32-bit values;
    the multiplier is small enough that no product leaves int64."""
    for _ in range(2):
        x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    return (x >> 16) ^ x


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) float64 uniforms in (0, 1), a function of (seeds[b], steps[b], v) alone."""
    v = torch.arange(vocab_size, device=seeds.device)
    key = _mix((_mix(seeds & MASK32) + steps) & MASK32)  # (B,)
    h = _mix((key[:, None] * 0x9E37 + v) & MASK32)  # (B, V)
    return (h.double() + 0.5) / 2.0**32


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties: logits - frequency * count - presence * (count > 0), over each row's
    generated tokens. counts (B, V); presence, frequency (B,)."""
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) with what each row's top-k (0: off), top-p (1: off) and min-p (0: off) drop set to
    -inf. Ties with the k-th logit are kept, as tformer.inference's top-k keeps them."""
    V = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    nucleus = bool((top_p < 1).any())
    kmax = V if nucleus else int(k.max())
    # the full sort only where top-p needs every rank; top-k alone needs the kmax largest
    ordered = logits.sort(dim=-1, descending=True).values if kmax == V else logits.topk(kmax, dim=-1).values
    kth = ordered.gather(1, (k - 1)[:, None])  # (B, 1)
    keep = logits >= kth
    if nucleus:
        probs = ordered.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each
        n_nucleus = (before < top_p[:, None]).sum(-1).clamp(min=1)  # (B,)
        keep &= logits >= ordered.gather(1, (n_nucleus - 1)[:, None])
    p = logits.softmax(-1)
    keep &= p >= min_p[:, None] * p.max(-1, keepdim=True).values
    return logits.masked_fill(~keep, float("-inf"))


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                min_p: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """(B,) tokens: greedy where temperature is 0, else a draw from the filtered, tempered
    distribution with each row's own noise (module docstring)."""
    logits = logits.float()
    greedy = temperature <= 0
    if bool(greedy.all()):
        return logits.argmax(-1)
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    if bool((top_k > 0).any() | (top_p < 1).any() | (min_p > 0).any()):  # the sort only where a row filters
        scaled = filter_logits(scaled, top_k, top_p, min_p)
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, steps, logits.shape[-1])))
    drawn = (scaled.double() + gumbel).argmax(-1)
    return torch.where(greedy, logits.argmax(-1), drawn)
