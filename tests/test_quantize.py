import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tformer
from tformer.cli import main
from tformer.presets import get_preset
from tformer.quantize import (
    Int4Linear, Int8Linear, dequantize_int4, dequantize_int8, is_quantized, pack_int4, quantization_spec,
    quantize_int4, quantize_int8, quantize_model, unpack_int4,
)
from tests.conftest import tiny_config


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_pack_unpack_round_trip():
    q = torch.randint(0, 16, (37, 64), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (37, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    assert packed[0, 0] == q[0, 0] * 16 + q[0, 1]  # even column in the high nibble (tinygemm's order)
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(1, 256)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)


def test_int8_error_is_at_most_half_a_step_per_channel():
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # channels of very different ranges
    w[5] = 0.0
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (64,)
    err = (dequantize_int8(q, scales) - w).abs()
    assert (err <= scales[:, None] / 2 * (1 + 1e-5)).all()
    assert torch.equal(q[5], torch.zeros(96, dtype=torch.int8))
    assert q.abs().amax(dim=1)[6:].eq(127).all()  # the absmax element uses the full range


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_is_at_most_half_a_step_per_group(group_size):
    w = torch.randn(48, 256) + torch.linspace(-2, 2, 48)[:, None]  # groups not centred on 0
    packed, scales, zeros = quantize_int4(w, group_size)
    assert packed.shape == (48, 128) and scales.shape == zeros.shape == (48, 256 // group_size)
    step = scales.repeat_interleave(group_size, dim=1)
    err = (dequantize_int4(packed, scales, zeros, group_size) - w).abs()
    assert (err <= step / 2 * (1 + 1e-4) + 1e-6).all()
    q = unpack_int4(packed).reshape(48, -1, group_size)
    assert q.amin(-1).eq(0).all() and q.amax(-1).eq(15).all()  # each group spans the 16 codes


def test_int4_bf16_scales_stay_close():
    w = torch.randn(32, 128)
    packed, scales, zeros = quantize_int4(w, 64, scales_dtype=torch.bfloat16)
    assert scales.dtype == zeros.dtype == torch.bfloat16
    err = (dequantize_int4(packed, scales, zeros, 64) - w).abs()
    assert (err <= scales.float().repeat_interleave(64, dim=1) * 0.51 + 1e-2).all()


@pytest.mark.parametrize("bias", [False, True])
def test_quantized_linears_match_float_linear(bias):
    linear = nn.Linear(256, 96, bias=bias)
    x = torch.randn(3, 5, 256)
    ref = linear(x)
    q8, q4 = Int8Linear.from_linear(linear), Int4Linear.from_linear(linear, 64)
    # uniform weights: int8 step/range = 1/254, int4 step/range = 1/15 of each channel or group
    assert _relative_error(q8(x), ref) < 0.01
    assert _relative_error(q4(x), ref) < 0.12
    # the fallback forward is exactly F.linear with the dequantized weight
    w4 = dequantize_int4(q4.weight, q4.scales, q4.zeros, 64)
    torch.testing.assert_close(q4(x), F.linear(x, w4, linear.bias), rtol=0, atol=0)
    assert q4.int4pack is None  # CPU: no kernel layout


def test_quantized_linear_follows_dtype_casts():
    q4 = Int4Linear.from_linear(nn.Linear(128, 64), 32).to(torch.bfloat16)
    q8 = Int8Linear.from_linear(nn.Linear(128, 64)).to(torch.bfloat16)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    assert q4.weight.dtype == torch.uint8 and q8.weight.dtype == torch.int8
    assert q4(x).dtype == q8(x).dtype == torch.bfloat16


def _tiny(**overrides):
    return tformer.build_model(tiny_config(dim=64, n_heads=4, ffn_dim=128, **overrides)).eval()


@pytest.mark.parametrize("mode, group_size, tolerance", [("int8", 64, 0.02), ("int4", 32, 0.15)])
def test_quantized_model_logits_close_to_original(mode, group_size, tolerance):
    model = _tiny()
    tokens = torch.randint(0, model.config.vocab_size, (2, 24))
    ref = model(tokens)
    q = quantize_model(copy.deepcopy(model), mode, group_size)
    assert is_quantized(q) and not is_quantized(model)
    kinds = {type(m) for m in q.modules()}
    assert (Int4Linear in kinds) == (mode == "int4")
    assert type(q.output) is Int8Linear  # default: an untied head is int8 in both modes
    assert _relative_error(q(tokens), ref) < tolerance


def test_head_rules():
    tied = quantize_model(tformer.build_model(get_preset("tiny-llama")), "int8", skip=())
    assert type(tied.output) is nn.Linear and tied.output.weight is tied.tok_emb.weight
    untied = quantize_model(_tiny(), "int4", 32, skip=("ffn.w2",))
    assert type(untied.output) is Int8Linear  # int4 mode: an untied head gets int8
    assert all(type(layer.ffn.w2) is nn.Linear for layer in untied.layers)
    assert quantization_spec(untied) == {"mode": "int4", "group_size": 32,
                                         "skip": ["layers.0.ffn.w2", "layers.1.ffn.w2"]}


@pytest.mark.parametrize("mode, config", [("int8", "tiny-llama"), ("int4", "untied"), ("int8", "tiny-gpt2")])
def test_save_load_round_trip_is_bit_identical(tmp_path, mode, config):
    model = _tiny() if config == "untied" else tformer.build_model(get_preset(config)).eval()
    quantize_model(model, mode, 32, skip=() if config == "untied" else ("output",))
    tformer.save(model, tmp_path / "q", extra={"note": "kept"})
    meta = json.loads((tmp_path / "q" / "tformer.json").read_text())
    assert meta["quantization"]["mode"] == mode and meta["note"] == "kept"
    loaded = tformer.load(tmp_path / "q").eval()
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    assert all(torch.equal(a, b) and a.dtype == b.dtype
               for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    tokens = torch.randint(0, model.config.vocab_size, (2, 16))
    assert torch.equal(loaded(tokens), model(tokens))


def test_unquantized_checkpoint_has_no_spec(tmp_path):
    tformer.save(_tiny(), tmp_path / "f")
    assert "quantization" not in json.loads((tmp_path / "f" / "tformer.json").read_text())
    assert not is_quantized(tformer.load(tmp_path / "f"))


def test_clear_errors():
    model = tformer.build_model(get_preset("tiny-llama"))  # ffn_dim 176: no int4 group divides it
    with pytest.raises(ValueError, match="unknown quantization mode 'int3'"):
        quantize_model(model, "int3")
    with pytest.raises(ValueError, match=r"does not divide in_features 176 of layers.0.ffn.w2"):
        quantize_model(model, "int4", 64)
    with pytest.raises(ValueError, match=r"group_size must be one of"):
        quantize_model(_tiny(), "int4", 48)
    with pytest.raises(ValueError, match="matches no Linear layer"):
        quantize_model(model, "int8", skip=("ffn.w9",))
    assert not is_quantized(model)  # a refused request swaps nothing
    quantize_model(model, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "int8")


def test_bad_spec_in_checkpoint_is_reported(tmp_path):
    tformer.save(quantize_model(_tiny(), "int8"), tmp_path / "q")
    meta_file = tmp_path / "q" / "tformer.json"
    meta = json.loads(meta_file.read_text())
    meta["quantization"]["mode"] = "int2"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="invalid quantization spec"):
        tformer.load(tmp_path / "q")


def test_cli_quantize(tmp_path, capsys):
    from tformer.tokenizer import Tokenizer

    model = tformer.build_model(get_preset("tiny-llama")).eval()
    tokenizer = Tokenizer.train_char(["to be or not to be"])
    tformer.save(model, tmp_path / "src", tokenizer=tokenizer)
    assert main(["quantize", str(tmp_path / "src"), "--mode", "int8", "--out", str(tmp_path / "q8")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "q8" / "tokenizer.json").read_text() == (tmp_path / "src" / "tokenizer.json").read_text()
    loaded = tformer.load(tmp_path / "q8")
    assert type(loaded.layers[0].attn.wqkv) is Int8Linear
    tokens = torch.randint(0, 256, (1, 8))
    assert torch.equal(loaded(tokens), quantize_model(model, "int8")(tokens))
    assert main(["quantize", str(tmp_path / "src"), "--mode", "int4", "--out", str(tmp_path / "q4")]) == 2
    assert "does not divide in_features 176" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "q8"), "--mode", "int8", "--out", str(tmp_path / "x")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "src"), "--mode", "int8"]) == 2
    assert "nothing to do" in capsys.readouterr().err


