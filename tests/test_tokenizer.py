import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from tformer.cli import main as cli_main
from tformer.data.corpus import shakespeare_text
from tformer.tokenizer import Tokenizer, split_into_chunks

ROUND_TRIP = [
    "",
    "To be, or not to be: that is the question.",
    "HAMLET:\nA little more than kin.\n\n\nKING CLAUDIUS:\n  indented\tand tabbed  \r\n",
    "unicode: naïve café, 日本語の文章, 中文, 한국어, Ελληνικά, עברית, emoji 🙂👍🏽🇫🇷 family 👨‍👩‍👧",
    "combining e\u0301 vs \u00e9, zero-width\u200bjoiner\u200d, BOM \ufeff, replacement \ufffd",
    "control bytes \x00\x01\x02\x7f\x1b[31m red \x1b[0m and nbsp\u00a0\u2028\u2029",
    "".join(map(chr, range(0, 0x250))),
    "     leading spaces and trailing      ",
]


@pytest.fixture(scope="module")
def sample_text() -> str:
    return shakespeare_text()[:150_000]


@pytest.fixture(scope="module")
def bpe(sample_text) -> Tokenizer:
    return Tokenizer.train_bpe(sample_text, vocab_size=600)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_bpe_round_trips_any_text_exactly(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert all(0 <= i < bpe.vocab_size for i in ids)


def test_bpe_trains_requested_size_and_compresses(bpe, sample_text):
    assert bpe.vocab_size == 600
    assert [bpe.token_to_id(t) for t in ("<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>")] == [0, 1, 2, 3]
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 1, 2)
    assert len(sample_text) / len(bpe.encode(sample_text)) > 2.0  # merges were learnt


def test_bpe_too_small_vocab_says_minimum():
    with pytest.raises(ValueError, match="at least 260"):
        Tokenizer.train_bpe("abc", vocab_size=100)


@pytest.mark.parametrize("train", [lambda t: Tokenizer.train_bpe(t, vocab_size=300), Tokenizer.train_char])
def test_training_on_no_text_is_refused(train, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    for texts in ("", ["", ""], tmp_path / "empty.txt"):
        with pytest.raises(ValueError, match="no text to train a tokenizer on"):
            train(texts)


def test_special_tokens_are_single_ids(bpe):
    text = "<|bos|>HAMLET: hi<|eos|><|pad|>"
    ids = bpe.encode(text)
    assert ids[0] == bpe.bos_id and ids[-2:] == [bpe.eos_id, bpe.pad_id]
    assert bpe.decode(ids) == text
    assert bpe.decode(ids, skip_special_tokens=True) == "HAMLET: hi"
    wrapped = bpe.encode("hi", add_bos=True, add_eos=True)
    assert wrapped == [bpe.bos_id, *bpe.encode("hi"), bpe.eos_id]


def test_encode_batch_matches_encode(bpe):
    assert bpe.encode_batch(ROUND_TRIP) == [bpe.encode(t) for t in ROUND_TRIP]


def test_chunked_encoding_equals_whole_encoding(bpe, sample_text):
    text = sample_text[:20_000] + "a  \nb\n\n\nc \n d\n\te\nf"
    chunks = split_into_chunks(text)
    assert "".join(chunks) == text and len(chunks) > 100
    assert [i for ids in bpe.encode_batch(chunks) for i in ids] == bpe.encode(text)


def test_add_special_tokens(bpe, tmp_path):
    tok = Tokenizer.load(bpe.save(tmp_path))  # a copy: `bpe` is shared
    assert tok.add_special_tokens(["<|im_start|>", "<|eos|>"]) == 1
    assert tok.vocab_size == 601
    i = tok.token_to_id("<|im_start|>")
    assert tok.encode("<|im_start|>user") == [i, *tok.encode("user")]


def test_char_tokenizer_round_trips_exactly(sample_text):
    tok = Tokenizer.train_char(sample_text)
    chars = sorted(set(sample_text))
    assert tok.vocab_size == 4 + len(chars)
    assert [tok.id_to_token(i) for i in range(4, 8)] == chars[:4]  # sorted by code point
    text = sample_text[:5000] + "\n\n  two  spaces\n"
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode("ab<|eos|>")) == "ab<|eos|>"
    assert tok.encode("a€b") == [tok.token_to_id("a"), tok.token_to_id("<|unk|>"), tok.token_to_id("b")]


