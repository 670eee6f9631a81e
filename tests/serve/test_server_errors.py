"""`tformer serve` under bad requests, a missing key and clients that go away: each gets an OpenAI error
body with the right status, the server keeps answering, and no KV block stays held."""

import json

import httpx
import pytest

from tests.serve.conftest import API_KEY, CONTEXT, LIMITS, MODEL, auth

COMPLETION = {"model": MODEL, "prompt": "the cat", "max_tokens": 4}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "the dog"}], "max_tokens": 4}


def post(server, path, body, headers=None, timeout=30):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}{path}", content=data, timeout=timeout,
                      headers={"Content-Type": "application/json", **auth(), **(headers or {})})


BAD = [  # (what, path, body, status, param)
    ("malformed JSON", "/v1/completions", b'{"model": "tiny", "prompt": ', 400, None),
    ("invalid UTF-8", "/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, None),
    ("not an object", "/v1/completions", b"[1, 2]", 422, None),
    ("a string for an int", "/v1/completions", {**COMPLETION, "max_tokens": "4"}, 422, "max_tokens"),
    ("a float for an int", "/v1/completions", {**COMPLETION, "n": 1.5}, 422, "n"),
    ("negative max_tokens", "/v1/completions", {**COMPLETION, "max_tokens": -3}, 422, "max_tokens"),
    ("huge max_tokens", "/v1/completions", {**COMPLETION, "max_tokens": 10**12}, 400, "max_tokens"),
    ("max_tokens past the context", "/v1/chat/completions", {**CHAT, "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("prompt longer than the context", "/v1/completions", {**COMPLETION, "prompt": [7] * (CONTEXT + 1)}, 400,
     "prompt"),
    ("token id outside the vocabulary", "/v1/completions", {**COMPLETION, "prompt": [10**6]}, 400, "prompt"),
    ("temperature out of range", "/v1/chat/completions", {**CHAT, "temperature": 7}, 422, "temperature"),
    ("empty messages", "/v1/chat/completions", {**CHAT, "messages": []}, 422, "messages"),
    ("unknown role", "/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 422,
     "messages.0.role"),
    ("missing prompt", "/v1/completions", {"model": MODEL}, 422, "prompt"),
    ("empty stop string", "/v1/completions", {**COMPLETION, "stop": [""]}, 422, "stop"),
    ("too long a stop string", "/v1/completions", {**COMPLETION, "stop": "x" * 257}, 422, "stop"),
    ("too many stop strings", "/v1/completions", {**COMPLETION, "stop": ["x"] * 17}, 422, "stop"),
    ("unknown model", "/v1/completions", {**COMPLETION, "model": "gpt-4"}, 404, "model"),
    ("oversized body", "/v1/completions", {**COMPLETION, "prompt": "x" * LIMITS["max_body_bytes"]}, 413, None),
    ("unsupported tools", "/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    ("top_logprobs without logprobs", "/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("stream_options without stream", "/v1/completions", {**COMPLETION, "stream_options": {"include_usage": True}},
     400, "stream_options"),
    ("bad json_schema", "/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, 400,
     "response_format"),
    ("n past max_streams", "/v1/completions", {**COMPLETION, "n": LIMITS["max_streams"] + 1}, 429, None),
]


@pytest.mark.parametrize("what, path, body, status, param", BAD, ids=[b[0] for b in BAD])
def test_a_bad_request_gets_an_openai_error_and_the_server_goes_on(server, what, path, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert post(server, "/v1/completions", COMPLETION).status_code == 200


def test_the_openai_client_raises_its_own_error_classes(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=30)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=CONTEXT * 2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_a_full_engine_queue_gives_503_and_frees_what_it_queued(server):
    # n choices are n engine requests: past max_running + max_waiting the engine refuses the rest
    n = LIMITS["max_running"] + LIMITS["max_waiting"] + 1
    assert n <= LIMITS["max_streams"]
    r = post(server, "/v1/completions", {**COMPLETION, "n": n, "max_tokens": 200, "temperature": 0})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "engine_full"
    server.wait_idle()
    assert post(server, "/v1/completions", COMPLETION).status_code == 200


def test_the_api_key_is_required_everywhere_but_health(server):
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions"), ("GET", "/nowhere")]:
        for headers in ({}, auth("wrong"), {"Authorization": API_KEY}):
            r = httpx.request(method, f"{server.url}{path}", headers=headers, json=COMPLETION, timeout=10)
            assert r.status_code == 401, (method, path, headers)
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/nowhere", headers=auth(), timeout=10).status_code == 404


def long_prompt(server) -> dict:
    """A greedy request that runs to max_tokens (checked), so it is still generating when its client leaves."""
    for prompt in ("the cat", "the dog ran", "birds sang", "a mat"):
        body = {**COMPLETION, "prompt": prompt, "max_tokens": CONTEXT - 16, "temperature": 0}
        if post(server, "/v1/completions", body).json()["choices"][0]["finish_reason"] == "length":
            return body
    pytest.skip("every greedy continuation of the test prompts ends early")


def aborted(server) -> float:
    return server.metrics().get(f'tformer_request_finished_total{{model="{MODEL}",reason="abort"}}', 0.0)


def test_a_client_leaving_mid_stream_cancels_its_request_and_frees_its_blocks(server):
    body = {**long_prompt(server), "stream": True}
    server.wait_idle()
    before = aborted(server)
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{server.url}/v1/completions", json=body, headers=auth()) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            data = [line for line, _ in zip((x for x in lines if x.startswith("data: ")), range(3))]
            assert len(data) == 3 and all(json.loads(d[6:])["choices"][0]["finish_reason"] is None for d in data)
            assert server.engine("running") == 1 and server.engine("blocks_used") > 0
    metrics = server.wait_idle()  # the connection is closed: the engine request goes, and its blocks
    assert metrics[f'tformer_request_finished_total{{model="{MODEL}",reason="abort"}}'] == before + 1


def test_a_client_leaving_a_plain_request_cancels_it(server):
    body = long_prompt(server)
    server.wait_idle()
    before = aborted(server)
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", body, timeout=httpx.Timeout(30, read=0.3))
    metrics = server.wait_idle()
    assert metrics[f'tformer_request_finished_total{{model="{MODEL}",reason="abort"}}'] == before + 1
