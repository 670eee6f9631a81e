"""Speculative decoding with a small draft model, batch size 1.

Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding";
Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling".

The target's prefill gives the first new token; then rounds, each with n tokens so far, the last
one (`cur`, slot n-1) not yet in either cache:

    draft:  k one-token steps from cur             -> d_1..d_k, drawn from q_1..q_k
            (and one more step that only caches d_k, so the draft never lags the target)
    target: ONE forward over [cur, d_1..d_k]       -> p_1..p_{k+1}  (p_i scores slot n-1+i)
    verify: accept d_i with prob min(1, p_i(d_i) / q_i(d_i)); at the first rejection i draw
            from norm(max(0, p_i - q_i)) and stop; if all k pass, draw a bonus from p_{k+1}

A round emits (accepted + 1) tokens, distributed exactly as if the target sampled them alone
(Leviathan et al., Theorem 3.5). p and q are taken after the same temperature / top-k / top-p /
min-p filtering. Greedy decoding (temperature 0) is the same rule with one-hot p and q:
accept while the draft agrees with the target's argmax, then take the target's argmax.

Every round has the same shapes, so a target engine that uses CUDA graphs (`DecodeEngine.uses_graphs`)
replays it, with its bookkeeping, from one CUDA graph (`SpecRounds`). Caches: each model keeps a static KV cache.
Slots written for rejected drafts are not cleared: the next forward rewrites them, and the causal
mask (key slot <= query slot) hides everything past the current position.

Shapes: B independent rounds (1 in `speculative_generate`), k draft tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tformer.inference.engine import DecodeEngine, EngineOptions
from tformer.inference.graphs import _Captures, capture, model_key
from tformer.inference.sampling import SamplingConfig, apply_repetition_penalty, argmax, filter_logits, race
from tformer.inference.steps import compiled, prompt_counts, seeded


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


def draft_step(model, token, input_pos, sampling: SamplingConfig, counts=None):
    """One draft token: token (1, 1) at slot input_pos (1,) -> (next token (1,), its distribution
    q (1, V), or None when greedy: the greedy rule needs no q)."""
    logits = _penalised(model(token, input_pos=input_pos)[:, -1], sampling, counts)
    if sampling.temperature == 0:
        return argmax(logits), None
    q = filter_logits(logits, sampling).softmax(-1)
    return race(q), q


def target_verify(model, tokens, input_pos, drafts, q, sampling: SamplingConfig, counts=None):
    """The target scores [cur, d_1..d_k] (1, k+1) at slots input_pos (k+1,) and judges the drafts
    (1, k) drawn from q (1, k, V) (None when greedy) -> (n_accepted (1,), next token (1,))."""
    logits = model(tokens, input_pos=input_pos)[0]  # (k+1, V)
    if counts is not None:  # row i has seen d_1..d_i as well
        seen = F.one_hot(drafts[0], logits.shape[-1]).to(counts.dtype).cumsum(0)  # (k, V)
        counts = counts + F.pad(seen, (0, 0, 1, 0))  # (k+1, V)
    logits = _penalised(logits, sampling, counts)
    if sampling.temperature == 0:  # the rule with one-hot p and q, without random draws
        best = argmax(logits)  # (k+1,)
        n_acc = (drafts[0] == best[:-1]).long().cumprod(0).sum(0, keepdim=True)  # (1,)
        return n_acc, best.gather(0, n_acc)
    return verify(filter_logits(logits, sampling).softmax(-1)[None], q, drafts)


def spec_round(target, draft, cur, input_pos, k: int, sampling: SamplingConfig, counts=None):
    """One whole round, the same shapes every time: cur (1, 1) at slot input_pos (1,) ->
    (n_accepted (1,), next token (1,), drafts (1, k)).

    The draft proposes d_1..d_k one token at a time, then also caches d_k (needed when all are
    accepted; otherwise a stale slot the next round rewrites); the target verifies [cur, d_1..d_k]
    in one forward. counts (1, V): tokens seen up to cur, for the repetition penalty.
    """
    tok, drafts, qs = cur[:, 0], [], []
    seen = counts
    for i in range(k):
        tok, q = draft_step(draft, tok.view(1, 1), input_pos + i, sampling, seen)  # (1,), (1, V)
        drafts.append(tok)
        qs.append(q)
        if seen is not None:
            seen = seen.scatter_add(1, tok.view(1, 1), torch.ones_like(seen[:, :1]))
    draft(tok.view(1, 1), input_pos=input_pos + k)
    drafts = torch.stack(drafts, dim=1)  # (1, k)
    slots = input_pos + torch.arange(k + 1, device=input_pos.device)  # (k+1,)
    q = None if sampling.temperature == 0 else torch.stack(qs, 1)
    n_acc, nxt = target_verify(target, torch.cat([cur, drafts], dim=1), slots, drafts, q, sampling, counts)
    return n_acc, nxt, drafts


def round_and_log(target, draft, cur, pos, k: int, sampling: SamplingConfig, counts, first_k, row) -> None:
    """One round and its bookkeeping, in place: cur (1,) at slot pos (1,) -> row (k+2,) =
    [n_accepted, drafts, next]; counts (1, V) gains cur and the accepted drafts; pos moves past
    them; cur becomes next."""
    if counts is not None:
        counts.scatter_add_(1, cur.view(1, 1), torch.ones_like(counts[:, :1]))
    n_acc, nxt, drafts = spec_round(target, draft, cur.view(1, 1), pos, k, sampling, counts)
    torch.cat([n_acc, drafts[0], nxt], out=row)
    if counts is not None:  # the accepted drafts (cur and nxt are counted at a round start)
        counts.scatter_add_(1, drafts, (first_k < n_acc).float()[None])
    pos += n_acc + 1
    cur.copy_(nxt)


@dataclasses.dataclass
class _Round:
    """The static state of a run's rounds (and, with graphs, the graph of one round)."""
    cur: torch.Tensor  # (1,)
    pos: torch.Tensor  # (1,)
    counts: torch.Tensor | None  # (1, V)
    first_k: torch.Tensor  # (k,)
    row: torch.Tensor  # (k + 2,)
    graph: torch.cuda.CUDAGraph | None = None


