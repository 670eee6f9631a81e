"""`tformer.save` / `tformer.load` as the README uses them: what a saved folder needs for
`tformer generate`, and the mode a loaded model comes back in."""

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import tformer
from tformer.inference import SamplingConfig, generate_text
from tformer.presets import get_preset
from tformer.tokenizer import Tokenizer

TEXT = "ROMEO: But soft, what light through yonder window breaks?\nJULIET: O Romeo, Romeo!\n"


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    tok = Tokenizer.train_bpe(TEXT * 4, vocab_size=290)
    model = tformer.build_model(get_preset("tiny-llama").replace(vocab_size=tok.vocab_size))
    return tformer.save(model, tmp_path / "src", tokenizer=tok)


def _tformer_command() -> str:
    """The `tformer` console script of this interpreter's environment."""
    return shutil.which("tformer", path=str(Path(sys.executable).parent)) or shutil.which("tformer")


def test_load_returns_eval_mode(checkpoint, tmp_path):
    from tformer.convert.hf import save_hf

    save_hf(tformer.load(checkpoint), tmp_path / "hf", tokenizer=Tokenizer.load(checkpoint))
    for path in (checkpoint, tmp_path / "hf"):
        model = tformer.load(path)
        assert not any(m.training for m in model.modules()), path


def test_save_keeps_the_checkpoint_tokenizer_and_generate_runs(checkpoint, tmp_path):
    """README: load, save elsewhere with the source's tokenizer, then the real `tformer generate`."""
    model = tformer.load(checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a save with a tokenizer warns about nothing
        tformer.save(model, tmp_path / "copy", tokenizer=checkpoint)
    copy = Tokenizer.load(tmp_path / "copy")
    source = Tokenizer.load(checkpoint)
    assert copy.to_str() == source.to_str()
    assert (copy.bos_id, copy.eos_id, copy.pad_id) == (source.bos_id, source.eos_id, source.pad_id)

    [expected] = generate_text(model, source, ["ROMEO:"], 8, SamplingConfig(temperature=0))
    run = subprocess.run(
        [_tformer_command(), "generate", str(tmp_path / "copy"), "--prompt", "ROMEO:", "--max-new-tokens", "8",
         "--temperature", "0"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"ROMEO:{expected}\n"


def test_save_without_tokenizer_says_generate_needs_one(checkpoint, tmp_path):
    with pytest.warns(UserWarning, match=r"no tokenizer\.json, which `tformer generate` needs: pass "
                                         r"tformer\.save\(\.\.\., tokenizer=\.\.\.\)"):
        tformer.save(tformer.load(checkpoint), tmp_path / "bare")
    assert not (tmp_path / "bare" / "tokenizer.json").exists()


def test_save_refuses_a_tokenizer_the_model_cannot_embed(checkpoint, tmp_path):
    small = tformer.build_model(get_preset("tiny-llama").replace(vocab_size=64))
    with pytest.raises(ValueError, match=r"tokenizer has 290 ids but the model's vocab_size is 64"):
        tformer.save(small, tmp_path / "bad", tokenizer=checkpoint)
    assert not (tmp_path / "bad").exists()

