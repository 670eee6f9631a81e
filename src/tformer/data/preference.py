"""Preference data for DPO: {"prompt", "chosen", "rejected"} JSONL -> pairs of examples -> batches.

`prompt` is a string (then each response follows it as a completion does, eos appended) or a list
of chat messages (then each response is the next assistant turn, rendered by the chat template);
`chosen` and `rejected` are strings, or TRL's one-message lists [{"role": "assistant", "content": ...}].
Only the responses' tokens carry log-probabilities (data/sft.py's `trained`).

A batch of B pairs is one (2B, T) batch: rows 0..B-1 the chosen responses, rows B..2B-1 the
rejected ones, right-padded (no packing); `pairs` holds the pairs' indices in the split, which
index precomputed reference log-probabilities (`PairSplit.reference`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from tformer.data.sft import Example, collate, encode_chat, encode_completion


def _response(value, where: str, key: str) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0].get("content") if value[0].get("role") == "assistant" else None
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string or [{{'role': 'assistant', 'content': str}}]")
    return value


def encode_pair(record: dict, where: str, template, tokenizer) -> tuple[Example, Example]:
    """(chosen, rejected) examples of one preference record."""
    from tformer.chat import ChatTemplateError

    prompt = record["prompt"]
    chosen, rejected = (_response(record[k], where, k) for k in ("chosen", "rejected"))
    try:
        if isinstance(prompt, list):
            return tuple(encode_chat(prompt + [{"role": "assistant", "content": r}], template, tokenizer)
                         for r in (chosen, rejected))
    except ChatTemplateError as e:
        raise ValueError(f"{where}: {e}") from None
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: 'prompt' must be a string or a list of chat messages")
    return encode_completion(prompt, chosen, tokenizer), encode_completion(prompt, rejected, tokenizer)


def fit_pairs(pairs: list[tuple[Example, Example]], seq_len: int) -> tuple[list, int, int]:
    """Pairs with both sides cut to seq_len + 1 tokens; a pair with a side left without response
    tokens is dropped. Returns (kept, number of pairs truncated, number dropped)."""
    kept, cut, dropped = [], 0, 0
    for pair in pairs:
        if any(len(ex.ids) > seq_len + 1 for ex in pair):
            cut += 1
            pair = tuple(Example(ex.ids[: seq_len + 1], ex.trained[: seq_len + 1]) for ex in pair)
        if all(ex.n_trained > 0 for ex in pair):
            kept.append(pair)
        else:
            dropped += 1
    return kept, cut, dropped


class PairSplit:
    """The pairs of one split and their batches (module docstring); the order of each epoch is a
    permutation drawn from (seed, epoch), as `ExampleSplit`'s."""

    def __init__(self, pairs: list[tuple[Example, Example]], seq_len: int, seed: int, pad_id: int = 0):
        if not pairs:
            raise ValueError("no preference pairs to batch")
        self.pairs, self.seq_len, self.seed, self.pad_id = pairs, seq_len, seed, pad_id
        self.reference: torch.Tensor | None = None  # (N, 2) reference log-probs of (chosen, rejected), if computed
        self._order = (-1, None)

    def _pair(self, j: int) -> int:
        epoch, k = divmod(j, len(self.pairs))
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs)))
        return int(self._order[1][k])

    def collate(self, indices: list[int]) -> dict:
        examples = [self.pairs[i][0] for i in indices] + [self.pairs[i][1] for i in indices]
        batch = collate(examples, [[i] for i in range(len(examples))], self.seq_len, False, self.pad_id)
        batch["pairs"] = torch.tensor(indices)
        batch["n_pairs"] = len(indices)
        if self.reference is not None:
            batch["reference"] = self.reference[indices]  # (B, 2)
        return batch

    def batch(self, index: int, batch_size: int) -> dict:
        return self.collate([self._pair(index * batch_size + k) for k in range(batch_size)])

    def eval_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[dict]:
        n = len(self.pairs) if max_batches is None else min(len(self.pairs), max_batches * batch_size)
        for first in range(0, n, batch_size):
            yield self.collate(list(range(first, min(first + batch_size, n))))
