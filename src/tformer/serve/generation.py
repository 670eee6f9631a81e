"""One API request as engine requests: prompts encoded and checked against the context, sampling fields
mapped onto GenerationRequests (n per prompt), and the engine's token events turned into each choice's
text, logprobs and finish reason.

A choice ends at the first of: a token of its stop ids (the tokenizer's EOS, and for chat the chat
template's end-of-turn token; its text is not shown), a stop string (the text is cut before it and
the engine request cancelled), max_tokens ("length"), or an engine abort. Choice i of a request with
a seed samples with seed + i, so n > 1 gives n different samples that each replay alone.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from tformer.serve.requests import EngineFull, GenerationRequest, RequestStream, TokenEvent
from tformer.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from tformer.serve.text import TextStream

INT64 = 2**64


@dataclass
class ServedModel:
    """A model the server answers for: its engine, tokenizer and chat template. parent: the base
    model's name when this one is base + an adapter (served as its own merged copy)."""
    name: str
    engine: object
    tokenizer: object
    template: object = None
    parent: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    json_grammars: object = None  # JsonGrammars, built on the first response_format request

    def __post_init__(self):
        from tformer.inference.chat import end_of_turn
        from tformer.serve.text import TokenBytes

        self.token_bytes = TokenBytes(self.tokenizer)

        eos = self.tokenizer.eos_id
        self.stop_ids = frozenset([eos] if eos is not None else [])
        self.chat_stop_ids, self.chat_stop_strings = self.stop_ids, []
        marker = end_of_turn(self.template) if self.template is not None else None
        if marker:
            ids = self.tokenizer.encode(marker)
            if len(ids) == 1:
                self.chat_stop_ids = self.stop_ids | {ids[0]}
            else:
                self.chat_stop_strings = [marker]

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    @property
    def max_sequence(self) -> int:
        """The longest prompt + generation one request may hold: the context, or fewer where the KV
        pool cannot hold a whole context (a request must fit the pool alone)."""
        stats = self.engine.stats()
        pool = stats.get("blocks_total", 0) * stats.get("block_size", 0)
        return min(self.max_context, pool) if pool > 0 else self.max_context


@dataclass
class Choice:
    """One generated sequence of a request and what has been made of its events so far."""
    index: int
    prompt_index: int
    stream: RequestStream
    text: TextStream
    stop_ids: frozenset[int]
    n_tokens: int = 0
    finish: str | None = None
    logprobs: list[TokenEvent] = field(default_factory=list)  # events whose logprobs are not yet sent
    first_at: float | None = None  # when its first and latest events arrived (time.perf_counter)
    last_at: float | None = None
    gaps: list[float] = field(default_factory=list)  # seconds between consecutive tokens

    def update(self, event: TokenEvent, engine) -> tuple[str, list[TokenEvent]]:
        """Take one engine event: returns (text to send, events whose logprobs go with it)."""
        if self.finish is not None:
            return "", []
        if event.finish_reason != "abort":  # an abort event repeats the last token (or -1): not a new one
            self.n_tokens += 1
            if event.token_id not in self.stop_ids:
                self.text.add(event.token_id)
                self.logprobs.append(event)
        if self.text.stopped:
            self.finish = "stop"
            if event.finish_reason is None:
                engine.cancel(self.stream)
        elif event.finish_reason is not None:
            self.finish = event.finish_reason
            self.text.finish()
        piece = self.text.take(final=self.finish is not None)
        if not piece and self.finish is None:
            return "", []
        sent, self.logprobs = self.logprobs, []
        return piece, sent


