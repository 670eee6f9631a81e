"""Beam search for decoder-only and encoder-decoder models, batched over prompts.

    result = beam_search(model, prompts, max_new_tokens=40, beams=4, n_best=2, length_penalty=1.0)
    result.sequences[b][j], result.scores[b][j]   # prompt b's j-th best: new tokens (an end id kept), score

Scoring and stopping are those of HF transformers' `generate(num_beams=k, do_sample=False)`:
each step the K = max(2, 1 + n_eos) * k best continuations of all live beams (summed log-probs)
are taken; a continuation ending in an end id (or reaching max_new_tokens) is finished, kept
among the k best finished hypotheses with score = sum log-prob / penalty(length) when it is
one of the k best continuations; the k best unfinished continue. length counts new tokens,
the end id included. penalty: "exponent" len ** alpha (HF's length_penalty), "gnmt"
((5 + len) / 6) ** alpha (Wu et al. 2016, "Google's Neural Machine Translation System", eq. 14).

early_stopping (HF's semantics): True stops a prompt once it has k finished hypotheses;
False stops it once it has k and the best live beam, scored at its current length, cannot beat
the worst of them; "never" likewise but scores the live beam at max_new_tokens when alpha > 0
(a true bound, log-probs being <= 0). A prompt that stopped changes no more while others go on.

Batched = alone: every prompt's k beams are rows of one batch, left-padded with a key mask
(positions count real tokens only), so a prompt's hypotheses and scores do not depend on the
other prompts in the call (HF's batched beam search is known not to promise this;
tests/test_beam.py holds it token for token, scores within 1e-5 in fp32).

Models plug in through a Stepper (four methods, rows N = prompts x beams):

    prefill(prompts, beams, max_new_tokens) -> (B, V) logits of each prompt's first new token;
        afterwards the stepper holds N rows, row b * beams + j = beam j of prompt b, all in the
        prompt's state (caches sized for max_new_tokens more tokens)
    step(tokens (N, 1)) -> (N, V) logits of the next token of each row
    reorder(rows (N,)) -> None: row i takes the state (caches) of row rows[i]; rows[i] is always
        a row of the same prompt, so per-prompt state (a key mask, an encoder's output and its
        cross-attention cache) never needs moving
    close() -> None: drop the caches

`DecoderStepper` is the decoder-only one (the model's static KV caches), which `beam_search` makes
for a decoder-only model; `tformer.inference.seq2seq.EncoderDecoderStepper` is the encoder-decoder
one (sources encoded in prefill, the decoder's start token fed, self-attention caches reordered with
`reorder_caches`, cross-attention caches filled once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from tformer.inference.engine import DecodeEngine
from tformer.inference.steps import left_pad

NEVER = -1.0e9
"""Score offset that keeps a candidate out of a top-k (HF's constant, kept for identical ties)."""


class Stepper(Protocol):
    def prefill(self, prompts: list[list[int]], beams: int, max_new_tokens: int) -> torch.Tensor: ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def reorder(self, rows: torch.Tensor) -> None: ...

    def close(self) -> None: ...


@dataclass
class BeamConfig:
    """beams: hypotheses kept per prompt. n_best: how many finished ones to return (<= beams).
    length_penalty: alpha of `penalty` ("exponent": len ** alpha; "gnmt": ((5 + len) / 6) ** alpha);
    0 ranks by summed log-prob, > 0 favours longer hypotheses. early_stopping: True, False or
    "never" (module docstring). min_new_tokens: end ids are barred before this many new tokens."""

    beams: int = 4
    n_best: int = 1
    length_penalty: float = 1.0
    penalty: str = "exponent"
    early_stopping: bool | str = False
    min_new_tokens: int = 0

    def validate(self) -> None:
        if self.beams < 1:
            raise ValueError(f"beams must be >= 1, got {self.beams}")
        if not 1 <= self.n_best <= self.beams:
            raise ValueError(f"n_best must be between 1 and beams ({self.beams}), got {self.n_best}: "
                             f"ask for fewer hypotheses or more beams")
        if self.penalty not in ("exponent", "gnmt"):
            raise ValueError(f"penalty must be 'exponent' (len ** alpha) or 'gnmt' (((5 + len) / 6) ** alpha), "
                             f"got {self.penalty!r}")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")

    def length_factor(self, n: int) -> float:
        """The divisor of a hypothesis with n new tokens' summed log-prob."""
        base = n if self.penalty == "exponent" else (5 + n) / 6
        return base ** self.length_penalty


@dataclass
class BeamResult:
    """Per prompt, its n_best hypotheses best first: new tokens (prompt excluded, an end id kept)
    and score (summed log-prob / length factor)."""

    sequences: list[list[list[int]]] = field(default_factory=list)
    scores: list[list[float]] = field(default_factory=list)


def reorder_caches(caches: list[nn.Module], rows: torch.Tensor) -> None:
    """Row i of every buffer of `caches` (batch first: KVCache, LatentCache) takes row rows[i]."""
    for cache in caches:
        for buf in cache.buffers():
            buf.copy_(buf.index_select(0, rows))


class DecoderStepper:
    """A decoder-only model's Stepper (tformer.models.Decoder): static KV caches for all rows, the
    prompts left-padded under one key mask; decode steps write slot L + i for every row."""

    def __init__(self, model: nn.Module):
        architecture = getattr(getattr(model, "config", None), "architecture", None)
        if architecture != "decoder" or not hasattr(model, "make_caches"):
            raise ValueError(f"{type(model).__name__} ({architecture or 'no config'}) is not a decoder-only model "
                             "with KV caches: beam search runs one of those (tformer.models.Decoder) or any model "
                             "through a Stepper (tformer.inference.beam)")
        self.model = model.eval()
        self.caches, self.key_mask, self.slot = None, None, 0

    def prefill(self, prompts: list[list[int]], beams: int, max_new_tokens: int) -> torch.Tensor:
        model = self.model
        device = next(model.parameters()).device
        tokens, mask = left_pad(prompts)  # (B, L)
        B, L = tokens.shape
        if int(tokens.max()) >= model.config.vocab_size or int(tokens.min()) < 0:
            bad = next(t for p in prompts for t in p if not 0 <= t < model.config.vocab_size)
            raise ValueError(f"token id {bad} is outside the model's vocabulary (0..{model.config.vocab_size - 1})")
        if L + max_new_tokens > model.config.max_seq_len:
            raise ValueError(f"prompt ({L} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                             f"max_seq_len {model.config.max_seq_len}: shorten the prompt or ask for fewer tokens")
        self.caches = model.make_caches(B * beams, L + max_new_tokens)
        model.attach_caches(self.caches)
        self.key_mask = torch.ones(B * beams, L + max_new_tokens, dtype=torch.long, device=device)  # (N, S)
        self.key_mask[:, :L] = mask.repeat_interleave(beams, 0).to(device)
        logits = model(tokens.to(device), input_pos=torch.arange(L, device=device),
                       attention_mask=self.key_mask[::beams])[:, -1]  # (B, V), caches' rows 0..B-1
        self.reorder(torch.arange(B, device=device).repeat_interleave(beams))
        self.slot = L
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        input_pos = torch.tensor([self.slot], device=tokens.device)
        self.slot += 1
        return self.model(tokens, input_pos=input_pos, attention_mask=self.key_mask)[:, -1]  # (N, V)

    def reorder(self, rows: torch.Tensor) -> None:
        reorder_caches(self.caches, rows)

    def close(self) -> None:
        self.model.clear_caches()
        self.caches = self.key_mask = None


@torch.no_grad()
def beam_search(model, prompts: list[list[int]], max_new_tokens: int, config: BeamConfig | None = None,
                eos_ids=None, **overrides) -> BeamResult:
    """Beam search from each prompt (token ids) in one batch. model: a decoder-only model or a
    Stepper; config: BeamConfig, its fields also as keyword overrides (beams=4, n_best=2, ...);
    eos_ids: the end ids (any number, or None)."""
    config = BeamConfig(**{**(config or BeamConfig()).__dict__, **overrides})
    config.validate()
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if isinstance(model, DecodeEngine):
        if model.workspace is not None:
            raise ValueError("beam search runs the model's plain classes: pass the model, not a DecodeEngine "
                             "with decode kernels swapped in (or make the engine with kernels=False)")
        model = model.model
    stepper = model if hasattr(model, "reorder") else DecoderStepper(model)
    try:
        return search(stepper, prompts, max_new_tokens, config, sorted(set(eos_ids or [])))
    finally:
        stepper.close()


def search(stepper: Stepper, prompts: list[list[int]], max_new_tokens: int, config: BeamConfig,
           eos_ids: list[int]) -> BeamResult:
    """The search itself (`beam_search`), on a Stepper. Shapes: B prompts, k beams, K candidates
    kept a step, V vocab, T = max_new_tokens."""
    B, k, T = len(prompts), config.beams, max_new_tokens
    logits = stepper.prefill(prompts, k, T).repeat_interleave(k, 0)  # (B k, V)
    device, V = logits.device, logits.shape[-1]
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    K = max(2, 1 + len(eos_ids)) * k  # enough that k candidates are unfinished after any step
    if K > k * V:
        raise ValueError(f"{k} beams with {len(eos_ids)} end ids need a vocabulary of at least {K // k} tokens")
    first_k = torch.arange(K, device=device) < k  # (K,): candidates that may finish
    live = torch.zeros(B, k, T, dtype=torch.long, device=device)  # live beams' tokens
    live_scores = torch.full((B, k), NEVER, device=device)
    live_scores[:, 0] = 0.0  # one beam at the start: the others would repeat it
    done = Finished(B, k, T, device)
    searching = torch.ones(B, 1, dtype=torch.bool, device=device)  # may still improve (early stopping)
    for t in range(T):
        logp = F.log_softmax(logits.float(), dim=-1)  # (B k, V)
        if t < config.min_new_tokens and eos.numel():
            logp[:, eos] = float("-inf")
        scores, index = (logp.view(B, k, V) + live_scores[..., None]).view(B, k * V).topk(K)  # (B, K)
        beam, token = index // V, index % V
        cand = live.gather(1, beam[..., None].expand(-1, -1, T)).clone()  # (B, K, T)
        cand[:, :, t] = token
        ends = torch.isin(token, eos) | (t + 1 == T)  # (B, K)

        keep = (scores + ends.float() * NEVER).topk(k).indices  # (B, k): the best unfinished
        live, live_scores = _take(cand, keep), _take(scores + ends.float() * NEVER, keep)
        rows = _take(beam, keep) + torch.arange(B, device=device)[:, None] * k  # (B, k): their parent rows

        finishing = ends & first_k  # (B, K)
        final = scores / config.length_factor(t + 1)  # each term added alone, as HF does: same ties
        final = final + (done.full() & (config.early_stopping is True)).float() * NEVER
        final = final + (~searching).float() * NEVER
        final = final + (~finishing) * NEVER
        done.merge(cand, final, finishing, t + 1)
        if t + 1 == T:
            break
        searching &= _may_improve(live_scores, done, t + 1, T, config)
        if not bool((searching & ~(done.full() & (config.early_stopping is True))).any()):
            break  # every prompt has stopped
        stepper.reorder(rows.flatten())
        logits = stepper.step(live[:, :, t].reshape(B * k, 1))
    n = config.n_best
    lengths, tokens = done.lengths[:, :n].tolist(), done.tokens[:, :n].tolist()
    return BeamResult([[row[:m] for row, m in zip(tokens[b], lengths[b])] for b in range(B)],
                      done.scores[:, :n].tolist())


class Finished:
    """Each prompt's k best finished hypotheses, best first: tokens (B, k, T), lengths (B, k),
    scores (B, k) and flag (B, k): True where a slot holds one (else score is NEVER)."""

    def __init__(self, B: int, k: int, T: int, device):
        self.tokens = torch.zeros(B, k, T, dtype=torch.long, device=device)
        self.lengths = torch.zeros(B, k, dtype=torch.long, device=device)
        self.scores = torch.full((B, k), NEVER, device=device)
        self.flag = torch.zeros(B, k, dtype=torch.bool, device=device)

    def full(self) -> torch.Tensor:
        """(B, 1): every slot holds a finished hypothesis."""
        return self.flag.all(dim=1, keepdim=True)

    def merge(self, cand, scores, finishing, length: int) -> None:
        """Keep the k best of these and candidates cand (B, K, T) scored `scores` (B, K)."""
        k = self.scores.shape[1]
        scores = torch.cat((self.scores, scores), dim=1)
        best = scores.topk(k).indices
        self.scores = _take(scores, best)
        self.tokens = _take(torch.cat((self.tokens, cand), dim=1), best)
        self.lengths = _take(torch.cat((self.lengths, torch.full_like(cand[:, :, 0], length)), dim=1), best)
        self.flag = _take(torch.cat((self.flag, finishing), dim=1), best)


def _may_improve(live_scores, done: Finished, n: int, T: int, config: BeamConfig) -> torch.Tensor:
    """(B, 1): the best live beam, scored at the best length it may reach, beats the worst finished
    hypothesis (or a slot is empty). With early_stopping "never" and alpha > 0 that length is T
    (a bound); otherwise its current length n (HF's heuristic)."""
    best_n = T if config.early_stopping == "never" and config.length_penalty > 0 else n
    best = live_scores[:, :1] / config.length_factor(best_n)  # (B, 1)
    worst = torch.where(done.flag, done.scores.min(dim=1, keepdim=True).values, NEVER)  # (B, k)
    return (best > worst).any(dim=-1, keepdim=True)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, M, ...) at index (B, k) along dim 1 -> (B, k, ...)."""
    return torch.take_along_dim(x, index.view(*index.shape, *([1] * (x.dim() - 2))), dim=1)
