"""data/mlm.py: BERT's masking proportions (15% selected; 80% [MASK], 10% random, 10% unchanged) and
next-sentence pairs (50% true successor) within binomial bounds, special tokens and padding never
masked, [CLS] A [SEP] B [SEP] layout and token types, and the same batches for the same seed."""

import math
import random

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers, processors

from tformer.data.mlm import (
    MLMCollator,
    MLMExamples,
    SpecialTokens,
    encode_pair,
    mask_tokens,
    mlm_rows,
    nsp_pairs,
    segments,
    truncate_pair,
)
from tformer.data.sft import IGNORE
from tformer.tokenizer import Tokenizer

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SP = SpecialTokens(cls=2, sep=3, mask=4, pad=0, special=frozenset(range(5)), vocab_size=1000)


def bert_tokenizer(words) -> Tokenizer:
    """A WordPiece tokenizer with BERT's specials and template over `words` (lowercased)."""
    vocab = {t: i for i, t in enumerate(SPECIALS + sorted({w.lower() for w in words} | set(".,!?")))}
    hf = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    hf.normalizer = normalizers.BertNormalizer(lowercase=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    hf.add_special_tokens(SPECIALS)
    return Tokenizer(hf)


def within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    """count is within `sigmas` binomial standard deviations of n * p."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def random_rows(n_rows: int, seed: int = 0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        a = [rng.randrange(5, 1000) for _ in range(rng.randrange(5, 60))]
        b = [rng.randrange(5, 1000) for _ in range(rng.randrange(5, 60))]
        rows.append(encode_pair(a, b, SP))
    return rows


def test_masking_proportions_are_berts():
    rows = random_rows(600)
    batch = MLMCollator(SP)(rows, torch.Generator().manual_seed(0))
    original = MLMCollator(SP, mlm_prob=1e-9)(rows, torch.Generator().manual_seed(0))["tokens"]  # nothing masked
    real = batch["attention_mask"].bool()
    maskable = real & (original > 4)
    selected = batch["labels"] != IGNORE
    n, k = int(maskable.sum()), int(selected.sum())
    assert n > 30_000 and within(k, n, 0.15)
    assert torch.equal(batch["labels"][selected], original[selected])
    picked = batch["tokens"][selected]
    n_mask = int((picked == SP.mask).sum())
    n_same = int((picked == original[selected]).sum())
    n_random = k - n_mask - n_same
    assert within(n_mask, k, 0.8) and within(n_random, k, 0.1 * (1 - 1 / 995)) and within(n_same, k, 0.1 + 0.1 / 995)
    assert int((picked < 5).sum()) == n_mask  # random replacements are ordinary ids, never a special
    assert batch["n_targets"] == k
    assert torch.equal(batch["tokens"][~selected], original[~selected])  # unselected tokens untouched


def test_special_tokens_and_padding_are_never_masked():
    rows = random_rows(200, seed=1)
    batch = MLMCollator(SP, mlm_prob=0.9)(rows, torch.Generator().manual_seed(1))
    tokens, labels, mask = batch["tokens"], batch["labels"], batch["attention_mask"]
    for i, (ids, types) in enumerate(rows):
        T = len(ids)
        assert mask[i, :T].all() and not mask[i, T:].any()
        assert (tokens[i, T:] == SP.pad).all() and (labels[i, T:] == IGNORE).all()
        assert (batch["token_types"][i, T:] == 0).all()
        for j, t in enumerate(ids):
            if t in SP.special:
                assert tokens[i, j] == t and labels[i, j] == IGNORE
    ordinary = mask.bool() & (labels != IGNORE) | mask.bool() & (tokens > 4)
    assert (labels != IGNORE).sum() > 0.8 * ordinary.sum()  # with mlm_prob 0.9 most real tokens are selected


def test_pair_layout_and_token_types():
    ids, types = encode_pair([10, 11, 12], [20, 21], SP)
    assert ids == [SP.cls, 10, 11, 12, SP.sep, 20, 21, SP.sep]
    assert types == [0, 0, 0, 0, 0, 1, 1, 1]
    assert encode_pair([10], None, SP) == ([SP.cls, 10, SP.sep], [0, 0, 0])
    a, b = truncate_pair(list(range(50)), list(range(10)), 30)
    assert len(a) + len(b) == 30 and len(b) == 10 and a == list(range(20))
    assert all(len(s) <= 8 for s in segments([[list(range(5)), list(range(5)), list(range(20))]], 10))


def test_nsp_is_half_true_successors():
    docs = [[[d * 1000 + s * 10 + k for k in range(3)] for s in range(20)] for d in range(100)]
    pairs = nsp_pairs(docs, random.Random(0), 64)
    assert len(pairs) == 100 * 19
    successor = {tuple(doc[i]): tuple(doc[i + 1]) for doc in docs for i in range(len(doc) - 1)}
    doc_of = {tuple(s): d for d, doc in enumerate(docs) for s in doc}
    n_next = 0
    for a, b, label in pairs:
        if label == 0:
            assert successor[tuple(a)] == tuple(b)
            n_next += 1
        else:
            assert doc_of[tuple(b)] != doc_of[tuple(a)]  # a random sentence of another document
    assert within(n_next, len(pairs), 0.5)
    assert pairs == nsp_pairs(docs, random.Random(0), 64) and pairs != nsp_pairs(docs, random.Random(1), 64)
    with pytest.raises(ValueError, match="two sentences"):
        nsp_pairs([[[1, 2]]], random.Random(0), 64)


def test_batches_are_deterministic_under_a_seed():
    rows = random_rows(40, seed=2)
    data = MLMExamples(rows, MLMCollator(SP), seed=5, nsp_labels=[i % 2 for i in range(40)])
    b1, b2 = data.batch(3, 8), data.batch(3, 8)
    assert all(torch.equal(b1[k], b2[k]) for k in ("tokens", "labels", "token_types", "nsp_labels"))
    assert not torch.equal(data.batch(4, 8)["labels"], b1["labels"])
    other = MLMExamples(rows, MLMCollator(SP), seed=6).batch(3, 8)
    assert not torch.equal(other["tokens"], b1["tokens"])
    v1 = [b["labels"] for b in data.eval_batches(16)]
    assert all(torch.equal(x, y) for x, y in zip(v1, [b["labels"] for b in data.eval_batches(16)]))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    x = torch.randint(5, 1000, (4, 30))
    assert all(torch.equal(u, v) for u, v in zip(mask_tokens(x, x > 0, SP, g1), mask_tokens(x, x > 0, SP, g2)))


def test_rows_from_text_with_a_bert_tokenizer():
    docs = ["the cat sat .\nthe dog ran .\na bird sang .", "one two three .\nfour five six ."]
    tok = bert_tokenizer(" ".join(docs).split())
    sp = SpecialTokens.from_tokenizer(tok)
    assert (sp.cls, sp.sep, sp.mask, sp.pad) == (2, 3, 4, 0) and sp.special == frozenset(range(5))
    rows, labels = mlm_rows(docs, tok, 16, nsp=True, seed=0)
    assert len(rows) == len(labels) == 3
    first, _ = rows[0]
    assert first[:6] == tok.encode_batch(["the cat sat ."], template=True)[0]
    rows, labels = mlm_rows(docs, tok, 16, nsp=False)
    assert labels is None and all(ids[0] == 2 and ids[-1] == 3 and len(ids) <= 16 for ids, _ in rows)
    with pytest.raises(ValueError, match=r"no \[CLS\] token"):
        SpecialTokens.from_tokenizer(Tokenizer.train_char(["abc"]))
