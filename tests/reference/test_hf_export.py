"""An HF export carries its token metadata: `AutoModelForCausalLM` + `AutoTokenizer` on the
directory alone generate what tformer generates, stopping at the same EOS.

Prompts: tformer encodes a prompt's text with no BOS (its training data has none: documents are
separated by EOS only), and the exported tokenizer has no template that adds one, so
`tok(prompt)` in transformers gives the same ids.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import tformer  # noqa: E402
from tformer.convert.hf import save_hf  # noqa: E402
from tformer.inference import SamplingConfig, generate, generate_text, load_tokenizer  # noqa: E402
from tformer.presets import get_preset  # noqa: E402
from tformer.tokenizer import Tokenizer  # noqa: E402

TEXT = "ROMEO: But soft, what light through yonder window breaks?\nJULIET: O Romeo, Romeo! wherefore art thou?\n"
PROMPT = "ROMEO:"
NEW = 16


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_bpe(TEXT * 4, vocab_size=300)  # ids 0..3: <|bos|> <|eos|> <|pad|> <|unk|>


def _model_that_stops(preset: str, tok: Tokenizer):
    """A tiny random model whose greedy continuation of PROMPT ends with EOS after a few tokens:
    EOS's output row becomes 1.05 x the row of the fifth token it emits, so EOS wins where that
    token would have (or a little earlier)."""
    torch.manual_seed(0)
    model = tformer.build_model(get_preset(preset).replace(vocab_size=tok.vocab_size, tie_embeddings=False)).eval()
    [row] = generate(model, [tok.encode(PROMPT)], 5, SamplingConfig(temperature=0))
    with torch.no_grad():
        model.output.weight[tok.eos_id] = 1.05 * model.output.weight[row[-1]]
    return model


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2", "tiny-qwen2"])
@torch.no_grad()
def test_export_generates_the_same_text_with_auto_classes(tmp_path, tok, preset):
    save_hf(_model_that_stops(preset, tok), tmp_path, tokenizer=tok)
    ours, ours_tok = tformer.load(tmp_path), load_tokenizer(tmp_path)
    expected_ids = generate(ours, [ours_tok.encode(PROMPT)], NEW, SamplingConfig(temperature=0),
                            stop_ids={tok.eos_id})[0]
    assert expected_ids[-1] == tok.eos_id and 1 < len(expected_ids) < NEW  # the test exercises the stop
    [expected_text] = generate_text(ours, ours_tok, [PROMPT], NEW, SamplingConfig(temperature=0))

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    inputs = hf_tok(PROMPT, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == tok.encode(PROMPT)  # no BOS on either side
    out = hf.generate(**inputs, max_new_tokens=NEW, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert out.tolist() == expected_ids
    assert hf_tok.decode(out) == expected_text


def test_export_names_the_special_tokens_everywhere(tmp_path, tok):
    model = tformer.build_model(get_preset("tiny-llama").replace(vocab_size=tok.vocab_size))
    save_hf(model, tmp_path, tokenizer=tok)
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)  # not LlamaConfig's defaults 1, 2, None
    for file in ("config.json", "generation_config.json"):
        written = json.loads((tmp_path / file).read_text())
        assert {k: written.get(k) for k in ids} == ids, file
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert (hf_config.bos_token_id, hf_config.eos_token_id, hf_config.pad_token_id) == (0, 1, 2)
    generation = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (0, 1, 2)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["eos_token"] == "<|eos|>"


def test_export_without_tokenizer_claims_no_special_ids(tmp_path):
    """With no tokenizer the ids are unknown: null, not the defaults transformers would fill in."""
    save_hf(tformer.build_model(get_preset("tiny-llama")), tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert {k: written[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")} == dict.fromkeys(
        ("bos_token_id", "eos_token_id", "pad_token_id"))
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert (hf_config.bos_token_id, hf_config.eos_token_id) == (None, None)
    assert not (tmp_path / "tokenizer.json").exists() and not (tmp_path / "generation_config.json").exists()


def test_export_takes_the_tokenizer_of_a_checkpoint_folder(tmp_path, tok):
    """`tokenizer=` may name the folder the model came from, as for `tformer.save`."""
    model = tformer.build_model(get_preset("tiny-llama").replace(vocab_size=tok.vocab_size))
    tformer.save(model, tmp_path / "ckpt", tokenizer=tok)
    save_hf(tformer.load(tmp_path / "ckpt"), tmp_path / "hf", tokenizer=tmp_path / "ckpt")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").eos_token_id == tok.eos_id


def test_export_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path, tok):
    model = tformer.build_model(get_preset("tiny-llama").replace(vocab_size=256))
    with pytest.raises(ValueError, match=r"tokenizer has 300 ids.*vocab_size is 256"):
        save_hf(model, tmp_path / "hf", tokenizer=tok)
    assert not (tmp_path / "hf").exists()
