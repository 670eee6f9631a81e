"""serve/json_mode.py: under the filter's masks every sequence that reaches the end token is JSON of the
asked shape, whichever allowed tokens are drawn; the end token is allowed only after complete JSON."""

import json

import pytest
import torch

pytest.importorskip("xgrammar")

from tformer.serve.json_mode import JsonGrammars, JsonModeError  # noqa: E402
from tformer.tokenizer import Tokenizer  # noqa: E402

CORPUS = 'the cat sat on a mat {"a": 1, "b": [2, 3.5], "c": "dog"} true false null ' * 20
VOCAB = 320  # the model's vocabulary, padded past the tokenizer's


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe([CORPUS], vocab_size=300)


def walk(tok, token_filter, generator, max_steps=200):
    """Tokens drawn uniformly among the allowed ones (the end token, once allowed, with probability 0.3);
    returns (text, ended)."""
    out = []
    for _ in range(max_steps):
        mask = token_filter(out)
        assert mask.shape == (VOCAB,) and mask.dtype == torch.bool
        assert not mask[tok.vocab_size:].any()  # padding rows are never allowed
        if mask[tok.eos_id]:
            json.loads(tok.decode(out))  # the end is allowed only after complete JSON
            if torch.rand((), generator=generator) < 0.3:
                return tok.decode(out), True
            mask[tok.eos_id] = False
            if not mask.any():
                return tok.decode(out), True
        allowed = mask.nonzero().flatten()
        out.append(int(allowed[torch.randint(len(allowed), (), generator=generator)]))
    return tok.decode(out), False


def test_json_object_walks_end_in_json_objects(tok):
    grammars = JsonGrammars(tok, VOCAB)
    grammar = grammars.compile(None)
    generator = torch.Generator().manual_seed(0)
    ended = 0
    for _ in range(12):
        text, done = walk(tok, grammars.token_filter(grammar, frozenset([tok.eos_id])), generator)
        if done:
            assert isinstance(json.loads(text), dict)
            ended += 1
    assert ended >= 3


def test_json_schema_walks_match_the_schema(tok):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}},
              "required": ["a", "b"]}
    grammars = JsonGrammars(tok, VOCAB)
    grammar = grammars.compile(schema)
    generator = torch.Generator().manual_seed(1)
    ended = 0
    for _ in range(8):
        text, done = walk(tok, grammars.token_filter(grammar, frozenset([tok.eos_id])), generator)
        if done:
            value = json.loads(text)
            assert set(value) == {"a", "b"} and isinstance(value["a"], int) and isinstance(value["b"], bool)
            ended += 1
    assert ended >= 4


def test_a_token_outside_the_grammar_leaves_only_the_end_token(tok):
    grammars = JsonGrammars(tok, VOCAB)
    token_filter = grammars.token_filter(grammars.compile(None), frozenset([tok.eos_id]))
    mask = token_filter(tok.encode("cat"))  # JSON cannot start with "cat": no exception in the engine thread
    assert mask.nonzero().flatten().tolist() == [tok.eos_id]


def test_a_schema_that_does_not_compile_is_refused(tok):
    with pytest.raises(JsonModeError, match="cannot be compiled"):
        JsonGrammars(tok, VOCAB).compile({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})
