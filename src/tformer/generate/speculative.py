"""Speculative decoding with a small draft model, batch size 1.

Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding";
Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling".

One round, with n tokens in the sequence so far:

    draft:  k autoregressive steps                 -> d_1..d_k, drawn from q_1..q_k
    target: ONE forward over [pending, d_1..d_k]   -> p_1..p_{k+1}  (p_i scores slot n-1+i)
    verify: accept d_i with prob min(1, p_i(d_i) / q_i(d_i)); at the first rejection i draw
            from norm(max(0, p_i - q_i)) and stop; if all k pass, draw a bonus from p_{k+1}

A round emits (accepted + 1) tokens, distributed exactly as if the target sampled them alone
(Leviathan et al., Theorem 3.5). p and q are taken after the same temperature / top-k / top-p /
min-p filtering. Greedy decoding (temperature 0) is the same rule with one-hot p and q:
accept while the draft agrees with the target's argmax, then take the target's argmax.

Caches: each model keeps a static KV cache. Slots written for rejected drafts are not
cleared: the next forward rewrites them, and the causal mask (key slot <= query slot) hides
everything past the current position.

Shapes: B independent rounds (1 in `speculative_generate`), k draft tokens, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tformer.generate.sampling import SamplingConfig, filter_logits


@dataclass
class SpecStats:
    proposed: int = 0  # draft tokens put to the target
    accepted: int = 0  # of those, how many the target accepted
    target_forwards: int = 0  # one per round
    emitted: int = 0  # tokens returned (a stop id may cut the last round short)

    @property
    def acceptance_rate(self) -> float:
        """accepted / proposed (0.0 when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        return self.emitted / self.target_forwards if self.target_forwards else 0.0


@torch.no_grad()
def speculative_generate(
    target,
    draft,
    prompt: list[int],
    max_new_tokens: int,
    k: int = 4,
    sampling: SamplingConfig | None = None,
    stop_ids: set[int] | None = None,
    seed: int | None = None,
) -> tuple[list[int], SpecStats]:
    """New tokens (prompt excluded), ending at a stop id (kept) or after max_new_tokens.

    `draft` proposes k tokens a round, `target` checks them in one forward; the output has
    the target's own distribution (at temperature 0: exactly the target's greedy tokens).
    The draft must share the target's tokenizer. Both models should be in eval mode.
    """
    sampling = sampling or SamplingConfig()
    _check_request(target, draft, prompt, max_new_tokens, k, sampling)
    stats = SpecStats()
    if max_new_tokens == 0:
        return [], stats
    device = next(target.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    for model in (target, draft):
        model.setup_caches(1, len(prompt) + max_new_tokens)
    try:
        seq = torch.tensor(prompt, dtype=torch.long, device=device)
        out = _rounds(target, draft, seq, max_new_tokens, k, sampling, stop_ids or set(), generator, stats)
    finally:
        for model in (target, draft):
            model.clear_caches()
    return out, stats


def _rounds(target, draft, seq, max_new_tokens, k, sampling, stop_ids, generator, stats) -> list[int]:
    """Draft-then-verify rounds until max_new_tokens or a stop id. seq (n,): prompt so far."""
    target_cached = draft_cached = 0  # leading slots of each cache that hold this sequence
    new: list[int] = []
    while len(new) < max_new_tokens:
        n = seq.shape[0]
        k_round = min(k, max_new_tokens - len(new) - 1)  # a round emits up to k_round + 1 tokens
        drafts, q = _propose(draft, seq, draft_cached, k_round, sampling, generator)  # (k,), (k, V)
        inp = torch.cat([seq[target_cached:], drafts])  # pending token(s), then the drafts
        logits = target(inp[None], input_pos=torch.arange(target_cached, n + k_round, device=seq.device))
        p = _probs(logits[0, -(k_round + 1):], sampling)  # (k+1, V)
        n_acc, nxt = verify(p[None], q[None], drafts[None], generator)
        vals = torch.cat([n_acc, drafts, nxt]).tolist()  # the round's one host sync
        a = vals[0]
        tokens = vals[1 : 1 + a] + vals[-1:]
        seq = torch.cat([seq, drafts[:a], nxt])
        target_cached = n + a  # every token but the last (it is fed next round)
        if k_round:  # the draft cached the sequence and d_1..d_{k-1}
            draft_cached = n + min(a, k_round - 1)
        stats.proposed += k_round
        stats.accepted += a
        stats.target_forwards += 1
        for t in tokens:
            new.append(t)
            if t in stop_ids:
                stats.emitted = len(new)
                return new
    stats.emitted = len(new)
    return new


def _propose(draft, seq, cached: int, k: int, sampling, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k draft tokens (k,) and the distributions they were drawn from (k, V).

    The first step feeds every token the draft has not cached yet (the prompt, or the one or
    two tokens of the last round it never saw); each later step feeds the previous draft.
    """
    tokens, qs = [seq[:0]], [torch.empty(0, draft.config.vocab_size, device=seq.device)]
    inp, start = seq[cached:], cached
    for _ in range(k):
        pos = torch.arange(start, start + inp.shape[0], device=seq.device)
        q = _probs(draft(inp[None], input_pos=pos)[0, -1:], sampling)  # (1, V)
        tok = _draw(q, generator)  # (1,)
        tokens.append(tok)
        qs.append(q)
        start, inp = start + inp.shape[0], tok
    return torch.cat(tokens), torch.cat(qs)


def verify(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rejection step of speculative sampling, for B independent rounds.

    p (B, k+1, V): target distributions at the k draft slots and one past them.
    q (B, k, V): the draft distributions that drafts (B, k) were drawn from.
    Returns n_accepted (B,), the leading run of accepted drafts, and the next token (B,):
    drawn from norm(max(0, p - q)) at the first rejection, or from p[:, k] if none.
    """
    B, k = drafts.shape
    V = p.shape[-1]
    px = p[:, :k].gather(-1, drafts[..., None])[..., 0]  # (B, k)
    qx = q.gather(-1, drafts[..., None])[..., 0]  # (B, k); > 0, since drafts ~ q
    u = torch.rand(B, k, generator=generator, device=p.device)
    accept = u * qx < px  # u < p/q: probability min(1, p/q)
    n_acc = accept.long().cumprod(-1).sum(-1)  # (B,)
    residual = (p - F.pad(q, (0, 0, 0, 1))).clamp_min(0)  # (B, k+1, V); row k is p (no draft there)
    idx = n_acc[:, None, None].expand(B, 1, V)
    row, p_row = residual.gather(1, idx)[:, 0], p.gather(1, idx)[:, 0]  # (B, V)
    row = torch.where(row.sum(-1, keepdim=True) > 0, row, p_row)  # p == q up to rounding: use p
    return n_acc, _draw(row, generator)


def _probs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """logits (R, V) -> the distribution sampling draws from (R, V); one-hot when greedy."""
    if sampling.temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return filter_logits(logits, sampling).softmax(-1)


def _draw(probs: torch.Tensor, generator=None) -> torch.Tensor:
    """One token per row of probs (..., V), unnormalised allowed, with no host sync.

    Exponential race: argmax(p / E), E ~ Exp(1), is distributed as p. E is kept above 0 so a
    zero-probability token can never win with 0 / 0 = NaN.
    """
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise.clamp_min(torch.finfo(noise.dtype).tiny)).argmax(-1)


def _check_request(target, draft, prompt, max_new_tokens: int, k: int, sampling: SamplingConfig) -> None:
    sampling.validate()
    if sampling.repetition_penalty != 1.0:
        raise ValueError("speculative_generate does not support repetition_penalty; set it to 1.0")
    if not prompt:
        raise ValueError("the prompt needs at least one token (add a BOS token to an empty prompt)")
    if k < 1:
        raise ValueError(f"k (draft tokens per round) must be >= 1, got {k}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise ValueError(
            f"draft vocab_size {dv} != target vocab_size {tv}: the draft must share the target's tokenizer"
        )
    if next(target.parameters()).device != next(draft.parameters()).device:
        raise ValueError("target and draft must be on the same device")
    for name, model in (("target", target), ("draft", draft)):
        if len(prompt) + max_new_tokens > model.config.max_seq_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the {name}'s "
                f"max_seq_len {model.config.max_seq_len}: shorten the prompt or ask for fewer tokens"
            )
