"""KV-cached generation for a batch of prompts of different lengths (left padded): the step
functions a `DecodeEngine` (tformer.inference.engine) runs.

    prefill: the padded prompts (B, L) fill cache slots 0..L-1 in one forward
    decode:  one token per step at slot L+i

Nothing in a step waits on the host: the key mask is fixed for the whole decode (prompt padding
masked, every later slot valid; causality hides slots not yet written), the slot index is a
device tensor bumped in place, and sampling is tensor ops. The host looks at the tokens only
every `sync_every` steps (to stop early) or when a streaming callback wants them.
"""

from __future__ import annotations

import contextlib
import types
from typing import Callable

import torch

from tformer.inference.sampling import SamplingConfig, sample


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


def decode_step(model, token, input_pos, key_mask, sampling: SamplingConfig, counts=None, workspace=None):
    """One decode step: token (B, 1) at slot input_pos (1,) -> next token (B,). workspace: the
    engine's kernel workspace, or None (tformer.inference.sampling.sample)."""
    logits = model(token, input_pos=input_pos, attention_mask=key_mask)[:, -1]
    return sample(logits, sampling, counts, step=input_pos, workspace=workspace)


def prefill(model, tokens, input_pos, key_mask, sampling: SamplingConfig, counts=None, workspace=None):
    """The prompts (B, L) into cache slots input_pos (L,) -> first new token (B,)."""
    logits = model(tokens, input_pos=input_pos, attention_mask=key_mask)[:, -1]
    return sample(logits, sampling, counts, step=input_pos[-1:], workspace=workspace)


COMPILE_OPTIONS = {"triton.cudagraphs": False, "coordinate_descent_tuning": False}
"""Inductor options for compiled steps: no CUDA graphs of inductor's own (the engine captures its
steps itself, tformer.inference.graphs), and no coordinate-descent tuning, which rewrites every
one-row matmul into a reduction kernel of its own that is slower than the layer's own call (cuBLAS,
tinygemm or the matvec kernel)."""


def compiled(fn, backend: str = "inductor", decode: bool = True, **kwargs):
    """torch.compile of a copy of fn, fullgraph=True: a graph break is an error; a decode step
    (`decode`) on inductor runs with COMPILE_OPTIONS, anything else with inductor's global
    configuration. Each call compiles its own copy of fn's code: dynamo keeps its compiled graphs,
    and its limit of recompiles (torch._dynamo.config.recompile_limit), per code object, so each
    engine's steps count only their own (another model or workspace is another graph)."""
    options = COMPILE_OPTIONS if backend == "inductor" and decode else None
    return torch.compile(_copy(fn), fullgraph=True, backend=backend, options=options, **kwargs)


def _copy(fn):
    """fn as a new function object over a new code object (same code, globals, defaults and closure)."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__, copy.__qualname__, copy.__doc__ = fn.__kwdefaults__, fn.__qualname__, fn.__doc__
    return copy


def compiled_prefill(backend: str = "inductor"):
    """`prefill` compiled: for one prompt, once for any length (dynamic shapes); for a batch, once per
    (batch size, padded length).

    A batch compiles with static shapes: inductor (PyTorch 2.11) cannot generate some fused kernels
    over batch x a symbolic length ("CantSplit: 8 not divisible by 8*s11"), whether the batch size
    is symbolic too or not."""
    one = compiled(prefill, backend, decode=False, dynamic=True)
    batch = compiled(prefill, backend, decode=False, dynamic=False)

    def call(model, tokens, input_pos, key_mask, sampling: SamplingConfig, counts=None, workspace=None):
        return (one if tokens.shape[0] == 1 else batch)(model, tokens, input_pos, key_mask, sampling, counts, workspace)

    return call


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device):
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def prompt_counts(tokens, mask, vocab_size: int, sampling: SamplingConfig):
    """(B, V) occurrences of each token so far, for the repetition penalty (None when off)."""
    if sampling.repetition_penalty == 1.0:
        return None
    counts = torch.zeros(tokens.shape[0], vocab_size, device=tokens.device)
    return counts.scatter_add_(1, tokens, mask.float())


def decode_loop(model, nxt, key_mask, counts, L, max_new_tokens, sampling, stop_ids, on_tokens, sync_every, step_fn,
                workspace=None):
    """Decode steps one call each from the first new token nxt (B,) at slot L, until max_new_tokens,
    every row done (checked every sync_every steps) or on_tokens returning True -> rows of new tokens."""
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
        nxt = step_fn(model, nxt[:, None].clone(), input_pos, key_mask, sampling, counts, workspace).clone()
        input_pos += 1
        new.append(nxt)
    return torch.stack(new, dim=1).tolist()


def note_tokens(nxt, done, stop, counts) -> None:
    """The loop's record of new tokens nxt (B,): done |= nxt is a stop id (stop None: no stop ids, and
    no kernels launched for them), and each row's count of nxt + 1 for the repetition penalty
    (counts None: off)."""
    if stop is not None:
        done |= torch.isin(nxt, stop)
    if counts is not None:
        counts.scatter_add_(1, nxt[:, None], torch.ones_like(counts[:, :1]))


def cut_at_stop(row: list[int], stop_ids) -> list[int]:
    for j, t in enumerate(row):
        if stop_ids and t in stop_ids:
            return row[: j + 1]
    return row
