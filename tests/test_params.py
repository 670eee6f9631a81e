import json

import pytest

from tformer.cli import main
from tformer.config import ModelConfig
from tformer.accounting import COMPONENTS, classify, model_breakdown, parameter_breakdown
from tformer.cli.params import format_breakdown
from tformer.presets import get_preset, list_presets

# Counts published by the model authors (model cards / safetensors metadata).
PUBLISHED = {
    "gpt2": 124_439_808,
    "llama-3-8b": 8_030_261_248,
    "llama-3.2-1b": 1_235_814_400,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "smollm2-135m": 134_515_008,
}


@pytest.mark.parametrize("name, count", sorted(PUBLISHED.items()))
def test_total_matches_published_count(name, count):
    assert parameter_breakdown(get_preset(name))["total"] == count


@pytest.mark.parametrize("name", list_presets())
def test_components_sum_to_total(name):
    b = parameter_breakdown(get_preset(name))
    assert list(b) == [*COMPONENTS, "total"]
    assert sum(b[k] for k in COMPONENTS) == b["total"]
    assert (b["output"] == 0) == get_preset(name).tie_embeddings


def test_gpt2_breakdown_by_hand():
    c = get_preset("gpt2")  # V 50257, C 768, 12 layers, T 1024, biases everywhere, tied
    V, C, L, T = 50257, 768, 12, 1024
    assert parameter_breakdown(c) == {
        "embeddings": V * C + T * C,
        "attention": L * (C * 3 * C + 3 * C + C * C + C), "ssd": 0,
        "ffn": L * (C * 4 * C + 4 * C + 4 * C * C + C),
        "routed_experts": 0, "shared_experts": 0, "router": 0,  # a dense model
        "norms": (2 * L + 1) * 2 * C,
        "output": 0,
        "total": 124_439_808,
    }


def test_untied_output_counts_the_head_once():
    tied = parameter_breakdown(get_preset("tiny-qwen2"))
    untied = parameter_breakdown(get_preset("tiny-qwen2").replace(tie_embeddings=False))
    assert untied["output"] == tied["embeddings"] == 256 * 64
    assert untied["total"] == tied["total"] + 256 * 64


def test_breakdown_of_a_built_model_equals_the_meta_count():
    from tformer.models.build import build_model

    config = get_preset("tiny-llama")
    assert model_breakdown(build_model(config, device="cpu")) == parameter_breakdown(config)


@pytest.mark.parametrize(
    "name, component",
    [("tok_emb.weight", "embeddings"), ("pos_emb.weight", "embeddings"), ("layers.0.attn.wqkv.bias", "attention"),
     ("layers.11.ffn.w3.weight", "ffn"), ("layers.2.attn_norm.weight", "norms"), ("norm.bias", "norms"),
     ("output.weight", "output"), ("layers.3.ffn.experts.w1", "routed_experts"),
     ("layers.3.ffn.router.gate.weight", "router"), ("layers.3.ffn.shared.w2.weight", "shared_experts"),
     ("layers.3.ffn.shared_gate.weight", "shared_experts"), ("layers.0.ffn.w1.weight", "ffn"),
     ("layers.5.attn.kv_norm.weight", "attention")],
)
def test_classify(name, component):
    assert classify(name) == component


def test_unknown_parameter_name_is_an_error_not_a_silent_miscount():
    with pytest.raises(ValueError, match="layers.0.router.weight"):
        classify("layers.0.router.weight")


def test_format_breakdown_aligns_columns_and_shows_shares():
    table = format_breakdown(parameter_breakdown(get_preset("llama-3-8b")), title="llama-3-8b")
    lines = table.splitlines()
    assert lines[0] == "llama-3-8b"
    assert "8,030,261,248" in lines[-1] and "100.0%" in lines[-1] and lines[-1].startswith("total")
    assert len({len(line) for line in lines[1:]}) == 1  # every row (and rule) has the same width
    assert not any(line.startswith(("routed", "shared", "router")) for line in lines)  # dense: no MoE rows
    ffn = next(line for line in lines if line.startswith("dense ffn"))
    assert "5,637,144,576" in ffn and "70.2%" in ffn


def _counts(capsys) -> dict:
    """The component counts of `tformer params --json` (which adds active counts, FLOPs and memory)."""
    out = json.loads(capsys.readouterr().out)
    return {k: out[k] for k in [*COMPONENTS, "total"]}


def test_cli_params_preset(capsys):
    assert main(["params", "gpt2"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "openai-community/gpt2" in out


def test_cli_params_json(capsys):
    assert main(["params", "llama-3-8b", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total"] == 8_030_261_248 and out["active"]["total"] == 8_030_261_248  # dense: all active


def test_cli_params_config_json_file(tmp_path, capsys):
    config = ModelConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2)
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    assert main(["params", str(path), "--json"]) == 0
    assert _counts(capsys) == parameter_breakdown(config)


def test_cli_params_tformer_checkpoint_dir(tmp_path, capsys):
    from tformer.checkpoint import save
    from tformer.models.build import build_model

    config = get_preset("tiny-mistral")
    save(build_model(config), tmp_path / "ckpt")
    assert main(["params", str(tmp_path / "ckpt"), "--json"]) == 0
    assert _counts(capsys) == parameter_breakdown(config)


def test_cli_params_hf_model_dir(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    transformers.Qwen2Config(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=176, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1e6,
        tie_word_embeddings=True,
    ).save_pretrained(tmp_path)
    assert main(["params", str(tmp_path), "--json"]) == 0
    assert _counts(capsys) == parameter_breakdown(get_preset("tiny-qwen2"))


@pytest.mark.parametrize(
    "argv, words",
    [
        (["params", "llama3-8b"], ["unknown preset 'llama3-8b'", "'llama-3-8b'", "--list"]),
        (["params"], ["preset name or a path"]),
    ],
)
def test_cli_params_bad_input_is_one_line_exit_2(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err


def test_cli_params_list(capsys):
    assert main(["params", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in list_presets()) and "meta-llama/Meta-Llama-3-8B" in out
