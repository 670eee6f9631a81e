"""Parity with HF transformers, one `test_against_hf_<family>` per family.

Each test builds a tiny HF model at random init (no downloads), perturbs every parameter so
biases and norm weights are not their trivial init (a swapped or dropped one must show), saves it
with `save_pretrained`, loads it with the production converter and compares logits in fp32 on
CPU: a plain batch, a left-padded batch (real positions only), each padded row against the same
row run alone, and finally our `save_hf` export reloaded by `AutoModelForCausalLM`.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import tformer  # noqa: E402
from tformer.config import ConfigError, ModelConfig  # noqa: E402
from tformer.convert.hf import config_from_hf, config_to_hf, load_hf, save_hf  # noqa: E402
from tformer.io import CheckpointError  # noqa: E402
from tformer.nn.rope import rope_inv_freq  # noqa: E402
from tformer.presets import gpt2, llama, mistral, qwen, smollm  # noqa: E402

ATOL = 1e-4
LLAMA = dict(vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=64, rms_norm_eps=1e-5)  # fmt: skip
ROPE_SCALINGS = {
    "llama3": dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16),  # fmt: skip
    # a long original context puts YaRN's ramp inside the 8 frequency pairs of head_dim 16
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=1024, beta_fast=8.0),
    "linear": dict(rope_type="linear", factor=2.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0),
}


def hf_model(config, attn="sdpa"):
    """A random-init HF causal LM whose every parameter is perturbed away from its trivial init."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def left_padded(vocab: int, T: int, pads=(0, 3, 7)):
    tokens = torch.randint(0, vocab, (len(pads), T))
    mask = torch.ones(len(pads), T, dtype=torch.long)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
    return tokens, mask


@torch.no_grad()
def check_parity(hf, ours, vocab: int, T: int = 24, rows_alone: bool = True) -> None:
    torch.manual_seed(1)
    tokens = torch.randint(0, vocab, (2, T))
    torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=ATOL, rtol=0)

    tokens, mask = left_padded(vocab, T)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = hf(tokens, attention_mask=mask, position_ids=position_ids).logits
    got = ours(tokens, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)
    if rows_alone:  # dynamic NTK depends on the longest row in the batch, in HF as in tformer
        for row in range(tokens.shape[0]):
            alone = ours(tokens[row, real[row]][None])[0]
            torch.testing.assert_close(got[row, real[row]], alone, atol=ATOL, rtol=0)


@torch.no_grad()
def check_export(ours, path, vocab: int, T: int = 24) -> None:
    """save_hf -> AutoModelForCausalLM.from_pretrained: every key used, same logits."""
    save_hf(ours, path)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tokens = torch.randint(0, vocab, (2, T))
    torch.testing.assert_close(hf.eval()(tokens).logits, ours(tokens), atol=ATOL, rtol=0)
    assert config_from_hf(json.loads((path / "config.json").read_text())) == ours.config


def test_against_hf_gpt2(tmp_path):
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64)
    hf = hf_model(config)
    hf.save_pretrained(tmp_path / "hf")
    ours = tformer.load(tmp_path / "hf").eval()
    assert ours.config.tie_embeddings and ours.output.weight is ours.tok_emb.weight
    check_parity(hf, ours, 128)
    check_export(ours, tmp_path / "export", 128)


def test_gpt2_without_prefix_and_with_mask_buffers(tmp_path):
    """The original GPT-2 files name weights `h.0...` (no `transformer.`) and store mask buffers."""
    hf = hf_model(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32))
    hf.save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(file).items()}
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
    tensors["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, file, metadata={"format": "pt"})
    tokens = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path).eval()(tokens), hf(tokens).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("scaling", list(ROPE_SCALINGS))
def test_against_hf_llama(tmp_path, scaling):
    extra = {}
    if scaling == "linear":  # also cover every optional bias and tied embeddings
        extra = dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)
    if scaling == "dynamic":  # sequences (24) longer than the original context, so the base grows
        extra = dict(max_position_embeddings=16)
    if scaling == "yarn":  # HF warns unless this is factor x the original context
        extra = dict(max_position_embeddings=4096)
    config = transformers.LlamaConfig(**{**LLAMA, **extra}, rope_scaling=ROPE_SCALINGS[scaling], rope_theta=500.0)
    hf = hf_model(config)
    hf.save_pretrained(tmp_path / "hf")
    ours = tformer.load(tmp_path / "hf").eval()
    assert ours.config.rope.scaling == scaling
    check_parity(hf, ours, LLAMA["vocab_size"], rows_alone=scaling != "dynamic")
    check_export(ours, tmp_path / "export", LLAMA["vocab_size"])