@pytest.mark.parametrize("as_file", [False, True])
def test_save_load_round_trip(bpe, tmp_path, as_file):
    target = tmp_path / ("my.json" if as_file else "tok")
    file = bpe.save(target)
    assert file == (target if as_file else target / "tokenizer.json")
    assert [p.name for p in file.parent.iterdir() if p.name.startswith(".")] == []  # no temp files left
    loaded = Tokenizer.load(target)
    assert loaded.to_str() == bpe.to_str()
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (bpe.bos_id, bpe.eos_id, bpe.pad_id)
    text = ROUND_TRIP[3]
    assert loaded.encode(text) == bpe.encode(text)


def test_saved_folder_loads_in_transformers(bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    bpe.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = ROUND_TRIP[2]
    assert hf(text)["input_ids"] == bpe.encode(text)  # no BOS from either: the tokenizer has no template
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (bpe.bos_id, bpe.eos_id, bpe.pad_id)
    # transformers 4.x reads the special tokens from special_tokens_map.json
    names = {k: bpe.id_to_token(getattr(bpe, f"{k}_id")) for k in ("bos", "eos", "pad")}
    assert json.loads((tmp_path / "special_tokens_map.json").read_text()) == {f"{k}_token": v for k, v in names.items()}


def _foreign_tokenizer(tmp_path, specials, config=None):
    vocab = {t: i for i, t in enumerate([*specials, "a", "b"])}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    hf.add_special_tokens(specials)
    tmp_path.mkdir(exist_ok=True)
    hf.save(str(tmp_path / "tokenizer.json"))
    if config:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.load(tmp_path)


def test_special_ids_found_by_common_names(tmp_path):
    llama2 = _foreign_tokenizer(tmp_path / "l2", ["<unk>", "<s>", "</s>"])
    assert (llama2.bos_id, llama2.eos_id, llama2.pad_id) == (1, 2, None)
    gpt2 = _foreign_tokenizer(tmp_path / "g", ["<|endoftext|>"])
    assert (gpt2.bos_id, gpt2.eos_id, gpt2.pad_id) == (0, 0, None)
    llama3 = _foreign_tokenizer(tmp_path / "l3", ["<|begin_of_text|>", "<|end_of_text|>", "<pad>"])
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id) == (0, 1, 2)
    bare = _foreign_tokenizer(tmp_path / "n", ["<u>"])
    assert (bare.bos_id, bare.eos_id, bare.pad_id) == (None, None, None)
    with pytest.raises(ValueError, match="no bos token: add one with add_special_tokens"):
        bare.encode("a", add_bos=True)


def test_tokenizer_config_overrides_names(tmp_path):
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    config = {"bos_token": None, "eos_token": {"content": "<|im_end|>"}, "pad_token": "<|endoftext|>"}
    qwen = _foreign_tokenizer(tmp_path, specials, config)
    assert (qwen.bos_id, qwen.eos_id, qwen.pad_id) == (0, 2, 0)  # null bos: fall back to common names


def test_load_missing_names_path_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer at .*nowhere.*tformer tokenizer train"):
        Tokenizer.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"empty.tokenizer\.json"):
        (tmp_path / "empty").mkdir()
        Tokenizer.load(tmp_path / "empty")


def test_load_corrupt_names_path_and_fix(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(ValueError, match=r"tokenizer\.json is not a valid HF tokenizer\.json .*re-train"):
        Tokenizer.load(tmp_path)


def test_cli_trains_bpe_and_char(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_text()[:50_000])
    assert cli_main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300",
                     "--out", str(tmp_path / "bpe")]) == 0
    assert Tokenizer.load(tmp_path / "bpe").vocab_size == 300
    assert cli_main(["tokenizer", "train", "--input", str(corpus), "--char",
                     "--out", str(tmp_path / "c")]) == 0
    assert "character" in capsys.readouterr().out
    assert cli_main(["tokenizer", "train", "--char", "--vocab-size", "9", "--out", str(tmp_path / "x")]) == 2
    assert "--vocab-size does not apply" in capsys.readouterr().err
