"""A run's life: continuing a checkpoint keeps its tokenizer. CLI behaviour is checked on the real
command in a child process (`tformer_cli`)."""

import subprocess
import sys

import tformer
from tests.train.test_loop import TEXT
from tformer.tokenizer import Tokenizer

OTHER_TEXT = """HAMLET:
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die: to sleep.
"""

# the console script's code path (`tformer = tformer.cli:main`), whatever the environment's PATH holds
TFORMER = [sys.executable, "-c", "import sys; from tformer.cli import main; sys.exit(main())"]


def tformer_cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*TFORMER, *map(str, args)], capture_output=True, text=True, timeout=300, **kwargs)


# 1. a checkpoint's tokenizer

def _bpe_checkpoint(path, text: str) -> Tokenizer:
    """A tiny model saved with a 300-token BPE tokenizer trained on `text` (vocab padded to 320)."""
    from tformer.presets import get_preset

    tok = Tokenizer.train_bpe([text], vocab_size=300)
    config = get_preset("tiny-llama").replace(vocab_size=320)
    tformer.save(tformer.build_model(config), path, tokenizer=tok)
    return tok


def test_continuing_a_checkpoint_keeps_its_tokenizer(tmp_path):
    (tmp_path / "new.txt").write_text(OTHER_TEXT * 30)
    tok = _bpe_checkpoint(tmp_path / "ckpt", TEXT * 30)
    common = ["--preset", tmp_path / "ckpt", "--data", tmp_path / "new.txt", "--vocab_size", "300",
              "--cache_dir", tmp_path / "cache", "--batch_size", "2", "--seq_len", "16", "--max_steps", "2",
              "--eval_every", "2", "--no-tensorboard", "--sample_tokens", "0"]
    r = tformer_cli("train", *common, "--out_dir", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    assert Tokenizer.load(tmp_path / "run" / "best").hf.get_vocab() == tok.hf.get_vocab()

    other = Tokenizer.train_char(OTHER_TEXT)
    other.save(tmp_path / "other.json")
    r = tformer_cli("train", *common, "--out_dir", tmp_path / "run2", "--tokenizer", tmp_path / "other.json")
    assert r.returncode == 2
    assert "different vocabulary" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    tok.save(tmp_path / "same.json")  # the same vocabulary given explicitly is taken
    r = tformer_cli("train", *common, "--out_dir", tmp_path / "run3", "--tokenizer", tmp_path / "same.json")
    assert r.returncode == 0, r.stderr[-2000:]
