"""`tformer convert` refuses to replace an existing destination unless told to."""

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
