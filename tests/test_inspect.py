"""tformer inspect: the accounting equals tformer params'; the layer diagram is SVG naming the config's parts."""

import json
import xml.etree.ElementTree as ET

import pytest

from tests.conftest import tiny_config
from tformer.cli import main
from tformer.presets import get_preset
from tformer.viz.diagram import layer_diagram

SVG = "{http://www.w3.org/2000/svg}"


def run(capsys, *argv) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("preset", ["gpt2", "mixtral-8x7b", "deepseek-v2-lite"])
def test_inspect_numbers_equal_tformer_params(preset, capsys):
    inspected = json.loads(run(capsys, "inspect", preset, "--json", "--seq-len", "2048"))
    assert inspected["accounting"] == json.loads(run(capsys, "params", preset, "--json", "--seq-len", "2048"))
    text = run(capsys, "inspect", preset, "--seq-len", "2048")
    table = run(capsys, "params", preset, "--seq-len", "2048").split("\n", 1)[1]  # less the title line
    assert table in text  # the same component, FLOPs, KV cache and memory rows
    assert inspected["tree"][0].startswith("Decoder  ") and inspected["tree"] == text.split("\n\n")[1].splitlines()


def test_inspect_tree_folds_identical_layers(capsys):
    tree = json.loads(run(capsys, "inspect", "deepseek-v2-lite", "--json"))["tree"]
    assert "    layers.0  Block" in tree and "    layers.1-26  Block  x26" in tree  # dense layer 0, then MoE
    assert "        experts  GroupedExperts  w1 (64, 1408, 2048)  w3 (64, 1408, 2048)  w2 (64, 2048, 1408)" in tree
    gpt2 = json.loads(run(capsys, "inspect", "gpt2", "--json"))["tree"]
    assert gpt2[0] == "Decoder  124,439,808 params"
    assert "        wqkv  Linear  weight (2304, 768)  bias (2304,)" in gpt2


def texts(svg: str) -> list[str]:
    return [t.text for t in ET.fromstring(svg).iter(f"{SVG}text")]


def box_order(svg: str) -> list[str]:
    return [g.get("class") for g in ET.fromstring(svg).iter(f"{SVG}g")]


def test_svg_parses_and_names_the_parts(tmp_path, capsys):
    path = tmp_path / "layer.svg"
    assert f"layer diagram: {path}" in run(capsys, "inspect", "mixtral-8x7b", "--svg", str(path))
    svg = path.read_text()
    words = " ".join(texts(svg))
    assert "GQA: grouped-query attention" in words and "32 query / 8 kv heads x 128" in words
    assert "RoPE θ=1e+06" in words and "window" not in words
    assert "MoE: top-2 of 8 experts" in words and "RMSNorm" in words
    assert box_order(svg) == ["io", "norm", "attn", "add", "norm", "moe", "add", "io"]
    assert len(list(ET.fromstring(svg).iter(f"{SVG}path"))) == 3  # the arrow head and two residual lines


@pytest.mark.parametrize("overrides, expect, order", [
    (dict(n_kv_heads=6), ["MHA: multi-head attention", "6 heads x 8", "FFN (SwiGLU)", "48 -> 96 -> 48"],
     ["io", "norm", "attn", "add", "norm", "ffn", "add", "io"]),
    (dict(n_kv_heads=1, positions="alibi", norm="layernorm", norm_placement="post", activation="gelu"),
     ["MQA: multi-query attention", "ALiBi", "LayerNorm", "FFN (gelu)"],
     ["io", "attn", "add", "norm", "ffn", "add", "norm", "io"]),
    (dict(positions="learned", sliding_window=16), ["GQA", "window 16", "learned positions added"], None),
])
def test_svg_follows_the_config(overrides, expect, order):
    svg = layer_diagram(tiny_config(**overrides))
    words = " ".join(texts(svg))
    for part in expect:
        assert part in words, (part, words)
    if order:
        assert box_order(svg) == order


def test_svg_of_latent_attention():
    words = " ".join(texts(layer_diagram(get_preset("deepseek-v2-lite"))))
    assert "MLA: multi-head latent attention" in words and "kv latent 512 + rope key 64" in words
    assert "+ 2 shared" in words and "layer 0 dense" in words


def test_inspect_reads_a_checkpoint(tmp_path, capsys):
    from tformer.checkpoint import save
    from tformer.models.build import build_model

    config = tiny_config(n_kv_heads=1, moe=None)
    with pytest.warns(UserWarning, match="no tokenizer.json"):  # inspect needs none
        save(build_model(config), tmp_path / "ckpt")
    out = run(capsys, "inspect", str(tmp_path / "ckpt"), "--svg", str(tmp_path / "l.svg"))
    assert out.startswith(f"{tmp_path / 'ckpt'} (tformer checkpoint): 2 layers, MQA attention")
    assert "MQA: multi-query attention" in texts((tmp_path / "l.svg").read_text())
