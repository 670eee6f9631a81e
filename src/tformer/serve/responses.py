"""Response bodies in OpenAI's shapes: whole responses, stream chunks, usage and both logprobs formats.

    chat:        choices[i].logprobs = {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}
    completions: choices[i].logprobs = {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}],
                                        "text_offset"}
A token's text is the decode of that token alone (U+FFFD where it holds part of a character); its
bytes (chat) are its own, so a client can join them into the exact text.
"""

from __future__ import annotations

import json
import time
import uuid

from tformer.serve.text import token_text

DONE = b"data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(payload: dict) -> bytes:
    """One server-sent event."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def usage(job) -> dict:
    prompt, completion = job.prompt_tokens, job.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Shape:
    """The fixed fields of one response and how its choices look (chat or legacy completion)."""

    def __init__(self, chat: bool, model: str, top_logprobs: int | None, echo: list[str] | None = None):
        self.chat, self.model, self.top_logprobs, self.echo = chat, model, top_logprobs, echo
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def head(self, chunk: bool = False) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def response(self, job, texts: dict[int, str], events: dict[int, list]) -> dict:
        """The whole (not streamed) response; texts and events by choice index."""
        choices = []
        for c in job.choices:
            text = (self.echo[c.prompt_index] if self.echo else "") + texts[c.index]
            body = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
            offsets = c.text.offsets if not self.chat else None
            choices.append({"index": c.index, **body, "logprobs": self.logprobs(job, events[c.index], offsets),
                            "finish_reason": c.finish})
        return {**self.head(), "choices": choices, "usage": usage(job)}

    def role_chunk(self, index: int) -> dict:
        """A chat stream's first chunk of a choice (legacy completions have none)."""
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}
        return {**self.head(chunk=True), "choices": [choice]}

    def chunk(self, job, choice, text: str, events: list, finish: str | None) -> dict:
        if self.chat:
            body = {"delta": {"content": text} if text or finish is None else {}}
        else:
            body = {"text": text}
        offsets = choice.text.offsets[-len(events):] if events and not self.chat else None
        logprobs = self.logprobs(job, events, offsets) if events else None
        return {**self.head(chunk=True), "choices": [{"index": choice.index, **body, "logprobs": logprobs,
                                                      "finish_reason": finish}]}

    def usage_chunk(self, job) -> dict:
        return {**self.head(chunk=True), "choices": [], "usage": usage(job)}

    def logprobs(self, job, events: list, offsets: list[int] | None) -> dict | None:
        if self.top_logprobs is None:
            return None
        tok = job.served.tokenizer
        if self.chat:
            return {"content": [self._chat_entry(tok, job.served.token_bytes, e) for e in events]}
        tokens = [token_text(tok, e.token_id) for e in events]
        tops = [_top_dict(tok, e.top_logprobs or []) for e in events]
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in events],
                "top_logprobs": tops if self.top_logprobs > 0 else None, "text_offset": list(offsets or [])}

    @staticmethod
    def _chat_entry(tok, token_bytes, event) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            return {"token": token_text(tok, token_id), "logprob": logprob, "bytes": list(token_bytes(token_id))}

        top = [entry(t, lp) for t, lp in (event.top_logprobs or [])]
        return {**entry(event.token_id, event.logprob), "top_logprobs": top}


def _top_dict(tok, top: list[tuple[int, float]]) -> dict[str, float]:
    """Legacy top_logprobs: token text -> logprob, most likely first; tokens whose texts collide (two
    byte tokens both shown as U+FFFD) keep the likelier one's logprob."""
    out: dict[str, float] = {}
    for token_id, logprob in top:
        out.setdefault(token_text(tok, token_id), logprob)
    return out
