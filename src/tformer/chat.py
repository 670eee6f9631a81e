"""Chat templates: a checkpoint's Jinja template rendered as transformers' `apply_chat_template` does.

A message is {"role": "system" | "user" | "assistant", "content": str}. The template comes from the
checkpoint (`chat_template.jinja`, or `chat_template` in tokenizer_config.json, as HF stores it);
a checkpoint without one gets ChatML (`<|im_start|>role\\n...<|im_end|>\\n`), the format of Qwen and
SmolLM2 and TRL's default. `assistant_spans` finds the characters each assistant turn adds, which is
what supervised fine-tuning trains on.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ROLES = ("system", "user", "assistant")


class ChatTemplateError(ValueError):
    """A template that fails to render, or messages it cannot take."""


@lru_cache(maxsize=16)
def _compile(source: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ChatTemplateError(f"the chat template refused the messages: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ChatTemplateError(f"the chat template does not parse: {e}") from None


class ChatTemplate:
    """A Jinja chat template with the tokenizer's bos/eos strings it may refer to."""

    def __init__(self, source: str | None = None, bos_token: str = "", eos_token: str = ""):
        self.source = source if source is not None else CHATML
        self.is_default = source is None
        self.bos_token, self.eos_token = bos_token, eos_token
        self._template = _compile(self.source)

    @classmethod
    def for_checkpoint(cls, folder: str | Path, tokenizer=None) -> ChatTemplate:
        """The template stored with a checkpoint or HF folder (ChatML when it has none)."""
        from tformer.convert.gguf import read_chat_template

        source = read_chat_template(folder) if Path(folder).is_dir() else None
        bos = eos = ""
        if tokenizer is not None:
            bos = tokenizer.hf.id_to_token(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
            eos = tokenizer.hf.id_to_token(tokenizer.eos_id) if tokenizer.eos_id is not None else ""
        return cls(source, bos or "", eos or "")

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as the model reads it; with `add_generation_prompt`, followed by the
        start of an assistant turn."""
        check_messages(messages)
        from jinja2 import TemplateError

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template failed to render: {e}") from None

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and, for each assistant message, the [start, end) characters
        it adds: from the end of the generation prompt before it to the end of its turn (the
        end-of-turn marker included, so the model learns to stop)."""
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not text.startswith(upto) or not upto.startswith(before):
                raise ChatTemplateError(
                    "this chat template renders a conversation differently from its prefixes (it rewrites "
                    f"earlier turns, as templates that drop past reasoning do), so turn {i}'s tokens cannot be "
                    "found; train on prompt/completion data instead"
                )
            spans.append((len(before), len(upto)))
        return text, spans


def check_messages(messages) -> None:
    """Refuse what is not a list of {"role", "content"} messages with known roles."""
    if not isinstance(messages, list):
        raise ChatTemplateError(f"messages must be a list of {{'role', 'content'}} objects, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise ChatTemplateError(f"message {i} must be {{'role': one of {list(ROLES)}, 'content': str}}, got {m!r}")
