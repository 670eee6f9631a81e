import json
import math
import re

import numpy as np
import pytest
import torch

from tformer.data import (
    Batcher, build_shards, eval_batches, load_corpus, read_texts, shakespeare_text, token_dtype,
)
from tformer.data import shards as shards_mod
from tformer.data.corpus import play_to_text
from tformer.data.shards import Split, cache_key, split_documents
from tformer.tokenizer import Tokenizer

# --- corpus ---------------------------------------------------------------------------------

PLAY = """# A Play

## ACT I

### SCENE I. A heath.

_Thunder. Enter three Witches_

**First Witch**  
When shall we three meet again  
In thunder, lightning, or in rain?

**HAMLET**  
_\\[Aside]_  
A little more than kin, and less than kind. __\\[ ]_  
Thus\\--no more.

_Exit Witch_

Speech resumed after a direction.

**EXETER**  
End of a speech.  
BISHOP

**OF WINCHESTER**  
A name split over two lines in the source.
"""


def test_play_to_text_keeps_speeches_drops_markup():
    assert play_to_text(PLAY) == (
        "First Witch:\nWhen shall we three meet again\nIn thunder, lightning, or in rain?\n\n"
        "HAMLET:\nA little more than kin, and less than kind.\nThus--no more.\n"
        "Speech resumed after a direction.\n\n"
        "EXETER:\nEnd of a speech.\n\n"
        "BISHOP OF WINCHESTER:\nA name split over two lines in the source.\n\n"
    )


def test_shakespeare_text_is_clean_speeches():
    text = shakespeare_text()
    assert 4_500_000 < len(text) < 5_200_000
    assert text == shakespeare_text()  # deterministic (and cached)
    assert "HAMLET:\nTo be, or not to be: that is the question:\n" in text
    assert text.startswith("THESEUS:\nNow, fair Hippolyta")  # comedies/a-midsummer-night-s-dream first
    assert not re.search(r"[*_#\\\[\]]", text)  # no Markdown left
    blocks = text.split("\n\n")
    assert blocks[-1] == "" and len(blocks) > 30_000
    assert all(re.fullmatch(r"[^\n]+:\n[^\n]+(\n[^\n]+)*", b) for b in blocks[:-1])


def test_read_texts_files_folders_jsonl(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / "b" / "2.md").write_text("md doc")
    (tmp_path / "b" / "deep" / "1.txt").write_text("deep doc")
    (tmp_path / "b" / "0.jsonl").write_text('{"text": "j1"}\n\n{"text": "j2 ✓", "id": 7}\n')
    (tmp_path / "b" / "skip.bin").write_bytes(b"\xff")
    (tmp_path / "a.text").write_text("named file, any suffix")
    docs = read_texts([tmp_path / "a.text", tmp_path / "b"])
    assert docs == ["named file, any suffix", "j1", "j2 ✓", "md doc", "deep doc"]
    assert load_corpus([tmp_path / "b" / "2.md"]) == ["md doc"]


@pytest.mark.parametrize("line, why", [
    ('{"text": "ok"', "not valid JSON"),
    ('{"body": "no text field"}', 'string "text" field'),
    ('["a list"]', 'string "text" field'),
    ('{"text": 3}', 'string "text" field'),
])
def test_read_jsonl_bad_line_names_file_and_line(tmp_path, line, why):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(why)):
        read_texts([path])


def test_read_texts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        read_texts([tmp_path / "missing.txt"])
    with pytest.raises(FileNotFoundError, match="no .txt, .md"):
        read_texts([tmp_path])
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        read_texts([tmp_path / "latin1.txt"])
    (tmp_path / "blank.txt").write_text(" \n\n")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n\n')
    with pytest.raises(ValueError, match="no text in .*blank.txt, .*blank.jsonl: the input is empty or only white"):
        read_texts([tmp_path / "blank.txt", tmp_path / "blank.jsonl"])


# --- shards ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text() -> str:
    return shakespeare_text()[:120_000]


@pytest.fixture(scope="module")
def char_tok(text) -> Tokenizer:
    return Tokenizer.train_char(text)


@pytest.fixture(scope="module")
def bpe_tok(text) -> Tokenizer:
    return Tokenizer.train_bpe(text, vocab_size=400)


def test_single_text_split_by_characters_at_a_line_start(tmp_path, text, char_tok):
    shards = build_shards([text], char_tok, val_fraction=0.1, cache_dir=tmp_path)
    n_train = shards.train.n_chars
    assert 0.9 * len(text) <= n_train < 0.9 * len(text) + 200  # the first line start after 90%
    assert text[n_train - 1] == "\n"
    assert shards.train.n_chars + shards.val.n_chars == len(text)
    # Char tokenizer: one token per character, and eos ends the (only) document, in val.
    assert np.array_equal(shards.train.tokens, char_tok.encode(text[:n_train]))
    assert np.array_equal(shards.val.tokens, char_tok.encode(text[n_train:]) + [char_tok.eos_id])
    assert shards.train.chars_per_token == 1.0


