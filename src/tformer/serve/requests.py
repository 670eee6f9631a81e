"""What a client of the serving engine hands in and gets back: a request, its token events, and the
stream that carries them from the engine's scheduling thread to a blocking or asyncio reader."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass
class GenerationRequest:
    """What to generate. temperature 0 is greedy; top_k 0, top_p 1 and min_p 0 are off; the penalties
    are OpenAI's, over the generated tokens; seed None draws a fresh one. Generation ends after a token
    of stop_ids ("stop") or max_new_tokens ("length"). logprobs: None none, 0 the sampled token's, k > 0
    also the k most likely. token_filter(generated) gives a bool (V,) mask of allowed next tokens, or None."""
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None
    token_filter: Callable[[list[int]], torch.Tensor | None] | None = None


@dataclass
class TokenEvent:
    """One generated token, or (finish_reason "abort", token_id -1) the end of a stopped request."""
    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None  # None while running; "stop", "length", or "abort" (cancelled, or an engine error)


class EngineFull(Exception):
    """The waiting queue is full: try again later."""


class RequestStream:
    """One request's TokenEvents in order, the last with a finish_reason; iterate it (blocking) or
    `async for` it. Events pushed before an async consumer arrives are handed over first."""

    def __init__(self, request: GenerationRequest):
        self.request = request
        self._events: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._async: tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None = None
        self.finished = False

    def _push(self, event: TokenEvent) -> None:
        with self._lock:
            if self._async is None:
                self._events.put(event)
            else:
                loop, q = self._async
                loop.call_soon_threadsafe(q.put_nowait, event)

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            event = self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            while not self._events.empty():
                q.put_nowait(self._events.get_nowait())
            self._async = (asyncio.get_running_loop(), q)
        while True:
            event = await q.get()
            yield event
            if event.finish_reason is not None:
                return