def test_against_hf_mistral(tmp_path):
    """Window 8 over 24 tokens. HF applies the window through its mask builder in both the eager
    and the sdpa paths (transformers 5.x); eager is used here, the path with no kernel choice."""
    config = transformers.MistralConfig(**LLAMA, sliding_window=8)
    hf = hf_model(config, attn="eager")
    hf.save_pretrained(tmp_path / "hf")
    ours = tformer.load(tmp_path / "hf").eval()
    assert ours.config.sliding_window == 8
    check_parity(hf, ours, LLAMA["vocab_size"])
    check_export(ours, tmp_path / "export", LLAMA["vocab_size"])
    # the window must matter: the same weights attending to everything give other logits
    unwindowed = tformer.Decoder(ours.config.replace(sliding_window=None))
    unwindowed.load_state_dict(ours.state_dict())
    tokens = torch.randint(0, LLAMA["vocab_size"], (1, 24))
    with torch.no_grad():
        assert (unwindowed.eval()(tokens) - ours(tokens)).abs().max() > 100 * ATOL


@pytest.mark.parametrize("window", [None, 8])
def test_against_hf_qwen2(tmp_path, window):
    sliding = dict(use_sliding_window=True, sliding_window=window, max_window_layers=0) if window else {}
    config = transformers.Qwen2Config(**LLAMA, tie_word_embeddings=True, **sliding)
    hf = hf_model(config)
    hf.save_pretrained(tmp_path / "hf")
    ours = tformer.load(tmp_path / "hf").eval()
    assert ours.config.qkv_bias and not ours.config.out_bias and ours.config.sliding_window == window
    check_parity(hf, ours, LLAMA["vocab_size"])
    check_export(ours, tmp_path / "export", LLAMA["vocab_size"])


