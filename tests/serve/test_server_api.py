"""`tformer serve` through the official `openai` client: completions and chat, streamed and not, n > 1,
logprobs, stop strings, usage, response_format json; greedy text equals the model's greedy
continuation through tformer.inference."""

import json

import pytest

from tests.serve.conftest import API_KEY, MODEL, greedy_reference

openai = pytest.importorskip("openai")

GREEDY = dict(temperature=0)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tok(checkpoint):
    from tformer.tokenizer import Tokenizer

    return Tokenizer.load(checkpoint)


def chat_ids(checkpoint, tok, messages):
    from tformer.chat import ChatTemplate

    return tok.encode(ChatTemplate.for_checkpoint(checkpoint, tok).render(messages, add_generation_prompt=True))


def streamed(chunks, n=1):
    """(text of each choice, finish reason of each choice, usage) of a completions or chat stream."""
    texts, finish, usage = [""] * n, [None] * n, None
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            piece = c.delta.content if hasattr(c, "delta") else c.text
            texts[c.index] += piece or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    return texts, finish, usage


def test_models_lists_the_served_model(client):
    [model] = client.models.list().data
    assert model.id == MODEL


def test_greedy_completion_is_the_models_greedy_continuation(client, checkpoint, tok):
    ids = tok.encode("the cat sat")
    want = greedy_reference(checkpoint, ids, 24)
    eos = want[-1] == tok.eos_id
    r = client.completions.create(model=MODEL, prompt="the cat sat", max_tokens=24, **GREEDY)
    assert r.choices[0].text == tok.decode(want[:-1] if eos else want)
    assert r.choices[0].finish_reason == ("stop" if eos else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want))
    assert r.usage.total_tokens == len(ids) + len(want)


def test_a_streamed_completion_adds_up_to_the_whole_one(client):
    kw = dict(model=MODEL, prompt=[[5, 6, 7, 8]], max_tokens=30, **GREEDY)
    whole = client.completions.create(**kw)
    [text], [finish], usage = streamed(client.completions.create(**kw, stream=True,
                                                                  stream_options={"include_usage": True}))
    assert text == whole.choices[0].text and finish == whole.choices[0].finish_reason
    assert usage.model_dump() == whole.usage.model_dump()


def test_chat_streamed_and_not_agree_and_count_the_templated_prompt(client, checkpoint, tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the dog"}]
    kw = dict(model=MODEL, messages=messages, max_completion_tokens=20, **GREEDY)
    whole = client.chat.completions.create(**kw)
    ids = chat_ids(checkpoint, tok, messages)
    assert whole.usage.prompt_tokens == len(ids)
    assert whole.choices[0].message.role == "assistant"
    want = greedy_reference(checkpoint, ids, 20)
    stops = {tok.eos_id, tok.token_to_id("<|im_end|>")}
    shown = next((i for i, t in enumerate(want) if t in stops), len(want))
    assert whole.choices[0].message.content == tok.decode(want[:shown])
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    [text], [finish], usage = streamed(chunks)
    assert text == whole.choices[0].message.content and finish == whole.choices[0].finish_reason
    assert usage is None  # not asked for


def test_n_seeded_choices_are_each_the_request_with_seed_plus_index(client, tok):
    kw = dict(model=MODEL, prompt="the park", max_tokens=12, temperature=1.0, top_p=0.95)
    three = client.completions.create(**kw, n=3, seed=7)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert len({c.text for c in three.choices}) > 1
    for i in range(3):
        alone = client.completions.create(**kw, seed=7 + i)
        assert alone.choices[0].text == three.choices[i].text
    texts, finish, usage = streamed(client.completions.create(**kw, n=3, seed=7, stream=True,
                                                              stream_options={"include_usage": True}), n=3)
    assert texts == [c.text for c in three.choices] and None not in finish
    assert usage.completion_tokens == three.usage.completion_tokens
    assert three.usage.prompt_tokens == len(tok.encode("the park"))  # the prompt counts once


def test_chat_logprobs_give_the_top_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "the mat"}],
                                       max_tokens=24, logprobs=True, top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    assert 0 < len(content) <= r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy takes the most likely
        assert entry.logprob <= 0
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    # each token's own bytes, a character split over tokens included, join into the reply
    assert b"".join(bytes(e.bytes) for e in content).decode(errors="replace") == r.choices[0].message.content