def test_cli_quantize_eval_reports_both_perplexities(tmp_path, capsys, monkeypatch):
    import re

    import tformer.data
    from tformer.data import build_shards, eval_batches
    from tformer.tokenizer import Tokenizer
    from tformer.train.evaluate import lm_loss

    text = "to be, or not to be: that is the question.\n" * 300
    monkeypatch.setattr(tformer.data, "load_corpus", lambda paths: [text])
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path / "cache"))
    tokenizer = Tokenizer.train_char([text])
    model = tformer.build_model(get_preset("tiny-llama")).eval()
    tformer.save(model, tmp_path / "src", tokenizer=tokenizer)
    args = ["quantize", str(tmp_path / "src"), "--mode", "int8", "--eval", "--eval-batches", "2", "--seq-len", "32"]
    assert main(args) == 0
    out = capsys.readouterr().out
    found = re.search(r"\(([\d,]+) tokens\): original ([\d.]+), int8 ([\d.]+) \(([+-][\d.]+)%\)", out)
    assert found, out
    n, before, after, change = found.groups()
    batches = list(eval_batches(build_shards([text], tokenizer).val.tokens, 16, 32, max_batches=2))
    with torch.no_grad():
        losses = [lm_loss(model(x), y).item() for x, y in batches]
    assert int(n.replace(",", "")) == 2 * 16 * 32
    assert float(before) == pytest.approx(torch.tensor(losses).mean().exp().item(), rel=1e-4)
    assert float(after) == pytest.approx(float(before) * (1 + float(change) / 100), rel=1e-3)
    assert abs(float(change)) < 1.0


