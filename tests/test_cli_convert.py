"""`tformer convert` refuses to replace an existing destination unless told to; converts to and from
GGUF files keeping weights, tokenizer and chat template; refuses bad GGUF input in one line."""

import pytest
import torch

import tformer
from tests.conftest import tiny_config
from tests.train.test_lifecycle import tformer_cli
from tests.train.test_loop import TEXT
from tformer.tokenizer import Tokenizer


def test_convert_refuses_an_existing_destination(tmp_path):
    tformer.save(tformer.build_model(tiny_config()), tmp_path / "src", tokenizer=Tokenizer.train_char(TEXT))
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    r = tformer_cli("convert", tmp_path / "src", tmp_path / "dst", "--to", "tformer")
    assert r.returncode == 2 and "--overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / "dst" / "keep.txt").read_text() == "mine"
    r = tformer_cli("convert", tmp_path / "src", tmp_path / "dst", "--to", "tformer", "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (tmp_path / "dst" / "keep.txt").exists()
    torch.testing.assert_close(tformer.load(tmp_path / "dst").tok_emb.weight,
                               tformer.load(tmp_path / "src").tok_emb.weight)


# GGUF (issue 25): a tiny llama with a byte-level BPE tokenizer and a chat template, through the command
# in-process (`tformer.cli.main`: an exception escaping it fails the test)

BPE_TEXT = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun.\n"
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _gguf_ready_checkpoint(path):
    """A llama-shaped tiny model (rows in whole Q8_0 blocks) with a BPE tokenizer and TEMPLATE."""
    from tformer.convert.gguf import write_chat_template

    tok = Tokenizer.train_bpe(BPE_TEXT * 8, vocab_size=300)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    model = tformer.build_model(tiny_config(vocab_size=tok.vocab_size, dim=64, n_heads=4, ffn_dim=128))
    tformer.save(model, path, tokenizer=tok, write_extra=lambda folder: write_chat_template(folder, TEMPLATE))
    return path


def _convert(capsys, *args) -> tuple[int, str, str]:
    from tformer.cli import main

    code = main(["convert", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(code: int, err: str) -> str:
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_convert_to_gguf_and_back_keeps_weights_tokenizer_and_template(tmp_path, capsys):
    import gguf

    from tformer.convert.gguf import read_chat_template

    src = _gguf_ready_checkpoint(tmp_path / "src")
    ids = torch.tensor([Tokenizer.load(src).encode(BPE_TEXT)])
    with torch.no_grad():
        expected = tformer.load(src)(ids)
    for gguf_type, tol in (("f16", 2e-3), ("q8_0", 2e-2)):
        file = tmp_path / f"m-{gguf_type}.gguf"
        code, out, _ = _convert(capsys, src, file, "--to", "gguf", "--gguf-type", gguf_type)
        assert code == 0 and f"(gguf, {gguf_type}," in out
        types = {t.tensor_type.name for t in gguf.GGUFReader(file).tensors}
        assert types == {"F32", gguf_type.upper()}  # norms stay F32
        assert _convert(capsys, file, tmp_path / gguf_type, "--to", "tformer")[0] == 0
        with torch.no_grad():
            torch.testing.assert_close(tformer.load(tmp_path / gguf_type)(ids), expected, atol=tol, rtol=0)
        assert read_chat_template(tmp_path / gguf_type) == TEMPLATE
        assert Tokenizer.load(tmp_path / gguf_type).encode(BPE_TEXT) == ids[0].tolist()

    code, _, _ = _convert(capsys, tmp_path / "m-f16.gguf", tmp_path / "bf16", "--to", "tformer", "--dtype", "bfloat16")
    assert code == 0
    assert tformer.load(tmp_path / "bf16").tok_emb.weight.dtype == torch.bfloat16
    # GGUF -> HF -> tformer: the chat template goes along the HF path too
    assert _convert(capsys, tmp_path / "m-f16.gguf", tmp_path / "hf", "--to", "hf")[0] == 0
    assert _convert(capsys, tmp_path / "hf", tmp_path / "from-hf", "--to", "tformer")[0] == 0
    assert read_chat_template(tmp_path / "hf") == read_chat_template(tmp_path / "from-hf") == TEMPLATE


def test_convert_refuses_bad_gguf_input_in_one_line(tmp_path, capsys):
    import gguf
    import numpy as np

    src = _gguf_ready_checkpoint(tmp_path / "src")
    assert _convert(capsys, src, tmp_path / "m.gguf", "--to", "gguf")[0] == 0
    (tmp_path / "text.gguf").write_text("not a model\n")
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "m.gguf").read_bytes()[:5000])
    q4_k = gguf.GGMLQuantizationType.Q4_K
    writer = gguf.GGUFWriter(tmp_path / "q4k.gguf", "llama")
    for key, value in (("embedding_length", 256), ("block_count", 1), ("feed_forward_length", 256),
                       ("attention.head_count", 4)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_tensor("token_embd.weight", np.zeros((8, gguf.GGML_QUANT_SIZES[q4_k][1]), np.uint8), raw_dtype=q4_k)
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    with pytest.warns(UserWarning, match="no tokenizer.json"):
        tformer.save(tformer.build_model(tiny_config()), tmp_path / "no-tok")  # weights only
    (tmp_path / "dir").mkdir()
    cases = [
        (("text.gguf", "out", "--to", "tformer"), "not a GGUF file"),
        (("cut.gguf", "out", "--to", "tformer"), "not a readable GGUF file"),
        (("q4k.gguf", "out", "--to", "tformer"), "'token_embd.weight' is Q4_K"),
        (("missing.gguf", "out", "--to", "tformer"), "missing.gguf does not exist"),
        (("src", "m.gguf", "--to", "gguf"), "--overwrite"),
        (("src", "dir", "--to", "gguf"), "is a directory, but --to gguf writes one file"),
        (("src", "x.gguf", "--to", "gguf", "--dtype", "float16"), "--dtype does not apply to --to gguf"),
        (("m.gguf", "out", "--to", "tformer", "--gguf-type", "q8_0"), "--gguf-type applies to --to gguf only"),
        (("no-tok", "x.gguf", "--to", "gguf"), "has no tokenizer.json"),
    ]
    for args, message in cases:
        err = _one_line_error(*_convert(capsys, *[tmp_path / a if i < 2 else a for i, a in enumerate(args)])[::2])
        assert message in err, (args, err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.gguf").exists()
    assert _convert(capsys, src, tmp_path / "m.gguf", "--to", "gguf", "--overwrite", "--gguf-type", "q8_0")[0] == 0
