"""BERT pretraining data (Devlin et al. 2019, 3.1): masked-LM collation and next-sentence pairs.

    sentence pair   [CLS] A [SEP] B [SEP]      token_types 0 ... 0 (through the first [SEP]), 1 ... 1
    single segment  [CLS] A [SEP]              token_types all 0
    masking         each real, non-special token is selected with probability mlm_prob (0.15);
                    a selected token becomes [MASK] (80%), a random ordinary token (10%), or stays (10%);
                    labels (B,T) hold the original id at selected positions, IGNORE (-100) elsewhere
    next sentence   B is A's successor in its document (nsp_label 0) or, half the time, a sentence
                    drawn from another document (nsp_label 1), as HF's BertForPreTraining reads them

Selection is one Bernoulli draw per token (as HF's DataCollatorForLanguageModeling), so the share is
15% in expectation rather than exactly round(0.15 n) per sequence as in the original
create_pretraining_data.py; random replacements are drawn from the non-special vocabulary. Every draw
comes from a `torch.Generator` (masks) or `random.Random` (pairs) seeded by the caller, so the same seed
gives the same batches.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tformer.data.sft import IGNORE

CLS_NAMES = ("[CLS]", "<s>")
SEP_NAMES = ("[SEP]", "</s>")
MASK_NAMES = ("[MASK]", "<mask>")


def _find(tokenizer, names: Sequence[str], what: str) -> int:
    for name in names:
        if (i := tokenizer.token_to_id(name)) is not None:
            return i
    raise ValueError(f"the tokenizer has no {what} token (looked for {', '.join(names)}): masked-LM data needs "
                     "a BERT-style tokenizer")


@dataclass(frozen=True)
class SpecialTokens:
    """The ids masked-LM collation needs, and which ids are special (never masked, never a replacement)."""
    cls: int
    sep: int
    mask: int
    pad: int
    special: frozenset[int]
    vocab_size: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokens:
        """[CLS]/[SEP]/[MASK]/[PAD] (or <s>, </s>, <mask>, <pad>) of a `tformer.tokenizer.Tokenizer`."""
        ids = dict(cls=_find(tokenizer, CLS_NAMES, "[CLS]"), sep=_find(tokenizer, SEP_NAMES, "[SEP]"),
                   mask=_find(tokenizer, MASK_NAMES, "[MASK]"))
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        added = {i for i, t in tokenizer.hf.get_added_tokens_decoder().items() if t.special}
        special = frozenset(added | set(ids.values()) | {pad})
        return cls(**ids, pad=pad, special=special, vocab_size=tokenizer.vocab_size)

    def replacements(self) -> torch.Tensor:
        """(V',) the ordinary ids a selected token may be replaced by."""
        keep = torch.ones(self.vocab_size, dtype=torch.bool)
        keep[[i for i in self.special if i < self.vocab_size]] = False
        return keep.nonzero()[:, 0]


def encode_pair(a: list[int], b: list[int] | None, sp: SpecialTokens) -> tuple[list[int], list[int]]:
    """(ids, token_types) of [CLS] A [SEP] B [SEP], or [CLS] A [SEP] when b is None."""
    ids = [sp.cls, *a, sp.sep]
    types = [0] * len(ids)
    if b is not None:
        ids += [*b, sp.sep]
        types += [1] * (len(b) + 1)
    return ids, types


def truncate_pair(a: list[int], b: list[int] | None, max_tokens: int) -> tuple[list[int], list[int] | None]:
    """Cut the longer segment's tail until both fit in `max_tokens` (BERT's truncate_seq_pair)."""
    a, b = list(a), (list(b) if b is not None else None)
    while len(a) + len(b or []) > max_tokens:
        longer = a if b is None or len(a) >= len(b) else b
        longer.pop()
    return a, b


def nsp_pairs(docs: Sequence[Sequence[list[int]]], rng: random.Random, max_len: int):
    """(A, B, nsp_label) for each sentence that has a successor: B is that successor (label 0) or,
    with probability 1/2, a sentence of another document (label 1; of the same document, not the
    successor, when there is one document). Pairs are cut to `max_len` tokens with the three specials."""
    sizes = [len(d) for d in docs]
    if sum(sizes) < 2 or not any(n > 1 for n in sizes):
        raise ValueError("next-sentence pairs need a document of at least two sentences (non-blank lines)")
    pairs = []
    for d, doc in enumerate(docs):
        for i in range(len(doc) - 1):
            if rng.random() < 0.5:
                b, label = doc[i + 1], 0
            else:
                b, label = _random_sentence(docs, d, i + 1, rng), 1
            a, b = truncate_pair(doc[i], b, max_len - 3)
            pairs.append((a, b, label))
    return pairs


def _random_sentence(docs, d: int, successor: int, rng: random.Random) -> list[int]:
    others = [j for j in range(len(docs)) if j != d and docs[j]]
    if others:
        doc = docs[rng.choice(others)]
        return doc[rng.randrange(len(doc))]
    choices = [k for k in range(len(docs[d])) if k != successor]
    return docs[d][rng.choice(choices)]


def segments(docs: Sequence[Sequence[list[int]]], max_len: int) -> list[list[int]]:
    """Consecutive sentences of each document joined into segments of at most max_len - 2 tokens
    (RoBERTa's DOC-SENTENCES); a sentence longer than that is cut."""
    room, out = max_len - 2, []
    for doc in docs:
        current: list[int] = []
        for sentence in doc:
            if current and len(current) + len(sentence) > room:
                out.append(current)
                current = []
            current = (current + sentence)[:room]
        if current:
            out.append(current)
    return out


def mask_tokens(tokens: torch.Tensor, maskable: torch.Tensor, sp: SpecialTokens, generator: torch.Generator,
                mlm_prob: float = 0.15, mask_share: float = 0.8, random_share: float = 0.1,
                replacements: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B,T), maskable (B,T) bool -> (inputs (B,T), labels (B,T)) as the module docstring says."""
    selected = (torch.rand(tokens.shape, generator=generator) < mlm_prob) & maskable
    labels = torch.where(selected, tokens, IGNORE)
    u = torch.rand(tokens.shape, generator=generator)
    to_mask = selected & (u < mask_share)
    to_random = selected & (u >= mask_share) & (u < mask_share + random_share)
    pool = replacements if replacements is not None else sp.replacements()
    random_ids = pool[torch.randint(len(pool), tokens.shape, generator=generator)]
    inputs = torch.where(to_mask, sp.mask, torch.where(to_random, random_ids, tokens))
    return inputs, labels


class MLMCollator:
    """Rows of (ids, token_types) -> a padded, masked batch dict: tokens, attention_mask, token_types,
    labels, n_targets (the masked positions) and, with `nsp_labels`, nsp_labels (B,)."""

    def __init__(self, sp: SpecialTokens, mlm_prob: float = 0.15, mask_share: float = 0.8,
                 random_share: float = 0.1):
        if not 0 < mlm_prob < 1:
            raise ValueError(f"mlm_prob must be in (0, 1), got {mlm_prob}")
        if mask_share < 0 or random_share < 0 or mask_share + random_share > 1:
            raise ValueError(f"mask_share ({mask_share}) and random_share ({random_share}) must be >= 0 "
                             "and sum to at most 1")
        self.sp, self.mlm_prob, self.mask_share, self.random_share = sp, mlm_prob, mask_share, random_share
        self.replacements = sp.replacements()
        self.special = torch.tensor(sorted(sp.special))

    def __call__(self, rows: Sequence[tuple[list[int], list[int]]], generator: torch.Generator,
                 nsp_labels: Sequence[int] | None = None) -> dict:
        B, T = len(rows), max(len(ids) for ids, _ in rows)
        tokens = torch.full((B, T), self.sp.pad, dtype=torch.long)
        types = torch.zeros(B, T, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        for i, (ids, tt) in enumerate(rows):
            tokens[i, : len(ids)] = torch.tensor(ids)
            types[i, : len(tt)] = torch.tensor(tt)
            mask[i, : len(ids)] = 1
        maskable = mask.bool() & ~torch.isin(tokens, self.special)
        inputs, labels = mask_tokens(tokens, maskable, self.sp, generator, self.mlm_prob, self.mask_share,
                                     self.random_share, self.replacements)
        batch = {"tokens": inputs, "attention_mask": mask, "token_types": types, "labels": labels,
                 "n_targets": int((labels != IGNORE).sum())}
        if nsp_labels is not None:
            batch["nsp_labels"] = torch.tensor(list(nsp_labels), dtype=torch.long)
        return batch


class MLMExamples:
    """A split of masked-LM rows (with NSP labels or not): `batch(index, batch_size)` is the index-th
    batch of seeded epochs (each a fresh permutation), masked with a generator seeded by (seed, index);
    `eval_batches` go in order with masks seeded once, so every evaluation masks the same tokens."""

    def __init__(self, rows: list[tuple[list[int], list[int]]], collator: MLMCollator, seed: int = 0,
                 nsp_labels: list[int] | None = None):
        if not rows:
            raise ValueError("no masked-LM rows: the text is empty")
        self.rows, self.collator, self.seed, self.nsp_labels = rows, collator, seed, nsp_labels

    def __len__(self) -> int:
        return len(self.rows)

    def _collate(self, idx: Sequence[int], generator: torch.Generator) -> dict:
        nsp = [self.nsp_labels[i] for i in idx] if self.nsp_labels is not None else None
        return self.collator([self.rows[i] for i in idx], generator, nsp)

    def batch(self, index: int, batch_size: int) -> dict:
        per_epoch = -(-len(self.rows) // batch_size)  # the last batch of an epoch may be short
        epoch, k = divmod(index, per_epoch)
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        idx = order[k * batch_size: (k + 1) * batch_size].tolist()
        return self._collate(idx, torch.Generator().manual_seed(self.seed * 1000003 + index))

    def eval_batches(self, batch_size: int):
        generator = torch.Generator().manual_seed(self.seed)
        for start in range(0, len(self.rows), batch_size):
            yield self._collate(range(start, min(start + batch_size, len(self.rows))), generator)


def mlm_rows(docs: Sequence[str], tokenizer, max_len: int, nsp: bool, seed: int = 0):
    """Documents (text; one sentence a non-blank line) -> (rows, nsp_labels or None): sentence pairs with
    `nsp`, else segments of consecutive sentences."""
    sp = SpecialTokens.from_tokenizer(tokenizer)
    sentences = [[line.strip() for line in doc.splitlines() if line.strip()] for doc in docs]
    flat = tokenizer.encode_batch([s for doc in sentences for s in doc])
    encoded, k = [], 0
    for doc in sentences:
        encoded.append(flat[k: k + len(doc)])
        k += len(doc)
    if nsp:
        pairs = nsp_pairs(encoded, random.Random(seed), max_len)
        return [encode_pair(a, b, sp) for a, b, _ in pairs], [label for *_, label in pairs]
    return [encode_pair(s, None, sp) for s in segments(encoded, max_len)], None