def test_bpe_shards_equal_whole_text_encoding(tmp_path, text, bpe_tok):
    text = text + "\nCAFÉ:\n日本語 🙂\n"  # non-ASCII in val: bytes != characters
    shards = build_shards(text, bpe_tok, val_fraction=0.25, cache_dir=tmp_path)
    both = np.concatenate([shards.train.tokens, shards.val.tokens])
    assert both.dtype == np.uint16
    assert np.array_equal(both, bpe_tok.encode(text) + [bpe_tok.eos_id])
    val_text = text[shards.train.n_chars:]
    assert bpe_tok.decode(shards.val.tokens.tolist()) == val_text + "<|eos|>"
    assert shards.chars_per_token("train") == shards.train.n_chars / shards.train.n_tokens > 1.5
    assert (shards.val.n_chars, shards.val.n_bytes) == (len(val_text), len(val_text.encode()))


def test_documents_joined_by_eos_and_cut_document_has_none(tmp_path, char_tok):
    docs = ["ab\ncd\nef\ngh\n", "ij\n", "kl\nmn\nop\nqr\n"]  # 27 chars: 75% is char 20, "op" at 21
    train, val = split_documents(docs, val_fraction=0.25)
    assert train == [(["ab\n", "cd\n", "ef\n", "gh\n"], True), (["ij\n"], True), (["kl\n", "mn\n"], False)]
    assert val == [(["op\n", "qr\n"], True)]
    shards = build_shards(docs, char_tok, val_fraction=0.25, cache_dir=tmp_path)
    eos = char_tok.eos_id
    assert shards.train.tokens.tolist() == char_tok.encode(docs[0]) + [eos] + char_tok.encode("ij\n") + [
        eos] + char_tok.encode("kl\nmn\n")
    assert shards.val.tokens.tolist() == char_tok.encode("op\nqr\n") + [eos]


def test_split_edge_cases():
    train, val = split_documents(["one long line with no breaks"], val_fraction=0.25)
    assert train == [(["one long line with no"], False)] and val == [([" breaks"], True)]
    train, val = split_documents(["a\nb\n", "", "c\n"], val_fraction=0.0)
    assert val == [] and len(train) == 2
    with pytest.raises(ValueError, match=r"val_fraction=1.0 must be in \[0, 1\)"):
        split_documents(["x"], 1.0)


def test_shards_are_deterministic_and_cached(tmp_path, text, bpe_tok, monkeypatch):
    a = build_shards([text], bpe_tok, cache_dir=tmp_path / "a")
    b = build_shards([text], bpe_tok, cache_dir=tmp_path / "b")
    assert a.path.name == b.path.name == cache_key([text], bpe_tok, 0.1)
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes()

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised although the cache was valid")

    monkeypatch.setattr(Tokenizer, "encode_batch", no_tokenising)
    monkeypatch.setattr(Tokenizer, "encode", no_tokenising)
    again = build_shards([text], bpe_tok, cache_dir=tmp_path / "a")
    assert np.array_equal(again.train.tokens, a.train.tokens) and again.val.n_chars == a.val.n_chars
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [a.path.name]  # no temp folders


def test_encode_batch_size_does_not_change_tokens(tmp_path, text, bpe_tok, monkeypatch):
    docs = [text[:30_000], "short doc\n", text[30_000:60_000]]
    big = build_shards(docs, bpe_tok, cache_dir=tmp_path / "big")
    monkeypatch.setattr(shards_mod, "_ENCODE_BATCH", 7)
    small = build_shards(docs, bpe_tok, cache_dir=tmp_path / "small")
    for split in ("train", "val"):
        assert np.array_equal(big[split].tokens, small[split].tokens)
    assert np.count_nonzero(big.train.tokens == bpe_tok.eos_id) == 2  # third document is cut by the split


def test_cache_key_changes_with_each_input(text, bpe_tok, char_tok):
    base = cache_key([text], bpe_tok, 0.1)
    assert cache_key([text + "!"], bpe_tok, 0.1) != base
    assert cache_key([text[:10], text[10:]], bpe_tok, 0.1) != base
    assert cache_key([text], char_tok, 0.1) != base
    assert cache_key([text], bpe_tok, 0.2) != base