class Job:
    """The engine requests of one API request and their choices, in the order of the response."""

    def __init__(self, served: ServedModel, prompts: list[list[int]], specs: list[list[GenerationRequest]],
                 stop: list[str], stop_ids: frozenset[int]):
        self.served, self.prompts = served, prompts
        self.specs = [(p, spec) for p, row in enumerate(specs) for spec in row]
        self.stop, self.stop_ids = stop, stop_ids
        self.choices: list[Choice] = []
        self.arrival = time.perf_counter()

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(c.n_tokens for c in self.choices)

    def submit(self) -> None:
        """Queue every choice; on a refusal the ones already queued are cancelled (APIError 503 / 400)."""
        engine = self.served.engine
        for i, (p, spec) in enumerate(self.specs):
            try:
                stream = engine.submit(spec)
            except (EngineFull, ValueError) as e:
                self.cancel()
                if isinstance(e, EngineFull):
                    raise APIError(503, f"the server is at capacity ({e}); retry later", code="engine_full") from None
                raise APIError(400, str(e)) from None
            text = TextStream(self.served.tokenizer, self.stop)
            self.choices.append(Choice(i, p, stream, text, self.stop_ids))

    def cancel(self) -> None:
        """Cancel every choice still running (after a disconnect or a refusal)."""
        for choice in self.choices:
            if choice.finish is None and not choice.stream.finished:
                self.served.engine.cancel(choice.stream)

    async def updates(self):
        """(choice, text, logprob events) as the choices' events arrive, interleaved; ends when every
        choice has ended. Events of each choice stay in order."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice):
            try:
                async for event in choice.stream:
                    queue.put_nowait((choice, event))
            finally:
                queue.put_nowait((choice, None))

        tasks = [asyncio.ensure_future(pump(c)) for c in self.choices]
        try:
            open_streams = len(tasks)
            while open_streams:
                choice, event = await queue.get()
                if event is None:
                    open_streams -= 1
                    continue
                if choice.finish is not None:
                    continue  # ended on a stop string: the rest is what the engine made before the cancel
                if event.finish_reason != "abort":  # a token: the latency metrics' times
                    now = time.perf_counter()
                    if choice.last_at is not None:
                        choice.gaps.append(now - choice.last_at)
                    choice.first_at = choice.first_at or now
                    choice.last_at = now
                piece, events = choice.update(event, self.served.engine)
                if piece or events or choice.finish is not None:
                    yield choice, piece, events
        finally:
            for task in tasks:
                task.cancel()


def seed_for(seed: int | None, index: int) -> int | None:
    """Choice `index`'s seed: seed + index, wrapped into int64."""
    return None if seed is None else (seed + index + INT64 // 2) % INT64 - INT64 // 2


def sampling_fields(request) -> dict:
    """GenerationRequest's sampling fields from an API request (None -> the OpenAI default)."""
    top_k = request.top_k or 0
    return dict(temperature=1.0 if request.temperature is None else request.temperature,
                top_k=max(top_k, 0), top_p=1.0 if request.top_p is None else request.top_p,
                min_p=request.min_p or 0.0, presence_penalty=request.presence_penalty or 0.0,
                frequency_penalty=request.frequency_penalty or 0.0)


def completion_prompts(served: ServedModel, request: CompletionRequest) -> list[list[int]]:
    from tformer.inference.text import prompt_ids

    vocab = served.engine.vocab_size
    prompts = []
    for i, prompt in enumerate(request.prompts()):
        if isinstance(prompt, list) and any(not 0 <= t < vocab for t in prompt):
            raise APIError(400, f"prompt {i} holds token ids outside the vocabulary [0, {vocab})", param="prompt")
        try:
            prompts.append(prompt_ids(served.tokenizer, prompt))
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
    return prompts


def chat_prompt(served: ServedModel, request: ChatCompletionRequest) -> list[int]:
    from tformer.chat import ChatTemplateError

    try:
        text = served.template.render(request.template_messages(), add_generation_prompt=True)
    except ChatTemplateError as e:
        raise APIError(400, str(e), param="messages") from None
    return served.tokenizer.encode(text)


def max_new_tokens(served: ServedModel, prompt: list[int], asked: int | None, param: str, chat: bool) -> int:
    """The tokens a choice of `prompt` may generate: `asked`, or (None) all the room the context and
    the KV pool leave; APIError 400 when the prompt and `asked` do not fit."""
    n, context, room = len(prompt), served.max_context, served.max_sequence
    limit = f"this model's context of {context} tokens" + (f" (the KV cache holds {room})" if room < context else "")
    if n >= room:
        raise APIError(400, f"the prompt is {n} tokens, but {limit} leaves no room to generate: shorten it",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    if asked is None:
        return room - n
    if n + asked > room:
        raise APIError(400, f"the prompt ({n} tokens) and {param} ({asked}) exceed {limit}: ask for at most "
                            f"{room - n}", param=param, code="context_length_exceeded")
    return asked