@pytest.mark.parametrize(
    "params",
    [
        ROPE_SCALINGS["llama3"],
        dict(rope_type="llama3", factor=8.0, low_freq_factor=2.0, high_freq_factor=8.0,
             original_max_position_embeddings=64),  # fmt: skip
        ROPE_SCALINGS["yarn"],
        dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=512, mscale=0.7, mscale_all_dim=1.0),
        dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=512, attention_factor=1.5, beta_slow=2.0),
        ROPE_SCALINGS["linear"],
    ],
)
def test_rope_frequencies_match_hf(params):
    """Our inverse frequencies and cos/sin scale against HF's for the config we convert to."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = transformers.LlamaConfig(**LLAMA, rope_parameters={**params, "rope_theta": 500.0})
    expected, expected_scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf, "cpu")
    ours = config_from_hf(hf.to_dict())
    inv_freq, scale = rope_inv_freq(ours.rope, ours.head_dim)
    torch.testing.assert_close(inv_freq, expected, atol=0, rtol=1e-6)
    assert scale == pytest.approx(expected_scale, rel=1e-6)


def test_sharded_checkpoints_both_ways(tmp_path):
    hf = hf_model(transformers.LlamaConfig(**LLAMA))
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ours = tformer.load(tmp_path / "hf").eval()
    check_parity(hf, ours, LLAMA["vocab_size"], rows_alone=False)

    out = tmp_path / "export"
    save_hf(ours, out, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    tokens = torch.randint(0, LLAMA["vocab_size"], (2, 12))
    with torch.no_grad():
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(reloaded(tokens).logits, ours(tokens), atol=ATOL, rtol=0)
        torch.testing.assert_close(tformer.load(out)(tokens), ours(tokens), atol=0, rtol=0)


def test_save_hf_writes_tokenizer_and_replaces_atomically(tmp_path):
    from tformer.tokenizer import Tokenizer

    ours = tformer.build_model(config_from_hf(LLAMA | {"model_type": "llama"}))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old export")
    save_hf(ours, tmp_path / "out", tokenizer=Tokenizer.train_char("abc"))
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                       "tokenizer.json", "tokenizer_config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left behind


def test_dtype_is_kept_or_cast(tmp_path):
    hf = hf_model(transformers.Qwen2Config(**LLAMA)).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    assert load_hf(tmp_path / "hf").tok_emb.weight.dtype == torch.bfloat16
    ours = load_hf(tmp_path / "hf", dtype=torch.float32)
    assert ours.output.weight.dtype == torch.float32
    save_hf(ours.to(torch.bfloat16), tmp_path / "export")
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["dtype"] == exported["torch_dtype"] == "bfloat16"
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").dtype == torch.bfloat16


@pytest.mark.parametrize("family", [gpt2, llama, mistral, qwen, smollm], ids=lambda m: m.__name__.split(".")[-1])
def test_presets_round_trip_through_hf_configs(family):
    """Every preset that mirrors an HF config.json converts to that architecture and back unchanged."""
    for preset in family.PRESETS:
        hf = config_to_hf(preset.config)
        assert config_from_hf(hf) == preset.config, preset.name


def _llama_dir(tmp_path):
    hf = hf_model(transformers.LlamaConfig(**LLAMA))
    hf.save_pretrained(tmp_path)
    return tmp_path / "model.safetensors"


def test_corrupt_safetensors_is_named(tmp_path):
    file = _llama_dir(tmp_path)
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupt"):
        tformer.load(tmp_path)


def test_wrong_shape_names_the_key(tmp_path):
    file = _llama_dir(tmp_path)
    tensors = load_file(file)
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(8, 64)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.k_proj\.weight'.*\(8, 64\).*\(32, 64\)"):
        tformer.load(tmp_path)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    file = _llama_dir(tmp_path)
    tensors = load_file(file)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensors \['model\.layers\.0\.mlp\.up_proj\.weight'\].*extra"):
        tformer.load(tmp_path)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "xlnet", "vocab_size": 10}))
    supported = (r"\['gpt2', 'llama', 'mistral', 'qwen2', 'mixtral', 'qwen2_moe', 'deepseek_v3', 'bert', 'modernbert', "
                 r"'t5', 'marian'\]")
    with pytest.raises(CheckpointError, match=rf"model_type='xlnet'.*{supported}"):
        tformer.load(tmp_path)


def test_config_from_transformers_4x_and_5x_spellings():
    """Llama 3.1 as transformers 4.x wrote it (rope_theta + rope_scaling) and as 5.x does."""
    v4 = LLAMA | {"model_type": "llama", "rope_theta": 500000.0, "torch_dtype": "bfloat16",
                  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}  # fmt: skip
    v5 = LLAMA | {"model_type": "llama", "dtype": "bfloat16",
                  "rope_parameters": {**v4["rope_scaling"], "rope_theta": 500000.0}}  # fmt: skip
    assert config_from_hf(v4) == config_from_hf(v5)
    assert config_from_hf(v4).rope.theta == 500000.0 and config_from_hf(v4).rope.original_max_seq_len == 8192
    old = config_from_hf(LLAMA | {"model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert (old.rope.scaling, old.rope.factor) == ("linear", 2.0)
    qwen = {k: v for k, v in LLAMA.items()} | {"model_type": "qwen2", "use_sliding_window": False,
                                               "sliding_window": 4096, "max_window_layers": 21}  # fmt: skip
    assert config_from_hf(qwen).sliding_window is None


@pytest.mark.parametrize(
    "hf, match",
    [
        (LLAMA | {"model_type": "llama", "rope_scaling": {"rope_type": "longrope", "factor": 2.0}},
         r"rope type'?='longrope'.*supported values.*llama3"),  # fmt: skip
        (LLAMA | {"model_type": "llama", "hidden_act": "gelu"}, r"hidden_act='gelu'.*supported values"),
        (LLAMA | {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
         "some layers only"),  # fmt: skip
        ({"model_type": "xlnet"}, r"model_type='xlnet' is not supported"),
        ({"model_type": "t5"}, r"t5: config.json lacks 'vocab_size'"),
    ],
)
def test_unsupported_hf_configs(hf, match):
    with pytest.raises(ConfigError, match=match):
        config_from_hf(hf)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(norm_placement="post"), "norm_placement='post'"),
        (dict(positions="alibi"), "positions='alibi'"),
        (dict(positions="learned", norm="layernorm", activation="gelu", qkv_bias=True, out_bias=True), "learned positions mean gpt2.*a linear layer without bias"),
        (dict(out_bias=True), "out_bias=True with qkv_bias=False"),
    ],
)
def test_config_to_hf_names_the_blocking_field(fields, match):
    base = dict(vocab_size=64, dim=32, n_layers=1, n_heads=4, activation="swiglu", norm="rmsnorm", positions="rope")
    cfg = ModelConfig(**(base | fields))
    with pytest.raises(ConfigError, match=match):
        config_to_hf(cfg)