def test_interrupted_build_leaves_no_cache(tmp_path, text, char_tok, monkeypatch):
    real = shards_mod._write_split

    def crash_on_val(pieces, tokenizer, path, dtype, exact):
        if path.name == "val.bin":
            raise KeyboardInterrupt
        return real(pieces, tokenizer, path, dtype, exact)

    monkeypatch.setattr(shards_mod, "_write_split", crash_on_val)
    with pytest.raises(KeyboardInterrupt):
        build_shards([text], char_tok, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(shards_mod, "_write_split", real)
    assert build_shards([text], char_tok, cache_dir=tmp_path).val.n_tokens > 0


def test_broken_cache_is_rebuilt(tmp_path, text, char_tok):
    shards = build_shards([text], char_tok, cache_dir=tmp_path)
    expected = np.array(shards.train.tokens)
    with open(shards.path / "train.bin", "r+b") as f:
        f.truncate(100)
    with pytest.warns(UserWarning, match="rebuilding broken shard cache.*train.bin has 100 bytes"):
        rebuilt = build_shards([text], char_tok, cache_dir=tmp_path)
    assert np.array_equal(rebuilt.train.tokens, expected)


def test_token_dtype_by_vocab_size(tmp_path):
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    big = "".join(chr(0x10000 + i) for i in range(70_000))  # 70k distinct characters (no surrogates)
    tok = Tokenizer.train_char(big)
    shards = build_shards(big[-100:] * 3, tok, val_fraction=0.5, cache_dir=tmp_path)
    assert shards.train.tokens.dtype == np.uint32
    assert int(shards.train.tokens.max()) == tok.vocab_size - 1 > 65_535


def test_meta_records_counts(tmp_path, text, char_tok):
    shards = build_shards([text], char_tok, cache_dir=tmp_path)
    meta = json.loads((shards.path / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == char_tok.vocab_size
    assert meta["splits"]["val"]["n_tokens"] == shards.val.n_tokens
    assert math.isclose(shards.val.bits_per_char(math.log(2)), 1 / shards.val.chars_per_token)


# --- batches --------------------------------------------------------------------------------

TOKENS = (np.arange(10_000) % 50_000).astype(np.uint16)  # token at i is i: windows are easy to check


def test_batches_are_shifted_windows():
    x, y = Batcher(TOKENS, batch_size=8, seq_len=16, seed=3).get(0)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    starts = x[:, :1]
    assert torch.equal(x, starts + torch.arange(16))  # contiguous windows of the token stream
    assert torch.equal(y, x + 1)  # next token at every position
    assert int(x.max()) + 1 <= len(TOKENS) - 1 and int(y.max()) <= len(TOKENS) - 1


def test_batches_reproducible_by_seed_rank_step():
    b = Batcher(TOKENS, 4, 8, seed=0)
    assert torch.equal(b.get(5)[0], Batcher(TOKENS, 4, 8, seed=0).get(5)[0])  # resumed run: same batch
    assert not torch.equal(b.get(5)[0], b.get(6)[0])
    assert not torch.equal(b.get(5)[0], Batcher(TOKENS, 4, 8, seed=0, rank=1).get(5)[0])
    assert not torch.equal(b.get(5)[0], Batcher(TOKENS, 4, 8, seed=1).get(5)[0])
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(b.sample(g1)[0], b.sample(g2)[0])


def test_every_start_offset_is_reachable():
    tokens = np.arange(11, dtype=np.uint16)
    b = Batcher(tokens, batch_size=64, seq_len=8)
    starts = {int(s) for step in range(20) for s in b.get(step)[0][:, 0]}
    assert starts == {0, 1, 2}  # last start 2: its target is tokens[10]


def test_eval_batches_cover_split_in_order():
    tokens = np.arange(103, dtype=np.uint16)
    batches = list(eval_batches(tokens, batch_size=4, seq_len=10))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]  # (103 - 1) // 10 = 10 windows
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    assert torch.equal(x.flatten(), torch.arange(100)) and torch.equal(y.flatten(), torch.arange(1, 101))
    assert len(list(eval_batches(tokens, 4, 10, max_batches=2))) == 2


def test_too_short_split_names_the_split_and_seq_len():
    def split(name, n):
        return Split(name, np.arange(n, dtype=np.uint16), n_chars=n, n_bytes=n)

    with pytest.raises(ValueError, match=r"the train split has 5 tokens, fewer than seq_len \+ 1 = 9 .*: "
                                         r"lower --seq_len or add text$"):
        Batcher(split("train", 5), 2, 8)
    with pytest.raises(ValueError, match=r"the val split has 0 tokens, .*: lower --seq_len, add text or "
                                         r"raise --val_fraction$"):
        next(eval_batches(split("val", 0), 2, 8))
    with pytest.raises(ValueError, match="the token array has 5 tokens"):
        Batcher(np.arange(5, dtype=np.uint16), 2, 8)
    batcher = Batcher(split("train", 9), 2, 8)  # one window: 8 tokens and the target of the last
    assert batcher.get(0)[0].tolist() == [list(range(8))] * 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_are_on_device():
    x, y = Batcher(TOKENS, 2, 4, device="cuda").get(0)
    assert x.is_cuda and y.is_cuda
    cpu_x, cpu_y = Batcher(TOKENS, 2, 4).get(0)
    assert torch.equal(x.cpu(), cpu_x) and torch.equal(y.cpu(), cpu_y)
