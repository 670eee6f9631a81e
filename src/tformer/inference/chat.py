"""Multi-turn chat with one model: the conversation, its system prompt, its rendering through the
checkpoint's chat template, and one KV-cached `generate` per reply.

    session = ChatSession(DecodeEngine(model, max_batch_size=1), tokenizer,
                          ChatTemplate.for_checkpoint(ckpt, tokenizer), system="Be brief.")
    session.reply("What is the capital of France?", stream=print_piece)   # -> the reply's text
    session.reset()                                                         # the system prompt stays

Each reply renders the whole conversation with the generation prompt, encodes it, and decodes from
it (one prefill, then one cached step per token) until the tokenizer's EOS, the template's
end-of-turn marker (`<|im_end|>` for ChatML) or max_new_tokens. The prompt must leave room for
max_new_tokens within the model's max_seq_len: the oldest exchanges are dropped until it does (the
system prompt stays; `on_note` is told), and a message that does not fit even alone is refused.
"""

from __future__ import annotations

from typing import Callable

from tformer.chat import ChatTemplate, ChatTemplateError
from tformer.inference.sampling import SamplingConfig
from tformer.inference.text import generate_text

MAX_NEW_TOKENS = 256  # a reply's default limit (at most half the context)
_MARK = "\x00reply\x00"  # an assistant message no template rewrites, to find what follows one


class ChatError(ValueError):
    """A message the session cannot answer (it does not fit the model's context)."""


def end_of_turn(template: ChatTemplate) -> str | None:
    """The text the template puts after an assistant message (`<|im_end|>` for ChatML, a Llama 2
    template's `</s>`), None where it adds only whitespace or does not render a two-turn chat."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}]
    try:
        text = template.render(messages)
    except ChatTemplateError:
        return None
    _, found, after = text.partition(_MARK)
    return (after.strip() or None) if found else None


class ChatSession:
    """A conversation with the model of `engine` (a DecodeEngine, or a model: an engine per reply).

    turns: the user and assistant messages so far, oldest first; system: the system prompt or None.
    max_new_tokens: a reply's limit (None: MAX_NEW_TOKENS, or half the model's max_seq_len if less).
    seed: reply i samples with seed + i, so a session replays the same from the same seed.
    """

    def __init__(self, engine, tokenizer, template: ChatTemplate, system: str | None = None,
                 max_new_tokens: int | None = None, sampling: SamplingConfig | None = None, seed: int | None = None,
                 on_note: Callable[[str], None] | None = None):
        model = getattr(engine, "model", engine)
        self.max_seq_len = model.config.max_seq_len
        if max_new_tokens is None:
            max_new_tokens = min(MAX_NEW_TOKENS, self.max_seq_len // 2)
        if not 0 < max_new_tokens < self.max_seq_len:
            raise ChatError(f"max_new_tokens must be between 1 and the model's max_seq_len - 1 = "
                            f"{self.max_seq_len - 1}, got {max_new_tokens}")
        self.engine, self.tokenizer, self.template = engine, tokenizer, template
        self.system, self.turns = system or None, []
        self.max_new_tokens, self.sampling, self.seed = max_new_tokens, sampling or SamplingConfig(), seed
        self.on_note = on_note or (lambda note: None)
        eos = tokenizer.id_to_token(tokenizer.eos_id) if tokenizer.eos_id is not None else None
        self.stop = sorted({s for s in (end_of_turn(template), eos) if s})  # cut where the turn ends
        self.n_replies = 0

    def messages(self, turns: list[dict] | None = None) -> list[dict]:
        """The system prompt (if any) followed by `turns` (default: the session's)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + (self.turns if turns is None else turns)

    def reset(self) -> None:
        """Forget the conversation; keep the system prompt."""
        self.turns = []

    def set_system(self, text: str | None) -> None:
        """A new system prompt (None or empty: none) and a new conversation."""
        self.system = text or None
        self.reset()

    def reply(self, text: str, stream: Callable[[str], None] | None = None) -> str:
        """The model's answer to the user message `text`, recorded in the conversation. stream
        receives the answer's text piece by piece as it is decoded."""
        turns = [*self.turns, {"role": "user", "content": text}]
        ids, turns = self._fit(turns)
        seed = None if self.seed is None else self.seed + self.n_replies
        [answer] = generate_text(self.engine, self.tokenizer, [ids], self.max_new_tokens, self.sampling,
                                 self.stop, seed, stream=stream or False)
        self.turns = [*turns, {"role": "assistant", "content": answer}]
        self.n_replies += 1
        return answer

    def prompt_ids(self, turns: list[dict]) -> list[int]:
        """Token ids of the conversation `turns` (system prompt first) with the generation prompt."""
        return self.tokenizer.encode(self.template.render(self.messages(turns), add_generation_prompt=True))

    def _fit(self, turns: list[dict]) -> tuple[list[int], list[dict]]:
        """(prompt ids, the turns they hold): the oldest exchanges dropped until max_new_tokens fit."""
        room = self.max_seq_len - self.max_new_tokens
        dropped = 0
        while len(ids := self.prompt_ids(turns)) > room:
            if len(turns) == 1:
                what = "with the system prompt, " if self.system else ""
                raise ChatError(
                    f"this message is {len(ids)} tokens {what}as the template renders it, but the model's "
                    f"max_seq_len {self.max_seq_len} minus max_new_tokens {self.max_new_tokens} leaves room "
                    f"for {room}: shorten it or ask for fewer new tokens"
                )
            turns = turns[1:]
            while turns[0]["role"] != "user":  # an exchange starts at a user message
                turns = turns[1:]
            dropped += 1
        if dropped:
            self.on_note(f"dropped the oldest {dropped} exchange{'s' * (dropped > 1)} of the conversation to fit "
                         f"the model's max_seq_len {self.max_seq_len} (max_new_tokens {self.max_new_tokens}); "
                         "the system prompt stays")
        return ids, turns
