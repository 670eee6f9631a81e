"""POST /v1/embeddings (serve/embeddings.py): an encoder served in-process answers OpenAI's embeddings
format, equal to `tformer.inference.embed` (batched across concurrent requests, float and base64);
bad requests get OpenAI errors; generation routes refuse the encoder; `tformer serve` loads an encoder
as an embedding model and refuses an encoder-decoder."""

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import tformer
from tformer.cli import UserError, build_parser
from tformer.inference.embed import embed
from tformer.models import build_model
from tformer.presets.bert import bert_like
from tformer.tokenizer import Tokenizer
from tests.test_mlm import bert_tokenizer

pytest.importorskip("fastapi")
WORDS = "the cat sat on a mat and dog ran to park while birds sang in trees".split()
TEXTS = ["the cat sat on the mat", "a dog ran", "birds sang in the trees while the dog sat", "park"]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    torch.manual_seed(0)
    tok = bert_tokenizer(WORDS)
    model = build_model(bert_like(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, ffn_dim=64,
                                  max_seq_len=16))
    path = tmp_path_factory.mktemp("enc") / "minibert"
    tformer.save(model, path, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def client(encoder_dir):
    from fastapi.testclient import TestClient

    from tformer.cli.serve import load_models
    from tformer.serve.app import build_app

    args = build_parser().parse_args(["serve", str(encoder_dir), "--device", "cpu"])
    with TestClient(build_app(load_models(args))) as c:
        yield c


def _expected(encoder_dir, texts):
    return embed(tformer.load(encoder_dir), Tokenizer.load(encoder_dir), texts)


def test_embeddings_equal_the_library_and_batch_across_requests(client, encoder_dir):
    expected = _expected(encoder_dir, TEXTS)
    with ThreadPoolExecutor(8) as pool:  # concurrent requests share forwards
        bodies = list(pool.map(lambda i: client.post("/v1/embeddings", json={"model": "minibert",
                                                                               "input": TEXTS[i % 4]}).json(),
                               range(16)))
    for i, body in enumerate(bodies):
        assert body["object"] == "list" and body["model"] == "minibert" and body["data"][0]["index"] == 0
        torch.testing.assert_close(torch.tensor(body["data"][0]["embedding"]), expected[i % 4], atol=1e-5, rtol=0)
    both = client.post("/v1/embeddings", json={"model": "minibert", "input": TEXTS,
                                               "encoding_format": "base64"}).json()
    vectors = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in both["data"]]
    torch.testing.assert_close(torch.tensor(np.stack(vectors)), expected, atol=1e-5, rtol=0)
    tok = Tokenizer.load(encoder_dir)
    n_tokens = sum(len(r) for r in tok.encode_batch(TEXTS, template=True))
    assert both["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
    ids = tok.encode_batch(TEXTS[:1], template=True)[0]
    by_ids = client.post("/v1/embeddings", json={"model": "minibert", "input": ids}).json()
    torch.testing.assert_close(torch.tensor(by_ids["data"][0]["embedding"]), expected[0], atol=1e-5, rtol=0)
    metrics = client.get("/metrics").text
    assert 'tformer_engine_requests{model="minibert"} 18.0' in metrics
    assert client.get("/v1/models").json()["data"][0]["max_model_len"] == 16


def test_the_openai_client_reads_the_answer(client, encoder_dir):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=client)
    result = api.embeddings.create(model="minibert", input=TEXTS[:2])  # the client asks for base64
    got = torch.tensor([d.embedding for d in result.data])
    torch.testing.assert_close(got, _expected(encoder_dir, TEXTS[:2]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("body, status, message", [
    ({"model": "minibert", "input": []}, 400, "input is empty"),
    ({"model": "minibert", "input": ""}, 400, "empty string"),
    ({"model": "minibert", "input": " ".join(WORDS)}, 400, "more than the model's context of 16"),
    ({"model": "minibert", "input": [1, 10_000]}, 400, "token ids must be"),
    ({"model": "minibert", "input": "cat", "dimensions": 8}, 400, "32 dimensions"),
    ({"model": "minibert", "input": 5}, 422, "input"),
    ({"model": "nope", "input": "cat"}, 404, "does not exist"),
])
def test_bad_requests_get_openai_errors(client, body, status, message):
    r = client.post("/v1/embeddings", json=body)
    assert r.status_code == status and message in r.json()["error"]["message"]


def test_generation_routes_refuse_an_encoder(client):
    r = client.post("/v1/completions", json={"model": "minibert", "prompt": "the cat"})
    assert r.status_code == 400 and "/v1/embeddings" in r.json()["error"]["message"]


def test_serve_refuses_an_encoder_decoder_and_adapters_on_an_encoder(encoder_dir, tmp_path):
    from tformer.cli.serve import load_models
    from tformer.presets import get_preset

    t5 = tmp_path / "t5"
    tformer.save(build_model(get_preset("t5-small").replace(dim=32, n_layers=1, n_heads=2, ffn_dim=64,
                                                            vocab_size=128)),
                 t5, tokenizer=Tokenizer.load(encoder_dir))
    with pytest.raises(UserError, match="encoder-decoder"):
        load_models(build_parser().parse_args(["serve", str(t5), "--device", "cpu"]))
    with pytest.raises(UserError, match="--adapter"):
        load_models(build_parser().parse_args(["serve", str(encoder_dir), "--device", "cpu", "--adapter",
                                               f"x={tmp_path}"]))


def test_a_sentence_transformers_pipeline_sets_pooling_normalisation_and_length(encoder_dir, tmp_path):
    """A folder whose modules.json has CLS pooling, no Normalize and max_seq_length 8 embeds (and serves) so."""
    import shutil

    from fastapi.testclient import TestClient

    from tformer.cli.serve import load_models
    from tformer.inference.embed import EmbedSpec
    from tformer.serve.app import build_app

    folder = tmp_path / "st"
    shutil.copytree(encoder_dir, folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                                  "pooling_mode_mean_tokens": False}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8}))
    spec = EmbedSpec.read(folder)
    assert (spec.pooling, spec.normalize, spec.max_len) == ("cls", False, 8)
    model, tok = tformer.load(folder), Tokenizer.load(folder)
    with torch.no_grad():
        rows = tok.encode_batch(TEXTS[:2], template=True)
        want = [model(torch.tensor([r[:7] + r[-1:] if len(r) > 8 else r]))[0, 0] for r in rows]
    got = embed(model, tok, TEXTS[:2], spec=spec)
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-5)
    args = build_parser().parse_args(["serve", str(folder), "--device", "cpu", "--model-name", "st"])
    with TestClient(build_app(load_models(args))) as c:
        assert c.get("/v1/models").json()["data"][0]["max_model_len"] == 8
        body = c.post("/v1/embeddings", json={"model": "st", "input": "a dog ran"}).json()
        torch.testing.assert_close(torch.tensor(body["data"][0]["embedding"]), embed(model, tok, ["a dog ran"],
                                                                                    spec=spec)[0], atol=1e-5, rtol=0)


def test_pooling_modes_read_real_tokens_only():
    from tformer.inference.embed import pool

    hidden, mask = torch.randn(2, 5, 3), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    first = hidden[0, :3]
    torch.testing.assert_close(pool(hidden, mask, "mean")[0], first.mean(0))
    torch.testing.assert_close(pool(hidden, mask, "max")[0], first.amax(0))
    torch.testing.assert_close(pool(hidden, mask, "mean_sqrt_len")[0], first.sum(0) / 3 ** 0.5)
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[:, 0])
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(hidden, mask, "median")
