"""response_format json_object / json_schema: a token filter that only lets output through that can
still become valid JSON (of the schema), and the end token only once it is complete.

The grammar work is xgrammar's (a maintained library; CPU and GPU, any `tokenizers` vocabulary):
its matcher walks the grammar as tokens are accepted and fills a bitmask of the allowed next tokens.
json_object compiles the schema {"type": "object"} without strictness; whitespace between tokens is
limited so a model cannot pad forever.
"""

from __future__ import annotations

import json

import torch

MAX_WHITESPACE = 2  # consecutive whitespace characters the grammar allows between JSON tokens


class JsonModeError(ValueError):
    """A schema xgrammar cannot compile, or no xgrammar."""


class JsonGrammars:
    """Compiled JSON grammars over one tokenizer's vocabulary, padded to the model's `vocab_size`."""

    def __init__(self, tokenizer, vocab_size: int):
        try:
            import xgrammar
            from transformers import PreTrainedTokenizerFast
        except ImportError:
            raise JsonModeError("response_format json needs xgrammar: pip install 'tformer[serve]'") from None
        self.xgr, self.vocab_size = xgrammar, vocab_size
        stop = [tokenizer.eos_id] if tokenizer.eos_id is not None else None
        info = xgrammar.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tokenizer.hf),
                                                       vocab_size=vocab_size, stop_token_ids=stop)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        self._bits = torch.arange(32, dtype=torch.int32)

    def compile(self, schema: dict | None):
        """The grammar of JSON matching `schema` (None: any JSON object)."""
        try:
            return self.compiler.compile_json_schema(
                json.dumps(schema if schema is not None else {"type": "object"}), any_whitespace=False,
                strict_mode=schema is not None, max_whitespace_cnt=MAX_WHITESPACE)
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError for a schema it cannot take
            raise JsonModeError(f"response_format.json_schema.schema cannot be compiled: {e}") from None

    def token_filter(self, grammar, stop_ids: frozenset[int]) -> JsonFilter:
        """A fresh filter (one per generated sequence) for a compiled grammar."""
        matcher = self.xgr.GrammarMatcher(grammar, override_stop_tokens=sorted(stop_ids))
        return JsonFilter(self, matcher, stop_ids)


class JsonFilter:
    """GenerationRequest.token_filter: called with the tokens generated so far, returns the (V,) bool
    mask of allowed next tokens. Not thread-safe: the engine's thread alone calls it. It never raises
    (an exception would fail the engine step of every running request): a token the grammar did not
    allow, which the engine's masking rules out, leaves only the stop tokens."""

    def __init__(self, grammars: JsonGrammars, matcher, stop_ids: frozenset[int]):
        self.grammars, self.matcher, self.stop_ids = grammars, matcher, stop_ids
        self.accepted = 0
        self.bitmask = grammars.xgr.allocate_token_bitmask(1, grammars.vocab_size)  # (1, ceil(V / 32)) int32

    def __call__(self, generated: list[int]) -> torch.Tensor:
        for token in generated[self.accepted:]:
            if not self.matcher.accept_token(token):
                only_stop = torch.zeros(self.grammars.vocab_size, dtype=torch.bool)
                only_stop[sorted(self.stop_ids)] = True
                return only_stop
        self.accepted = len(generated)
        self.matcher.fill_next_token_bitmask(self.bitmask)
        bits = (self.bitmask[0].unsqueeze(-1) >> self.grammars._bits) & 1  # (ceil(V / 32), 32)
        return bits.bool().flatten()[: self.grammars.vocab_size]
