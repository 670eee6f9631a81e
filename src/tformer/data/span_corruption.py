"""T5's span-corruption denoising objective (Raffel et al. 2020, 3.1.4 and 3.3.4): spans of the text
are dropped from the source, each replaced by one sentinel, and the target lists the dropped spans,
each behind its sentinel.

    text    The  quick brown fox  jumps over the  lazy dog
    source  The  <X>         fox  jumps <Y>       dog  </s>
    target  <X> quick brown  <Y>  over the lazy   </s>

As T5's `random_spans_noise_mask`: round(n * noise_density) tokens are noise (at least 1, at most
n - 1), in round(noise / mean_span_length) spans (at least 1); noise and kept tokens are each cut
into that many non-empty spans at random, and kept and noise spans alternate, kept first. Sentinel
i is `first_sentinel - i` (T5's <extra_id_0> is the last id of its tokenizer, 32099). Every draw
comes from a `torch.Generator` the caller seeds.

`collate` makes the batches the `Seq2Seq` objective (train/objectives.py) reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tformer.data.sft import IGNORE


def _segment(n_items: int, n_segments: int, gen: torch.Generator) -> torch.Tensor:
    """Lengths (n_segments,) of a random cut of n_items into non-empty segments."""
    cuts = torch.randperm(n_items - 1, generator=gen)[: n_segments - 1].sort().values + 1  # segment starts
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([n_items])])
    return bounds.diff()


def noise_mask(n: int, gen: torch.Generator, noise_density: float = 0.15,
               mean_span_length: float = 3.0) -> torch.Tensor:
    """(n,) bool, True for the tokens to drop; kept and noise spans alternate, kept first."""
    if n < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {n}")
    n_noise = min(max(round(n * noise_density), 1), n - 1)
    n_spans = min(max(round(n_noise / mean_span_length), 1), n_noise, n - n_noise)
    noise, kept = _segment(n_noise, n_spans, gen), _segment(n - n_noise, n_spans, gen)
    lengths = torch.stack([kept, noise], dim=1).flatten()  # kept, noise, kept, noise, ...
    is_noise = torch.arange(2 * n_spans) % 2 == 1
    return is_noise.repeat_interleave(lengths)


def corrupt(tokens: Sequence[int], gen: torch.Generator, first_sentinel: int, eos_id: int,
            noise_density: float = 0.15, mean_span_length: float = 3.0) -> tuple[list[int], list[int]]:
    """tokens -> (source, target) token lists, each ending in eos_id."""
    mask = noise_mask(len(tokens), gen, noise_density, mean_span_length).tolist()
    source, target, sentinel = [], [], first_sentinel
    for i, (token, noise) in enumerate(zip(tokens, mask)):
        starts = noise and (i == 0 or not mask[i - 1])
        if starts:
            source.append(sentinel)
            target.append(sentinel)
            sentinel -= 1
        (target if noise else source).append(token)
    return source + [eos_id], target + [eos_id]


def collate(pairs: Sequence[tuple[list[int], list[int]]], start_id: int, pad_id: int = 0) -> dict:
    """(source, target) pairs -> a Seq2Seq batch: `src` (B,S) right-padded with pad_id and `src_mask`;
    decoder inputs `tokens` (B,T) = start_id then the target shifted right; `targets` (B,T), IGNORE
    past each target's end; `n_targets`."""
    S, T = max(len(s) for s, _ in pairs), max(len(t) for _, t in pairs)
    src = torch.full((len(pairs), S), pad_id, dtype=torch.long)
    tokens = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    targets = torch.full((len(pairs), T), IGNORE, dtype=torch.long)
    for i, (s, t) in enumerate(pairs):
        src[i, : len(s)] = torch.tensor(s)
        tokens[i, : len(t)] = torch.tensor([start_id, *t[:-1]])
        targets[i, : len(t)] = torch.tensor(t)
    src_mask = (torch.arange(S)[None, :] < torch.tensor([len(s) for s, _ in pairs])[:, None]).long()
    return {"src": src, "src_mask": src_mask, "tokens": tokens, "targets": targets,
            "n_targets": int((targets != IGNORE).sum())}
