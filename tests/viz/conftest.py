"""A tiny decoder checkpoint with a real BPE tokenizer, shared by the attention, lens and explorer tests."""

import pytest

import tformer
from tformer.models import build_model
from tformer.tokenizer import Tokenizer
from tests.conftest import tiny_config

WORDS = "the cat sat on a mat and the dog ran to the park while birds sang in trees".split()


@pytest.fixture(scope="session")
def viz_tokenizer():
    return Tokenizer.train_bpe([" ".join(WORDS * 30)], vocab_size=320, special_tokens=("<|bos|>", "<|eos|>"))


@pytest.fixture(scope="session")
def viz_ckpt(tmp_path_factory, viz_tokenizer):
    """A 2-layer GQA checkpoint (6 query heads, 2 key/value heads) that takes 1,100 tokens."""
    path = tmp_path_factory.mktemp("viz") / "ckpt"
    tformer.save(build_model(tiny_config(vocab_size=320, max_seq_len=1100)), path, tokenizer=viz_tokenizer)
    return path
