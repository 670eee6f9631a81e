"""serve/text.py: the streamed pieces of a sequence add up to its decode, never show half a character
or any part of a stop string, and end before the first stop string."""

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from tformer.serve.text import TextStream, TokenBytes
from tformer.tokenizer import Tokenizer

CORPUS = "the cat sat on a mat and the dog ran to the park while birds sang in trees " * 20


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train_bpe([CORPUS], vocab_size=300)


@pytest.fixture(scope="module")
def metaspace():
    """A SentencePiece-style tokenizer: its decoder drops the leading space of the first token decoded."""
    hf = HFTokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    hf.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"], show_progress=False))
    return Tokenizer(hf)


def stream_pieces(tokenizer, ids, stop=None):
    """(pieces taken after each token and at the end, the TextStream)."""
    text = TextStream(tokenizer, stop)
    pieces = []
    for i in ids:
        text.add(i)
        pieces.append(text.take())
    text.finish()
    pieces.append(text.take(final=True))
    return pieces, text


@pytest.mark.parametrize("fixture", ["bpe", "metaspace"])
def test_pieces_add_up_to_the_decode(fixture, request):
    tok = request.getfixturevalue(fixture)
    sample = "the dog sat on the park mat while birds ran"
    ids = tok.encode(sample)
    pieces, text = stream_pieces(tok, ids)
    assert "".join(pieces) == text.text == tok.decode(ids)
    assert len([p for p in pieces if p]) > 3  # streamed as it grew, not all at the end


@pytest.mark.parametrize("sample", ["the cat héllo 日本語 wörld", "\U0001F600 the 😀 cat ☃"])
def test_a_character_split_over_byte_tokens_waits_for_its_last_byte(bpe, sample):
    ids = bpe.encode(sample)
    assert any("\ufffd" in bpe.decode([i]) for i in ids)  # the BPE never saw these characters: byte tokens
    pieces, text = stream_pieces(bpe, ids)
    assert "".join(pieces) == sample
    assert not any("\ufffd" in p for p in pieces)


def test_an_invalid_byte_sequence_is_shown_once_the_sequence_ends(bpe):
    first_byte_of_e_acute = bpe.encode("é")[0]
    pieces, text = stream_pieces(bpe, bpe.encode("the cat") + [first_byte_of_e_acute])
    assert "".join(pieces) == "the cat\ufffd"


@pytest.mark.parametrize("stop", [["sat on"], [" on a", "dog"], ["é"], ["t sat"]])
def test_stop_strings_cut_the_text_and_are_never_shown(bpe, stop):
    sample = "the cat sat on a mat, héllo, and the dog"
    ids = bpe.encode(sample)
    pieces, text = stream_pieces(bpe, ids, stop)
    cut = min(sample.find(s) for s in stop if s in sample)
    assert text.stopped and text.text == sample[:cut]
    shown = ""
    for piece in pieces:  # at no point was more shown than the final text
        shown += piece
        assert sample[:cut].startswith(shown)
    assert shown == sample[:cut]


def test_text_that_only_starts_a_stop_string_is_shown_at_the_end(bpe):
    pieces, text = stream_pieces(bpe, bpe.encode("the cat sat"), ["sat on"])
    assert not text.stopped
    assert "".join(pieces[:-1]) == "the cat " and pieces[-1] == "sat"


def test_offsets_are_where_each_token_starts(bpe):
    ids = bpe.encode("the cat sat on a mat")
    _, text = stream_pieces(bpe, ids)
    assert text.offsets == [len(bpe.decode(ids[:i])) for i in range(len(ids))]


@pytest.mark.parametrize("fixture", ["bpe", "metaspace"])
def test_token_bytes_join_into_the_texts_bytes(fixture, request):
    tok = request.getfixturevalue(fixture)
    sample = "the cat héllo 日本語 sat" if fixture == "bpe" else "the cat sat on the mat"
    ids = tok.encode(sample)
    joined = b"".join(TokenBytes(tok)(i) for i in ids)
    assert joined.decode() == (" " if fixture == "metaspace" else "") + tok.decode(ids)  # the decode drops it


def test_token_bytes_of_byte_fallback_pieces():
    vocab = {"<unk>": 0, "<0x0A>": 1, "<0xE6>": 2, "\u2581cat": 3}
    hf = HFTokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    token_bytes = TokenBytes(Tokenizer(hf))
    assert [token_bytes(i) for i in (1, 2, 3)] == [b"\n", b"\xe6", b" cat"]


def test_invalid_bytes_are_shown_without_waiting_for_the_end(bpe):
    lead_byte = bpe.encode("é")[0]  # a lead byte that no continuation byte follows: never a character
    pieces, text = stream_pieces(bpe, [lead_byte] * 12 + bpe.encode(" the cat"))
    assert "".join(pieces) == text.text == bpe.decode([lead_byte] * 12 + bpe.encode(" the cat"))
    assert "".join(pieces[:12]) == "\ufffd" * 11  # each sent once the next byte shows it invalid


def test_invalid_bytes_then_a_split_character_stream_as_the_whole_decode(bpe):
    lead_byte = bpe.encode("é")[0]
    ids = [lead_byte] * 5 + bpe.encode("日本 the") + [lead_byte] + bpe.encode("é")
    pieces, text = stream_pieces(bpe, ids)
    assert "".join(pieces) == bpe.decode(ids) == "\ufffd" * 5 + "日本 the\ufffdé"