def test_quantized_model_decodes_like_its_full_forward():
    from tformer.inference import SamplingConfig, generate

    model = quantize_model(_tiny(), "int4", 32)
    prompt = [5, 17, 3]
    out = generate(model, [prompt], 8, SamplingConfig(temperature=0))[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt):]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("in_features, group_size", [(256, 64), (192, 32), (96, 32), (512, 128)])
def test_int4_cuda_kernel_matches_dequantized_linear(in_features, group_size):
    linear = nn.Linear(in_features, 96, bias=True)
    q4 = Int4Linear.from_linear(linear, group_size).to("cuda", torch.bfloat16)  # layout built on the move
    if torch.cuda.get_device_capability() < (8, 0):
        assert q4.int4pack is None
        return
    assert q4.int4pack is not None
    x = torch.randn(3, 7, in_features, device="cuda", dtype=torch.bfloat16)
    w = dequantize_int4(q4.weight, q4.scales, q4.zeros, group_size)  # from the bf16 scales the kernel uses
    ref = F.linear(x.float(), w, q4.bias.float())
    torch.testing.assert_close(q4(x).float(), ref, rtol=2e-2, atol=2e-2)
    assert q4(x.float()).dtype == torch.float32  # other dtypes take the dequantizing path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantized_checkpoint_loads_on_cuda(tmp_path):
    model = quantize_model(_tiny(), "int4", 32)
    tformer.save(model, tmp_path / "q")
    tokens = torch.randint(0, model.config.vocab_size, (2, 16))
    ref = model(tokens)
    gpu = tformer.load(tmp_path / "q", device="cuda", dtype=torch.bfloat16)
    assert (gpu.layers[0].attn.wqkv.int4pack is not None) == (torch.cuda.get_device_capability() >= (8, 0))
    assert _relative_error(gpu(tokens.cuda()).float().cpu(), ref) < 0.03
