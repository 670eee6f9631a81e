"""What /v1/completions and /v1/chat/completions do between the body and the response: validate and
map the request onto engine requests (`prepare`), then gather the choices (`collect`) or stream
them as server-sent events (`stream`), recording the request's metrics either way.
"""

from __future__ import annotations

from tformer.serve.requests import GenerationRequest
from tformer.serve.generation import (Job, chat_prompt, completion_prompts, max_new_tokens, sampling_fields,
                                      seed_for)
from tformer.serve.embeddings import EmbeddingModel
from tformer.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_request
from tformer.serve.responses import DONE, Shape, sse

ABORTED = ("the engine aborted this generation (its KV cache could not hold it, or the engine failed or is "
           "stopping: see the server log); retry")


def prepare(state, body: bytes, chat: bool) -> tuple[Job, Shape, bool | None]:
    """(job, response shape, include_usage: None when not streamed) for a request body; APIError for a
    request that cannot run. Blocking (tokenization, grammar compilation): run it off the event loop."""
    request = parse_request(body, ChatCompletionRequest if chat else CompletionRequest)
    served = state.model(request.model)
    if isinstance(served, EmbeddingModel):
        raise APIError(400, f"{request.model} is an embedding model (an encoder): POST /v1/embeddings",
                       param="model")
    echo = None
    if chat:
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        prompts = [chat_prompt(served, request)]
        param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        asked = getattr(request, param)
        stop_ids, stop = served.chat_stop_ids, served.chat_stop_strings + (request.stop or [])
        top = (request.top_logprobs or 0) if request.logprobs else None
    else:
        prompts = completion_prompts(served, request)
        param, asked = "max_tokens", request.max_tokens
        stop_ids, stop, top = served.stop_ids, request.stop or [], request.logprobs
        if request.echo:
            if top is not None:
                raise APIError(400, "echo with logprobs is not supported (no prompt logprobs): leave one out",
                               param="echo")
            echo = [p if isinstance(p, str) else served.tokenizer.decode(p) for p in request.prompts()]
    make_filter = _json_filters(served, request, stop_ids)
    n = request.n or 1
    specs = [[GenerationRequest(prompt_ids=p, max_new_tokens=max_new_tokens(served, p, asked, param, chat),
                                seed=seed_for(request.seed, i * n + j), stop_ids=stop_ids, logprobs=top,
                                token_filter=make_filter(), **sampling_fields(request)) for j in range(n)]
             for i, p in enumerate(prompts)]
    include_usage = bool(request.stream_options and request.stream_options.include_usage) if request.stream else None
    return Job(served, prompts, specs, stop, stop_ids), Shape(chat, served.name, top, echo), include_usage


def _json_filters(served, request, stop_ids):
    """A maker of token filters for the request's response_format (one filter per choice)."""
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return lambda: None
    from tformer.serve.json_mode import JsonGrammars, JsonModeError

    if fmt.type == "json_schema" and (fmt.json_schema is None or not fmt.json_schema.schema_):
        raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
    if not stop_ids:
        raise APIError(400, "response_format json needs an end-of-text token, and this tokenizer has none",
                       param="response_format")
    try:
        if served.json_grammars is None:
            served.json_grammars = JsonGrammars(served.tokenizer, served.engine.vocab_size)
        grammar = served.json_grammars.compile(fmt.json_schema.schema_ if fmt.type == "json_schema" else None)
    except JsonModeError as e:
        raise APIError(400, str(e), param="response_format") from None
    return lambda: served.json_grammars.token_filter(grammar, stop_ids)


async def collect(state, job: Job, shape: Shape) -> dict:
    """The whole response once every choice has ended."""
    texts = {c.index: "" for c in job.choices}
    events: dict[int, list] = {c.index: [] for c in job.choices}
    try:
        async for choice, piece, sent in job.updates():
            texts[choice.index] += piece
            events[choice.index] += sent
    finally:
        record(state, job)
    if any(c.finish == "abort" for c in job.choices):
        raise APIError(503, ABORTED, code="aborted")
    return shape.response(job, texts, events)


async def stream(state, job: Job, shape: Shape, include_usage: bool):
    """The response as server-sent events: chunks as the choices grow, the usage chunk when asked
    for, then [DONE]. An engine abort is sent as an error event."""
    extra = {"usage": None} if include_usage else {}
    try:
        for c in job.choices:
            if shape.chat:
                yield sse({**shape.role_chunk(c.index), **extra})
            elif shape.echo:
                yield sse({**shape.chunk(job, c, shape.echo[c.prompt_index], [], None), **extra})
        async for choice, piece, sent in job.updates():
            if choice.finish == "abort":
                yield sse({"error": {"message": ABORTED, "type": "overloaded_error", "param": None,
                                     "code": "aborted"}})
                return
            yield sse({**shape.chunk(job, choice, piece, sent, choice.finish), **extra})
        if include_usage:
            yield sse(shape.usage_chunk(job))
        yield DONE
    finally:
        record(state, job)


def record(state, job: Job) -> None:
    """The finished job's tokens, finish reasons and latencies into the metrics."""
    m, name = state.metrics, job.served.name
    for c in job.choices:
        m.prompt_tokens.labels(name).inc(len(job.prompts[c.prompt_index]))
        m.generation_tokens.labels(name).inc(c.n_tokens)
        m.finished.labels(name, c.finish or "abort").inc()
        if c.first_at is not None:  # a choice aborted before its first token has no latencies
            m.ttft.labels(name).observe(c.first_at - job.arrival)
            m.e2e.labels(name).observe(c.last_at - job.arrival)
        for gap in c.gaps:
            m.itl.labels(name).observe(gap)
