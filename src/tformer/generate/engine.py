"""KV-cached generation for a batch of prompts of different lengths (left padded).

    prefill: the padded prompts (B, L) fill cache slots 0..L-1 in one forward
    decode:  one token per step at slot L+i, attending to every valid slot before it
"""

from __future__ import annotations

from typing import Callable

import torch

from tformer.generate.sampling import SamplingConfig, sample


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) tokens and (B, L) mask (1 = real token), rows right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (add a BOS token to an empty prompt)")
    L = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, L - len(p):] = 1
    return tokens, mask


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    stop_ids: set[int] | None = None,
    seed: int | None = None,
    on_tokens: Callable[[torch.Tensor], bool] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (prompt excluded), ending at a stop id (kept) or the limit.

    on_tokens(next_tokens (B,)) is called each step; returning True stops generation
    (used for stop strings and streaming).
    """
    sampling = sampling or SamplingConfig()
    sampling.validate()
    device = next(model.parameters()).device
    tokens, prompt_mask = left_pad(prompts)
    B, L = tokens.shape
    if L + max_new_tokens > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({L} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_seq_len {model.config.max_seq_len}: shorten the prompt or ask for fewer tokens"
        )
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    model.setup_caches(B, L + max_new_tokens)
    try:
        mask = torch.zeros(B, model.cache_slots, dtype=torch.long, device=device)
        mask[:, :L] = prompt_mask.to(device)
        seen = torch.where(prompt_mask.bool(), tokens, -1).to(device)
        logits = model(tokens.to(device), input_pos=torch.arange(L, device=device), attention_mask=mask)[:, -1]
        out = _decode_loop(model, logits, mask, seen, L, max_new_tokens, sampling, stop_ids, generator, on_tokens)
    finally:
        model.clear_caches()
    return out


def _decode_loop(model, logits, mask, seen, L, max_new_tokens, sampling, stop_ids, generator, on_tokens):
    B = logits.shape[0]
    device = logits.device
    stop = torch.tensor(sorted(stop_ids or []), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    new = []
    for i in range(max_new_tokens):
        nxt = sample(logits, sampling, seen, generator)
        new.append(nxt)
        done = done | torch.isin(nxt, stop)
        seen = torch.cat([seen, nxt[:, None]], dim=1)
        if (on_tokens is not None and on_tokens(nxt)) or bool(done.all()) or i == max_new_tokens - 1:
            break
        mask[:, L + i] = 1
        pos = torch.tensor([L + i], device=device)
        logits = model(nxt[:, None], input_pos=pos, attention_mask=mask)[:, -1]
    rows = torch.stack(new, dim=1).tolist()
    return [_cut_at_stop(r, stop_ids) for r in rows]


def _cut_at_stop(row: list[int], stop_ids) -> list[int]:
    for j, t in enumerate(row):
        if stop_ids and t in stop_ids:
            return row[: j + 1]
    return row