class SpecRounds(_Captures):
    """How a target engine runs speculative rounds: `round_and_log` eager, compiled (fullgraph, one
    graph per k), or with `graphs` also replayed from a CUDA graph per (models, k, sampling)."""

    def __init__(self, compile: bool = False, graphs: bool = False, warmup: int = 2, max_captures: int = 8,
                 backend: str = "inductor"):
        super().__init__(warmup, max_captures)
        self.graphs = graphs
        self.fn = compiled(round_and_log, backend, dynamic=False) if compile else round_and_log

    def state(self, target, draft, k: int, sampling: SamplingConfig, counts) -> _Round:
        device = next(target.parameters()).device

        def make():
            return _Round(torch.zeros(1, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device),
                          None if counts is None else torch.zeros_like(counts), torch.arange(k, device=device),
                          torch.zeros(k + 2, dtype=torch.long, device=device))

        if not self.graphs:
            return make()
        return self._entry((model_key(target), model_key(draft), k, dataclasses.astuple(sampling), counts is None),
                           make)

    def run(self, target, draft, st: _Round, k: int, sampling: SamplingConfig) -> None:
        """One round on the state st (its row then holds the round's log)."""
        if not self.graphs or st.cur.device.type != "cuda":
            self.fn(target, draft, st.cur, st.pos, k, sampling, st.counts, st.first_k, st.row)
            return
        if st.graph is None:  # warm-up and replay write the same cache slots from the same state
            def fn(clone: bool) -> None:
                c = (lambda t: None if t is None else t.clone()) if clone else (lambda t: t)
                self.fn(target, draft, c(st.cur), c(st.pos), k, sampling, c(st.counts), st.first_k, c(st.row))

            st.graph = capture(fn, self.warmup, st.cur.device)[0]
        st.graph.replay()


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
    sync_every: int = 4,
    options: EngineOptions | None = None,
) -> tuple[list[int], SpecStats]:
    """New tokens (prompt excluded), ending at a stop id (kept) or after max_new_tokens.

    `draft` proposes k tokens a round, `target` checks them in one forward; the output has
    the target's own distribution (at temperature 0: exactly the target's greedy tokens).
    target, draft: DecodeEngines, or models (each then gets an engine made with `options` for this
    call). The draft must share the target's tokenizer. The target engine decides how rounds run
    (`SpecRounds`: compiled with its compile option, replayed from CUDA graphs where it uses them).
    sync_every: rounds a batch; the host reads a batch's tokens while the next batch runs (so up to
        sync_every rounds may run past a stop id; their results are dropped).
    """
    engines = [e if isinstance(e, DecodeEngine) else DecodeEngine(e, options or EngineOptions(max_batch_size=1))
               for e in (target, draft)]
    try:
        return _generate(*engines, prompt, max_new_tokens, k, sampling or SamplingConfig(), stop_ids or set(), seed,
                         sync_every)
    finally:
        for given, engine in zip((target, draft), engines):
            if engine is not given:
                engine.close()