def test_completion_logprobs_in_the_legacy_format(client, tok):
    r = client.completions.create(model=MODEL, prompt="the bird", max_tokens=8, logprobs=2, **GREEDY)
    lp = r.choices[0].logprobs
    n = len(lp.tokens)
    assert n == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 2 and chosen == pytest.approx(max(top.values()))


def test_stop_strings_cut_before_the_stop_with_finish_stop(client):
    kw = dict(model=MODEL, prompt="the cat", max_tokens=40, **GREEDY)
    full = client.completions.create(**kw).choices[0].text
    start = next(i for i in range(8, len(full) - 3) if "\ufffd" not in full[i:i + 3])
    stop = full[start:start + 3]
    cut = full.index(stop)
    for stream in (False, True):
        r = client.completions.create(**kw, stop=[stop, "never-there"], stream=stream)
        [text], [finish], _ = streamed(r) if stream else ([r.choices[0].text], [r.choices[0].finish_reason], None)
        assert (text, finish) == (full[:cut], "stop")
    r = client.completions.create(**kw, stop="never-there")
    assert r.choices[0].text == full and r.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("fmt", [
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "pet", "schema": {
        "type": "object", "properties": {"name": {"type": "string"}, "legs": {"type": "integer"}},
        "required": ["name", "legs"]}}},
])
def test_response_format_json_parses(client, fmt):
    ended = 0
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a pet as JSON"}],
                                           max_tokens=120, temperature=0.7, seed=seed, response_format=fmt)
        if r.choices[0].finish_reason == "stop":
            value = json.loads(r.choices[0].message.content)
            assert isinstance(value, dict)
            if fmt["type"] == "json_schema":
                assert set(value) == {"name", "legs"} and isinstance(value["legs"], int)
            ended += 1
    assert ended >= 1


def test_echo_and_the_extra_sampling_fields_reach_the_engine(client):
    kw = dict(model=MODEL, prompt="the dog ran", max_tokens=16)
    greedy = client.completions.create(**kw, **GREEDY).choices[0].text
    echoed = client.completions.create(**kw, **GREEDY, echo=True).choices[0].text
    assert echoed == "the dog ran" + greedy
    top1 = client.completions.create(**kw, temperature=1.0, seed=5, extra_body={"top_k": 1}).choices[0].text
    assert top1 == greedy  # top_k 1 leaves only the most likely token
    penalized = client.completions.create(**kw, **GREEDY, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalized.choices[0].text != greedy


def test_metrics_count_tokens_latencies_and_prefix_hits(client, server, tok):
    prompt = "the cat sat on a mat and the dog ran to the park while birds sang in trees " * 3  # > 1 block
    before = server.metrics()
    for _ in range(2):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, **GREEDY)
    after = server.metrics()

    def grew(name):
        key = f'{name}{{model="{MODEL}"}}'
        return after[key] - before.get(key, 0.0)

    assert grew("tformer_prompt_tokens_total") == 2 * len(tok.encode(prompt))
    generated = grew("tformer_generation_tokens_total")
    assert generated >= 2
    for histogram in ("time_to_first_token", "e2e_request_latency"):
        assert grew(f"tformer_{histogram}_seconds_count") == 2
    assert grew("tformer_inter_token_latency_seconds_count") == generated - 2  # a gap between each two tokens
    assert grew("tformer_engine_prefix_hit_tokens") >= 16  # the second request reused the first one's blocks
    assert after['tformer_http_requests_total{route="/v1/completions",status="200"}'] >= 2
