"""POST /v1/embeddings: an encoder (BERT, ModernBERT, MiniLM) served as an embedding model, in OpenAI's
wire format.

    {"model", "input": str | [str] | [int] | [[int]], "encoding_format": "float" | "base64", "dimensions"}
    -> {"object": "list", "data": [{"object": "embedding", "index", "embedding"}], "model", "usage"}

Texts go through the tokenizer's template ([CLS] ... [SEP]); token-id inputs are taken as they are.
Embeddings follow the model folder's sentence-transformers pipeline (inference/embed.py's EmbedSpec:
pooling, normalisation, max_seq_length; default mean pooling, L2-normalised). An input longer than
that length (else the model's context) is refused (400) rather than cut. `dimensions` is accepted only
as the model's own width (the models served here are not trained to be truncated).

`EmbeddingEngine` batches across requests: a worker thread takes every input queued since its last
forward (at most `max_batch_tokens` padded tokens), sorted by length, in one forward each.
"""

from __future__ import annotations

import base64
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field

from tformer.serve.protocol import APIError, _Strict, parse_body


class EmbeddingRequest(_Strict):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


class EmbeddingEngine:
    """A worker thread that embeds queued token rows in batches; `submit(rows)` returns a Future of
    the (N, C) float32 CPU embeddings."""

    def __init__(self, model, pad_id: int, spec=None, max_batch_tokens: int = 16384):
        from tformer.inference.embed import EmbedSpec

        self.model, self.pad_id, self.max_batch_tokens = model.eval(), pad_id, max_batch_tokens
        self.spec = spec or EmbedSpec()
        self.max_context = min(self.spec.max_len or model.config.max_seq_len, model.config.max_seq_len)
        self.dim = model.config.dim
        self._queue: deque = deque()  # (row, its request's future, its slot there, the request's results, [left])
        self._wake = threading.Condition()
        self._thread, self._running = None, False
        self.counts = {"requests": 0, "inputs": 0, "tokens": 0, "batches": 0}

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="tformer-embed", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._running = False
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def stats(self) -> dict:
        return {"waiting": len(self._queue), **self.counts}

    def submit(self, rows: list[list[int]]) -> Future:
        future, results = Future(), [None] * len(rows)
        pending = [len(rows)]
        with self._wake:
            for i, row in enumerate(rows):
                self._queue.append((row, future, i, results, pending))
            self.counts["requests"] += 1
            self.counts["inputs"] += len(rows)
            self.counts["tokens"] += sum(map(len, rows))
            self._wake.notify()
        return future

    def _take(self) -> list:
        """Queued inputs for one forward: shortest first, while the padded batch fits max_batch_tokens."""
        items = sorted(self._queue, key=lambda item: len(item[0]))
        batch = []
        for item in items:
            if batch and (len(batch) + 1) * len(item[0]) > self.max_batch_tokens:
                break
            batch.append(item)
        for item in batch:
            self._queue.remove(item)
        return batch

    def _loop(self) -> None:
        from tformer.inference.embed import embed_rows

        while True:
            with self._wake:
                while self._running and not self._queue:
                    self._wake.wait()
                if not self._running:
                    return
                batch = self._take()
            try:
                vectors = embed_rows(self.model, [item[0] for item in batch], self.pad_id, self.spec).cpu()
            except Exception as e:  # noqa: BLE001 - the requests fail, the server goes on
                for _, future, *_ in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.counts["batches"] += 1
            for (_, future, slot, results, pending), vector in zip(batch, vectors):
                results[slot] = vector
                pending[0] -= 1
                if pending[0] == 0 and not future.done():
                    future.set_result(torch.stack(results))


@dataclass
class EmbeddingModel:
    """An encoder the server answers /v1/embeddings for."""
    name: str
    engine: EmbeddingEngine
    tokenizer: object
    parent: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def max_context(self) -> int:
        return self.engine.max_context


def prepare(state, body: bytes) -> tuple[EmbeddingModel, EmbeddingRequest, list[list[int]]]:
    """(the model, the request, its token rows); APIError for a request that cannot run."""
    request = parse_body(body, EmbeddingRequest)
    served = state.model(request.model)
    if not isinstance(served, EmbeddingModel):
        raise APIError(400, f"{request.model} is a text generation model: POST /v1/completions or "
                            "/v1/chat/completions; /v1/embeddings serves encoders", param="model")
    inputs = request.input
    if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
        inputs = [inputs]
    if not inputs:
        raise APIError(400, "input is empty: pass a string, a list of strings or token ids", param="input")
    vocab = served.engine.model.config.vocab_size
    texts = [item for item in inputs if isinstance(item, str)]
    if "" in texts:
        raise APIError(400, f"input[{inputs.index('')}] is an empty string", param="input")
    encoded = iter(served.tokenizer.encode_batch(texts, template=True) if texts else [])
    rows = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            row = next(encoded)
        else:
            if not item or any(not 0 <= t < vocab for t in item):
                raise APIError(400, f"input[{i}]: token ids must be a non-empty list of ids in 0..{vocab - 1}",
                               param="input")
            row = list(item)
        if len(row) > served.max_context:
            raise APIError(400, f"input[{i}] is {len(row)} tokens, more than the model's context of "
                                f"{served.max_context}: shorten it", param="input", code="context_length_exceeded")
        rows.append(row)
    if request.dimensions is not None and request.dimensions != served.engine.dim:
        raise APIError(400, f"dimensions: this model's embeddings have {served.engine.dim} dimensions and cannot be "
                            "shortened; leave dimensions out", param="dimensions")
    return served, request, rows


def response(served: EmbeddingModel, request: EmbeddingRequest, rows: list[list[int]],
             vectors: torch.Tensor) -> dict:
    def encode(v: torch.Tensor):
        if request.encoding_format == "base64":  # little-endian float32, as OpenAI's clients decode it
            return base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii")
        return v.tolist()

    tokens = sum(map(len, rows))
    data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": served.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