def _generate(target: DecodeEngine, draft: DecodeEngine, prompt, max_new_tokens, k, sampling, stop_ids, seed,
              sync_every) -> tuple[list[int], SpecStats]:
    _check_request(target.model, draft.model, prompt, max_new_tokens, k, sampling)
    if sync_every < 1:
        raise ValueError(f"sync_every (rounds between host syncs) must be >= 1, got {sync_every}")
    stats = SpecStats()
    if max_new_tokens == 0:
        return [], stats
    if target.spec_rounds is None:
        target.spec_rounds = SpecRounds(target.options.compile, target.uses_graphs,
                                        backend=target.options.compile_backend)
    with seeded(seed, target.device):
        for engine in (target, draft):
            engine.prepare(1, sampling)
            engine.attach_caches(1, len(prompt) + max_new_tokens + k, chunk=k + 1)  # a round goes back <= k
        try:
            out = _run(target, draft, prompt, max_new_tokens, k, sampling, stop_ids, stats, sync_every)
        finally:
            for engine in (target, draft):
                engine.model.clear_caches()
    for engine in (target, draft):
        engine.check()
    stats.emitted = len(out)
    return out, stats


def _run(target: DecodeEngine, draft: DecodeEngine, prompt, max_new_tokens, k, sampling, stop_ids, stats,
         sync_every: int) -> list[int]:
    """Prefill both models, then draft-then-verify rounds until max_new_tokens or a stop id.

    Invariant at each round start: n tokens so far, both caches hold slots 0..n-2, and the last
    token `cur` (slot n-1, on the device like the slot) is fed next. The rounds run without the
    host: each writes [n_accepted, drafts, next] to a log row and moves cur and the slot on the
    device. The host queues them in batches of up to `sync_every` rounds and reads a batch's log
    only after queuing the next batch, so the device never waits for the host between batches.
    A batch is never longer than the tokens left allow, even if every draft of every round still
    unread were accepted, so no round writes past the caches; rounds after a stop id are dropped,
    stats included.
    """
    device = target.device
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    L = len(prompt)
    counts = prompt_counts(tokens, torch.ones_like(tokens), target.model.config.vocab_size, sampling)
    slots = torch.arange(L, device=device)
    first = target.prefill_fn(target.model, tokens, slots, None, sampling, counts, target.workspace)
    draft.prefill_fn(draft.model, tokens, slots, None, sampling, counts, draft.workspace)
    rounds = target.spec_rounds
    st = rounds.state(target.model, draft.model, k, sampling, counts)
    st.cur.copy_(first)
    st.pos.fill_(L)  # cur's slot
    if counts is not None:
        st.counts.copy_(counts)
    stats.target_forwards, new = 1, [int(st.cur)]
    logs = torch.empty(2, sync_every, k + 2, dtype=torch.long, device=device)  # two batches: one read, one run
    host_logs = torch.empty(logs.shape, dtype=torch.long, pin_memory=device.type == "cuda")
    unread: tuple[int, int, torch.cuda.Event | None] | None = None  # (rounds, log, copied) of the batch in flight
    which = 0
    while not (new[-1] in stop_ids or len(new) >= max_new_tokens):
        in_flight = unread[0] if unread else 0
        n_rounds = min(sync_every, (max_new_tokens - len(new)) // (k + 1) - in_flight)
        queued = None
        if n_rounds > 0 or not unread:
            batch = max(1, n_rounds)
            for r in range(batch):
                rounds.run(target.model, draft.model, st, k, sampling)
                logs[which, r].copy_(st.row)
            queued = (batch, which, _copy_to_host(logs[which, :batch], host_logs[which, :batch]))
            which ^= 1
        if unread:
            n, log, copied = unread
            if copied is not None:
                copied.synchronize()
            for vals in host_logs[log, :n].tolist():
                a = vals[0]
                stats.proposed, stats.accepted, stats.target_forwards = (stats.proposed + k, stats.accepted + a,
                                                                         stats.target_forwards + 1)
                for t in vals[1 : 1 + a] + vals[-1:]:
                    new.append(t)
                    if t in stop_ids or len(new) >= max_new_tokens:
                        return new
        unread = queued
    return new


def _copy_to_host(log: torch.Tensor, host_log: torch.Tensor) -> torch.cuda.Event | None:
    """Queue the copy of log to host_log; the event it records (None on CPU, where it is done)."""
    host_log.copy_(log, non_blocking=True)
    if log.device.type != "cuda":
        return None
    copied = torch.cuda.Event()
    copied.record()
    return copied


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
    rng = {} if generator is None else {"generator": generator}  # rand's generator overload: no symbolic sizes
    u = torch.rand(B, k, device=p.device, **rng)
    accept = u * qx < px  # u < p/q: probability min(1, p/q)
    n_acc = accept.long().cumprod(-1).sum(-1)  # (B,)
    residual = (p - F.pad(q, (0, 0, 0, 1))).clamp_min(0)  # (B, k+1, V); row k is p (no draft there)
    idx = n_acc[:, None, None].expand(B, 1, V)
    row, p_row = residual.gather(1, idx)[:, 0], p.gather(1, idx)[:, 0]  # (B, V)
    row = torch.where(row.sum(-1, keepdim=True) > 0, row, p_row)  # p == q up to rounding: use p
    return n_acc, race(row, generator)


def _penalised(logits: torch.Tensor, sampling: SamplingConfig, counts=None) -> torch.Tensor:
    """logits (R, V) after the repetition penalty; counts (R|1, V): tokens seen so far."""
    return logits if counts is None else apply_repetition_penalty(logits, counts, sampling.repetition_penalty)


def _check_request(target, draft, prompt, max_new_tokens: int, k: int, sampling: SamplingConfig) -> None:
    sampling.validate()
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
        if model.config.ssd is not None:
            raise ValueError(f"the {name} has SSD layers (ssd), whose recurrent state cannot take back rejected "
                             "drafts: speculative decoding needs KV caches")
        if model.config.attention.approx != "none":
            raise ValueError(f"the {name} attends with attention.approx={model.config.attention.approx!r}, whose "
                             "running state cannot take back rejected drafts: speculative decoding needs KV caches")
        if len(prompt) + max_new_tokens + k > model.config.max_seq_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) + k ({k}, the last round's "
                f"drafts) exceeds the {name}'s max_seq_len {model.config.max_seq_len}: shorten the prompt or "
                "ask for fewer tokens"
            )
