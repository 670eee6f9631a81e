"""KV-cached generation for a batch of prompts of different lengths (left padded).

    prefill: the padded prompts (B, L) fill cache slots 0..L-1 in one forward
    decode:  one token per step at slot L+i; the step (forward + sampling) is one function that
             `torch.compile(fullgraph=True)` with CUDA graphs (reduce-overhead's `triton.cudagraphs`)
             captures whole

Nothing in a step waits on the host: the key mask is fixed for the whole decode (prompt padding
masked, every later slot valid; causality hides slots not yet written), the slot index is a
device tensor bumped in place, and sampling is tensor ops. The host looks at the tokens only
every `sync_every` steps (to stop early) or when a streaming callback wants them. On a GPU,
`CapturedDecode` (tformer.generate.captured) also moves the loop's bookkeeping into the graph.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from tformer.generate.sampling import SamplingConfig, prepare_sampling, sample


def left_pad(prompts: list[list[int]], pad_id: int = 0, length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) tokens and (B, L) mask (1 = real token), rows right-aligned; L is the longest prompt's
    length, or `length` if that is more."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (add a BOS token to an empty prompt)")
    L = max(length, *(len(p) for p in prompts))
    tokens = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, L - len(p):] = 1
    return tokens, mask


def decode_step(model, token, input_pos, key_mask, sampling: SamplingConfig, counts=None):
    """One decode step: token (B, 1) at slot input_pos (1,) -> next token (B,)."""
    logits = model(token, input_pos=input_pos, attention_mask=key_mask)[:, -1]
    return sample(logits, sampling, counts, step=input_pos)


def prefill(model, tokens, input_pos, key_mask, sampling: SamplingConfig, counts=None):
    """The prompts (B, L) into cache slots input_pos (L,) -> first new token (B,)."""
    logits = model(tokens, input_pos=input_pos, attention_mask=key_mask)[:, -1]
    return sample(logits, sampling, counts, step=input_pos[-1:])


def compiled_prefill():
    """`prefill` compiled without a CUDA graph: for one prompt, once for any length (dynamic shapes);
    for a batch, once per (batch size, padded length).

    A batch compiles with static shapes because inductor (PyTorch 2.11) failed to generate a fused
    kernel over batch x a symbolic length ("CantSplit: 8 not divisible by 8*s11", batch 8 on an H100),
    whether the batch size was symbolic too or not."""
    one = torch.compile(prefill, dynamic=True, fullgraph=True)
    batch = torch.compile(prefill, dynamic=False, fullgraph=True)

    def call(model, tokens, input_pos, key_mask, sampling: SamplingConfig, counts=None):
        return (one if tokens.shape[0] == 1 else batch)(model, tokens, input_pos, key_mask, sampling, counts)

    return call


def decode_compile_options(cuda_graphs: bool = True) -> dict:
    """Inductor options for compiled decode steps (batch-1 rounds included).

    `mode="reduce-overhead"` is `triton.cudagraphs`. Coordinate-descent tuning is off on purpose:
    with it on, inductor rewrites every one-row matmul into its own reduction kernel, which the
    H100 ran at 0.58-0.93x cuBLAS's speed (bench/gemv.py: the output head 328 vs 191 us); with it
    off a one-row product stays the call the layer makes (cuBLAS, tinygemm, or tformer's matvec
    kernel for int8 layers and after `with_decode_kernels`).
    """
    return {"triton.cudagraphs": cuda_graphs, "coordinate_descent_tuning": False}


def compiled_decode_step(mode: str = "reduce-overhead"):
    """`decode_step` for torch.compile with fullgraph=True (a graph break is an error);
    mode "reduce-overhead" captures it as a CUDA graph, "default" does not."""
    return torch.compile(decode_step, fullgraph=True, options=decode_compile_options(mode == "reduce-overhead"))


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device):
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    stop_ids: set[int] | None = None,
    seed: int | None = None,
    on_tokens: Callable[[torch.Tensor], bool] | None = None,
    step_fn=None,
    prefill_fn=None,
    sync_every: int = 8,
) -> list[list[int]]:
    """New tokens for each prompt (prompt excluded), ending at a stop id (kept) or the limit.

    on_tokens(next_tokens (B,)) is called each step; returning True stops generation (stop
    strings, streaming). step_fn / prefill_fn: `decode_step` / `prefill` or compiled copies
    (`compiled_decode_step()`, `compiled_prefill()`); step_fn may also be a `CapturedDecode`, which
    runs the whole loop from one CUDA graph, and prefill_fn a `CapturedPrefill`, whose
    `padded_length` sets how far the prompts are padded (tformer.generate.captured).
    """
    sampling = sampling or SamplingConfig()
    sampling.validate()
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    device = next(model.parameters()).device
    longest = max((len(p) for p in prompts), default=0)
    padded = getattr(prefill_fn, "padded_length", lambda n: n)(longest)
    if padded + max_new_tokens > model.config.max_seq_len:  # no room for the padding: none
        padded = longest
    tokens, prompt_mask = left_pad(prompts, length=padded)
    B, L = tokens.shape
    if L + max_new_tokens > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({L} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_seq_len {model.config.max_seq_len}: shorten the prompt or ask for fewer tokens"
        )
    with seeded(seed, device):
        model.setup_caches(B, L + max_new_tokens)
        prepare_sampling(sampling, device, B)
        try:
            key_mask = torch.ones(B, model.cache_slots, dtype=torch.long, device=device)
            key_mask[:, :L] = prompt_mask.to(device)
            tokens = tokens.to(device)
            counts = prompt_counts(tokens, key_mask[:, :L], model.config.vocab_size, sampling)
            first = (prefill_fn or prefill)(model, tokens, torch.arange(L, device=device), key_mask, sampling, counts)
            args = (model, first, key_mask, counts, L, max_new_tokens, sampling, stop_ids, on_tokens)
            if hasattr(step_fn, "loop"):  # runs the loop itself (tformer.generate.captured.CapturedDecode)
                rows = step_fn.loop(*args, sync_every)
            else:
                rows = _decode(*args, step_fn or decode_step, sync_every)
        finally:
            model.clear_caches()
    return [_cut_at_stop(r, stop_ids) for r in rows]


def prompt_counts(tokens, mask, vocab_size: int, sampling: SamplingConfig):
    """(B, V) occurrences of each token so far, for the repetition penalty (None when off)."""
    if sampling.repetition_penalty == 1.0:
        return None
    counts = torch.zeros(tokens.shape[0], vocab_size, device=tokens.device)
    return counts.scatter_add_(1, tokens, mask.float())


def _decode(model, nxt, key_mask, counts, L, max_new_tokens, sampling, stop_ids, on_tokens, step_fn, sync_every):
    device = nxt.device
    stop = torch.tensor(sorted(stop_ids or []), dtype=torch.long, device=device)
    done = torch.zeros(nxt.shape[0], dtype=torch.bool, device=device)
    input_pos = torch.tensor([L], device=device)
    new = [nxt]
    for i in range(1, max_new_tokens + 1):
        note_tokens(nxt, done, stop if stop.numel() else None, counts)
        if on_tokens is not None and on_tokens(nxt):
            break
        if i == max_new_tokens or (stop.numel() and i % sync_every == 0 and bool(done.all())):
            break
        nxt = step_fn(model, nxt[:, None].clone(), input_pos, key_mask, sampling, counts).clone()
        input_pos += 1
        new.append(nxt)
    return torch.stack(new, dim=1).tolist()


def note_tokens(nxt, done, stop, counts) -> None:
    """The loop's record of new tokens nxt (B,): done |= nxt is a stop id (stop None: no stop ids, and
    no kernels for them: at batch 1 a step is ~100 short kernels, each launch counts), and each row's
    count of nxt + 1 for the repetition penalty (counts None: off)."""
    if stop is not None:
        done |= torch.isin(nxt, stop)
    if counts is not None:
        counts.scatter_add_(1, nxt[:, None], torch.ones_like(counts[:, :1]))


def _cut_at_stop(row: list[int], stop_ids) -> list[int]:
    for j, t in enumerate(row):
        if stop_ids and t in stop_ids:
            return row[: j + 1]
    return row
