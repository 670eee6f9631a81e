"""The OpenAI wire format: request models (pydantic, strict types) and error bodies.

Requests are parsed from the raw body (`parse_request`), so every way a body can be wrong ends in an
OpenAI-style error, `{"error": {"message", "type", "param", "code"}}`:

    invalid UTF-8, malformed JSON                   400 invalid_request_error
    a wrong type, a value out of range, a missing   422 invalid_request_error (param: the field's path)
    field
    (app.py) no or a wrong API key 401, unknown model or route 404, a body over the limit 413,
    prompt + max_tokens over the context 400, too many concurrent streams 429, engine queue full 503

Fields the server does not implement (tools, logit_bias, suffix, best_of > n) are refused with a
400 naming them rather than ignored; fields it has no use for (user, metadata) are ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_N = 16  # choices per request (OpenAI allows 128; each one is a request in the engine)
MAX_STOP = 16  # stop strings per request (OpenAI allows 4)
MAX_STOP_CHARS = 256  # a stop string's length (each generated token checks the text's end against each)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "overloaded_error"}


class APIError(Exception):
    """A request the server refuses (or fails), with the HTTP status and the OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


class _Strict(BaseModel):
    # strict: "5" is not an int and 1 is not a bool (an int still passes for a float)
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchema(_Strict):
    name: str = "response"
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class _Sampling(_Strict):
    """The fields completions and chat completions share. None means the default."""
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # an extra, as vLLM's: 0 or -1 is off
    min_p: float | None = Field(None, ge=0, le=1)  # an extra, as vLLM's
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    logit_bias: dict | None = None  # refused unless empty

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings must be 1 to {MAX_STOP_CHARS} characters long")
        return stops

    def unsupported(self) -> list[str]:
        """Names of set fields this server does not implement."""
        return ["logit_bias"] if self.logit_bias else []


class CompletionRequest(_Sampling):
    """POST /v1/completions. prompt: a string, a list of strings, a list of token ids, or a list of those."""
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for legacy completions
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("a prompt list must not be empty, nor any token-id prompt in it")
        return v

    def unsupported(self) -> list[str]:
        extra = ["suffix"] if self.suffix else []
        extra += ["best_of"] if self.best_of is not None and self.best_of != (self.n or 1) else []
        return super().unsupported() + extra

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request, text or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens; wins over it
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list | None = None
    tool_choice: str | dict | None = None

    def unsupported(self) -> list[str]:
        extra = ["tools"] if self.tools else []
        extra += ["tool_choice"] if self.tool_choice not in (None, "none") else []
        return super().unsupported() + extra

    def template_messages(self) -> list[dict]:
        """The messages as the chat template takes them (a developer message is a system message)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


def parse_body(body: bytes, model: type[BaseModel]) -> BaseModel:
    """`body` as a `model` (a pydantic request model); APIError (400 / 422) naming what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start}): send JSON encoded as UTF-8",
                       code="invalid_utf8") from None
    try:
        return model.model_validate_json(text)
    except ValidationError as e:
        raise _validation_error(e) from None


def parse_request(body: bytes, model: type[_Sampling]) -> _Sampling:
    """The completion request in `body`, validated; APIError (400 / 422) naming what is wrong."""
    request = parse_body(body, model)
    if unsupported := request.unsupported():
        them = "it" if len(unsupported) == 1 else "them"
        raise APIError(400, f"{', '.join(unsupported)}: not supported by this server; leave {them} out",
                       param=unsupported[0], code="unsupported_parameter")
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
    return request


def _validation_error(e: ValidationError) -> APIError:
    first = e.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first['msg']}", code="invalid_json")
    loc = ".".join(str(part) for part in first["loc"])
    # a union's error carries the member tried (`prompt.str`); name the field, list every problem
    field = ".".join(str(p) for p in first["loc"] if isinstance(p, int) or not _is_type_name(p))
    problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()[:4])
    if first["type"] == "model_type" and not first["loc"]:
        problems = "the request body must be a JSON object"
    return APIError(422, problems, param=field or loc or None, code="invalid_value")


def _is_type_name(part) -> bool:
    """A union member's tag in a pydantic error location (`str`, `list[int]`, `function-after[...]`)."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)
