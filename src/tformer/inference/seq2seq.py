"""Decoding for encoder-decoder models (tformer.models.EncoderDecoder): the Stepper that
`tformer.inference.beam.beam_search` drives, and greedy or sampled decoding on it.

    result = beam_search(EncoderDecoderStepper(model, start_id=0), sources, max_new_tokens=40, beams=4)
    outputs = seq2seq_generate(model, sources, max_new_tokens=40, start_id=0, eos_ids=[1])  # greedy

prefill encodes the sources once (right-padded under a key mask, so absolute positions start at 0
in every row), repeats each source's memory for its beams, fills every decoder layer's
cross-attention cache from it once, and feeds the decoder's start token. Beam steps reorder only
the self-attention caches: a row always takes the state of a row of the same source, whose
cross-attention cache and source mask are the same.
"""

from __future__ import annotations

import torch
from torch import nn

from tformer.inference.beam import reorder_caches


def right_pad(sources: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S) tokens and (B, S) mask (1 = real token), rows left-aligned."""
    if not sources or any(len(s) == 0 for s in sources):
        raise ValueError("every source needs at least one token")
    S = max(len(s) for s in sources)
    tokens = torch.full((len(sources), S), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sources), S, dtype=torch.long)
    for i, s in enumerate(sources):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return tokens, mask


class EncoderDecoderStepper:
    """An EncoderDecoder's Stepper (tformer.inference.beam): prompts are source token ids; the
    hypotheses are target tokens after `start_id` (T5: pad 0; Marian: pad = decoder_start_token_id)."""

    def __init__(self, model: nn.Module, start_id: int):
        if not hasattr(model, "decode_step"):
            raise TypeError(f"{type(model).__name__} is not an encoder-decoder: use beam_search(model, ...) "
                            "for a decoder-only model")
        if not 0 <= start_id < model.config.vocab_size:
            raise ValueError(f"start_id {start_id} is outside the vocabulary (0..{model.config.vocab_size - 1})")
        self.model, self.start_id, self.slot = model.eval(), start_id, 0

    def prefill(self, prompts: list[list[int]], beams: int, max_new_tokens: int) -> torch.Tensor:
        model, V = self.model, self.model.config.vocab_size
        bad = [t for p in prompts for t in p if not 0 <= t < V]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the model's vocabulary (0..{V - 1})")
        absolute = model.config.positions in ("learned", "sinusoidal")
        if absolute and max(max_new_tokens, *map(len, prompts)) > model.config.max_seq_len:
            raise ValueError(f"sources and max_new_tokens ({max_new_tokens}) must fit the model's max_seq_len "
                             f"{model.config.max_seq_len}: shorten the source or ask for fewer tokens")
        device = model.tok_emb.weight.device
        src, mask = (t.to(device) for t in right_pad(prompts))
        memory = model.encode(src, mask)  # (B, S, C)
        model.setup_caches(memory.repeat_interleave(beams, 0), max_new_tokens, mask.repeat_interleave(beams, 0))
        start = torch.full((len(prompts) * beams, 1), self.start_id, dtype=torch.long, device=device)
        logits = model.decode_step(start, torch.zeros(1, dtype=torch.long, device=device))[:, -1]  # (B beams, V)
        self.slot = 1
        return logits[::beams]  # (B, V): a source's beams are equal so far

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        input_pos = torch.tensor([self.slot], device=tokens.device)
        self.slot += 1
        return self.model.decode_step(tokens, input_pos)[:, -1]  # (N, V)

    def reorder(self, rows: torch.Tensor) -> None:
        reorder_caches([layer.attn.kv_cache for layer in self.model.dec_layers], rows)

    def close(self) -> None:
        self.model.clear_caches()


@torch.no_grad()
def seq2seq_generate(model: nn.Module, sources: list[list[int]], max_new_tokens: int, start_id: int,
                     eos_ids=None, sampling=None, generator: torch.Generator | None = None) -> list[list[int]]:
    """Greedy (default, or temperature 0) or sampled decoding of an EncoderDecoder from each source.

    The sources are encoded once (right-padded under a key mask), each decoder layer's cross-attention
    cache is filled from the memory once, and every step feeds one token per row through the
    self-attention KV cache. sampling: a `tformer.inference.sampling.SamplingConfig` (temperature,
    top-k, top-p, min-p); generator seeds the draws. Returns each source's new tokens, an end id
    kept; a row that meets an end id stops there, and all stop when every row has."""
    from tformer.inference.sampling import SamplingConfig, sample

    stepper = EncoderDecoderStepper(model, start_id)
    cfg = sampling or SamplingConfig(temperature=0.0)
    cfg.validate()
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    try:
        logits = stepper.prefill(sources, 1, max_new_tokens)  # (B, V)
        eos = torch.tensor(sorted(set(eos_ids or [])), dtype=torch.long, device=logits.device)
        done = torch.zeros(len(sources), dtype=torch.bool, device=logits.device)
        out = []
        for t in range(max_new_tokens):
            token = sample(logits, cfg, generator=generator)  # temperature 0: argmax
            out.append(token)  # (B,)
            done |= torch.isin(token, eos)
            if t + 1 == max_new_tokens or bool(done.all()):
                break
            logits = stepper.step(token[:, None])
    finally:
        stepper.close()
    rows = torch.stack(out, 1).tolist()  # (B, n)
    ends = set(eos.tolist())
    return [row[: next((i + 1 for i, x in enumerate(row) if x in ends), len(row))] for row in rows]


def start_id(tokenizer) -> int:
    """The decoder's start token: the pad token, as T5 and Marian (and tformer's own seq2seq runs) use."""
    if tokenizer.pad_id is None:
        raise ValueError("the tokenizer names no pad token, which an encoder-decoder's decoder starts from "
                         "(T5, Marian): add one, e.g. tokenizer.add_special_tokens(['<pad>'])")
    return tokenizer.pad_id


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Sources or targets as an encoder-decoder reads them: the tokenizer's template (T5's appends
    </s>), and the end token appended where the template does not."""
    rows = tokenizer.encode_batch(list(texts), template=True)
    eos = tokenizer.eos_id
    if eos is None:
        raise ValueError("the tokenizer names no end token, which ends an encoder-decoder's sources and outputs: "
                         "add one, e.g. tokenizer.add_special_tokens(['</s>'])")
    return [row if row and row[-1] == eos else [*row, eos] for row in rows]
