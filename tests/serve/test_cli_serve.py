"""`tformer serve` loading: the base model and each --adapter as its own model name (a merged copy), the
app over them in-process; refusals of bad options in one line before any model loads."""

import pytest
import torch

import tformer
from tformer.adapters import LoRAConfig, apply_lora, load_merged, lora_parameters, save_adapter
from tformer.cli import build_parser, main
from tests.serve.conftest import MODEL


@pytest.fixture(scope="module")
def adapter(checkpoint, tmp_path_factory):
    model = apply_lora(tformer.load(checkpoint), LoRAConfig(r=4, alpha=8, targets=["all-linear", "output"]))
    torch.manual_seed(123)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0.0, 0.05)  # B nonzero: the adapter changes the model
    path = tmp_path_factory.mktemp("adapter") / "pets"
    save_adapter(model, path, base=checkpoint)
    return path


def test_each_adapter_is_served_as_a_merged_copy_under_its_name(checkpoint, adapter):
    from fastapi.testclient import TestClient

    from tformer.cli.serve import load_models
    from tformer.serve import ServeSettings, build_app

    args = build_parser().parse_args(["serve", str(checkpoint), "--adapter", str(adapter), "--adapter",
                                      f"again={adapter}", "--device", "cpu", "--max-running", "2"])
    models = load_models(args)
    assert [(m.name, m.parent) for m in models] == [(MODEL, None), ("pets", MODEL), ("again", MODEL)]
    merged = load_merged(checkpoint, adapter)[0].state_dict()
    served = models[1].engine.model.state_dict()
    assert all(torch.equal(served[k], v) for k, v in merged.items())
    with TestClient(build_app(models, ServeSettings())) as client:
        listed = client.get("/v1/models").json()["data"]
        assert [(m["id"], m["parent"]) for m in listed] == [(MODEL, None), ("pets", MODEL), ("again", MODEL)]
        texts = [client.post("/v1/completions", json={"model": name, "prompt": "the cat", "max_tokens": 12,
                                                      "temperature": 0}).json()["choices"][0]["text"]
                 for name in (MODEL, "pets", "again")]
    assert texts[1] == texts[2] != texts[0]


@pytest.mark.parametrize("args, message", [
    (["--adapter", "no-such-dir"], "is not a directory"),
    (["--model-name", "x", "--adapter", "x={adapter}"], "the model name 'x' is taken"),
    (["--max-running", "0"], "--max-running must be at least 1"),
    (["--port", "70000"], "--port must be in 0..65535"),
])
def test_bad_options_are_refused_in_one_line(checkpoint, adapter, capsys, args, message):
    code = main(["serve", str(checkpoint), *[a.format(adapter=adapter) for a in args]])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_without_max_tokens_a_request_gets_the_room_the_kv_pool_leaves(checkpoint):
    from fastapi.testclient import TestClient

    from tformer.cli.serve import load_models
    from tformer.serve import ServeSettings, build_app

    # 8 usable blocks of 16 tokens: 128 tokens a request, less than the model's context of 1024
    args = build_parser().parse_args(["serve", str(checkpoint), "--device", "cpu", "--n-blocks", "9",
                                      "--block-size", "16", "--max-running", "2"])
    with TestClient(build_app(load_models(args), ServeSettings())) as client:
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "the cat", "temperature": 0,
                                                 "max_tokens": None}).json()
        assert r["usage"]["total_tokens"] <= 128
        assert r["choices"][0]["finish_reason"] == "stop" or r["usage"]["total_tokens"] == 128
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "the cat", "max_tokens": 200})
        assert r.status_code == 400 and "the KV cache holds 128" in r.json()["error"]["message"]


def test_a_prefix_lm_is_served_without_prefix_caching_and_with_its_prefix_in_one_chunk(checkpoint, tmp_path,
                                                                                       capsys):
    from fastapi.testclient import TestClient

    from tformer.cli.serve import load_models
    from tformer.models import build_model
    from tformer.serve import ServeSettings, build_app
    from tformer.inference.text import load_tokenizer

    base = tformer.load(checkpoint)
    model = build_model(base.config.replace(attention={"pattern": "prefix", "prefix": 24}))
    model.load_state_dict(base.state_dict())
    tformer.save(model, tmp_path / "plm", tokenizer=load_tokenizer(checkpoint))
    args = build_parser().parse_args(["serve", str(tmp_path / "plm"), "--device", "cpu", "--prefill-chunk", "8"])
    models = load_models(args)
    engine = models[0].engine
    assert engine.prefill_chunk == 24 and not engine.pool.prefix_caching
    assert "prefix caching off" in capsys.readouterr().err
    with TestClient(build_app(models, ServeSettings())) as client:
        r = client.post("/v1/completions", json={"model": "plm", "prompt": "the cat", "max_tokens": 6,
                                                 "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
