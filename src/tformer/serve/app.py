"""The OpenAI-compatible HTTP app (FastAPI) over one ServeEngine per served model.

    POST /v1/completions, POST /v1/chat/completions   stream: true answers server-sent events, one
                                                       `data: {chunk}` per piece, ending `data: [DONE]`
    POST /v1/embeddings                                 an encoder's sentence embeddings (embeddings.py)
    GET /v1/models, GET /health, GET /metrics          (Prometheus text format)

Bodies are read and validated here (protocol.parse_request), not by FastAPI, so that every bad body
gets an OpenAI error. The API key, when set, is checked on every route but /health by a plain ASGI
middleware (Starlette's BaseHTTPMiddleware would wrap streams and hide client disconnects). A client
that disconnects cancels its engine requests, streaming or not. At most `max_streams` engine
requests (choices) are in flight from this app at once; past that a request gets 429.
"""

from __future__ import annotations

import asyncio
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from tformer.serve import embeddings as embedding
from tformer.serve import routes
from tformer.serve.metrics import Metrics
from tformer.serve.protocol import APIError, error_body

PUBLIC_ROUTES = ("/health",)


@dataclass
class ServeSettings:
    api_key: str | None = None
    max_streams: int = 320  # engine requests in flight at once (each choice of each request is one)
    max_body_bytes: int = 4 * 2**20


class AppState:
    """What the routes share: the served models by name, settings, metrics, the count of streams."""

    def __init__(self, models: list, settings: ServeSettings):
        self.models = {m.name: m for m in models}
        self.settings = settings
        self.metrics = Metrics({m.name: m.engine for m in models})
        self.streams = 0

    def model(self, name: str):
        if name not in self.models:
            raise APIError(404, f"the model {name!r} does not exist here; served: {', '.join(self.models)}",
                           param="model", code="model_not_found")
        return self.models[name]


def build_app(models: list, settings: ServeSettings | None = None, manage_engines: bool = True) -> FastAPI:
    """The app serving `models` (generation.ServedModel); with manage_engines, it starts their engines
    when it starts and stops them when it stops."""
    state = AppState(models, settings or ServeSettings())

    @asynccontextmanager
    async def lifespan(app):
        if manage_engines:
            for m in models:
                m.engine.start()
        try:
            yield
        finally:
            if manage_engines:
                for m in models:
                    m.engine.stop()

    app = FastAPI(title="tformer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    _add_handlers(app)
    _add_routes(app, state)
    app.add_middleware(_Guard, state=state)
    return app


def _add_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(error_body(e.status_code, message), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        return JSONResponse(error_body(500, f"internal error: {e!r}"), status_code=500)


def _add_routes(app: FastAPI, state: AppState) -> None:
    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models():
        data = [{"id": m.name, "object": "model", "created": m.created, "owned_by": "tformer",
                 "root": m.parent or m.name, "parent": m.parent, "max_model_len": m.max_context}
                for m in state.models.values()]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        m = state.model(name)
        return {"id": m.name, "object": "model", "created": m.created, "owned_by": "tformer"}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, state, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(request, state, chat=True)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await _read_body(request, state.settings.max_body_bytes)
        served, parsed, rows = await asyncio.to_thread(embedding.prepare, state, body)
        vectors = await asyncio.wrap_future(served.engine.submit(rows))
        state.metrics.prompt_tokens.labels(served.name).inc(sum(map(len, rows)))
        return JSONResponse(await asyncio.to_thread(embedding.response, served, parsed, rows, vectors))


async def _generate(request: Request, state: AppState, chat: bool):
    body = await _read_body(request, state.settings.max_body_bytes)
    job, shape, include_usage = await asyncio.to_thread(routes.prepare, state, body, chat)
    if state.streams + len(job.specs) > state.settings.max_streams:
        raise APIError(429, f"too many concurrent requests: {state.streams} generations are running here and the "
                            f"limit is {state.settings.max_streams}; retry later", code="too_many_requests")
    job.submit()
    state.streams += len(job.choices)
    if include_usage is not None:  # streamed
        return _JobStream(routes.stream(state, job, shape, include_usage), job, state)
    try:
        collect = asyncio.ensure_future(routes.collect(state, job, shape))
        gone = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not collect.done():  # the client went away: its generations are cancelled, not finished
            collect.cancel()
            return Response(status_code=499)
        gone.cancel()
        return JSONResponse(collect.result())
    finally:
        job.cancel()
        state.streams -= len(job.choices)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) past `limit` bytes, whether its Content-Length says so or not."""
    too_big = APIError(413, f"the request body is over this server's limit of {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _JobStream(StreamingResponse):
    """A streamed response whose generations are cancelled however the response ends (done,
    client gone, or failed), and whose streams are given back to the app's count."""

    def __init__(self, content, job, state: AppState):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job, self.state = job, state

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()
            self.state.streams -= len(self.job.choices)


class _Guard:
    """ASGI middleware: counts every HTTP request by route and status, and checks the API key."""

    def __init__(self, app, state: AppState):
        self.app, self.state = app, state
        self.known = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
                      "/v1/embeddings"}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in self.known else ("/v1/models/{name}" if path.startswith("/v1/models/") else "other")
        status = [500]

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if path not in PUBLIC_ROUTES and not self._authorized(scope):
                response = JSONResponse(error_body(401, "missing or wrong API key: send the header "
                                                        "'Authorization: Bearer <key>'", code="invalid_api_key"),
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, counted_send)
            await self.app(scope, receive, counted_send)
        finally:
            self.state.metrics.http.labels(route, str(status[0])).inc()

    def _authorized(self, scope) -> bool:
        key = self.state.settings.api_key
        if key is None:
            return True
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), key.encode())

