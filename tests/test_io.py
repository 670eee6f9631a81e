"""tformer.io.atomic_path: all or nothing, the user's umask, and every writer of the project going through it."""

import os
import stat

import numpy as np
import pytest
import torch

import tformer.io
from tformer.io import atomic_path, atomic_write_text, write_safetensors


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_file_replaces_the_old_one_with_the_umask_mode(tmp_path, umask_022):
    path = tmp_path / "sub" / "a.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert mode(path) == 0o644  # as open() makes it; tempfile.mkstemp would leave 0o600
    os.umask(0o077)
    atomic_write_text(path, "private")
    assert mode(path) == 0o600
    assert leftovers(path.parent) == []


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names the fsynced files through /proc")
def test_data_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(tformer.io.os, "fsync", fsync)
    monkeypatch.setattr(tformer.io.os, "replace", replace)
    atomic_write_text(tmp_path / "a.txt", "x")
    tmp = events[0][1]
    assert events == [("fsync", tmp), ("replace", tmp), ("fsync", str(tmp_path))]  # the file, then its folder


def test_temp_name_keeps_the_suffix_for_writers_that_go_by_it(tmp_path):
    with atomic_path(tmp_path / "a.npy") as tmp:
        assert tmp.suffix == ".npy" and tmp.parent == tmp_path
        np.save(tmp, np.arange(3))  # without the suffix np.save would write tmp + ".npy"
    assert np.load(tmp_path / "a.npy").tolist() == [0, 1, 2]
    assert leftovers(tmp_path) == []


def test_directory_replaces_the_old_one_whole(tmp_path, umask_022):
    path = tmp_path / "ckpt"
    with atomic_path(path, directory=True) as tmp:
        (tmp / "old-only.txt").write_text("1")
        (tmp / "both.txt").write_text("old")
    with atomic_path(path, directory=True) as tmp:
        assert not any(tmp.iterdir())
        (tmp / "both.txt").write_text("new")
    assert sorted(p.name for p in path.iterdir()) == ["both.txt"] and (path / "both.txt").read_text() == "new"
    assert mode(path) == 0o755  # tempfile.mkdtemp would leave 0o700
    assert leftovers(tmp_path) == []


def test_failed_directory_write_leaves_the_old_directory(tmp_path):
    path = tmp_path / "ckpt"
    with atomic_path(path, directory=True) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path, directory=True) as tmp:
            (tmp / "a.txt").write_text("new")
            raise KeyboardInterrupt
    assert (path / "a.txt").read_text() == "old"
    assert leftovers(tmp_path) == []


def test_failed_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    with atomic_path(path, directory=True) as tmp:
        (tmp / "a.txt").write_text("old")
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 3:  # new -> ckpt (refused: ckpt is not empty), ckpt -> aside, then new -> ckpt again
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(tformer.io.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        with atomic_path(path, directory=True) as tmp:
            (tmp / "a.txt").write_text("new")
    assert (path / "a.txt").read_text() == "old"
    assert leftovers(tmp_path) == []


def test_replace_false_keeps_what_another_writer_put_there(tmp_path):
    path = tmp_path / "cache"
    with atomic_path(path, directory=True, replace=False) as tmp:
        (tmp / "a.txt").write_text("first")
        with atomic_path(path, directory=True) as other:  # finishes while the first is still writing
            (other / "a.txt").write_text("second")
    assert (path / "a.txt").read_text() == "second"
    assert leftovers(tmp_path) == []


def test_safetensors_file(tmp_path, umask_022):
    from safetensors.torch import load_file

    write_safetensors({"w": torch.arange(4.0)}, tmp_path / "m.safetensors")
    assert load_file(tmp_path / "m.safetensors")["w"].tolist() == [0, 1, 2, 3]
    assert mode(tmp_path / "m.safetensors") == 0o644


def test_checkpoint_tokenizer_and_hf_export_are_written_with_the_umask(tmp_path, umask_022):
    import tformer
    from tformer.convert.hf import save_hf
    from tformer.presets import get_preset
    from tformer.tokenizer import Tokenizer

    tokenizer = Tokenizer.train_char(["to be or not to be"])
    model = tformer.build_model(get_preset("tiny-llama"))
    for path in (tformer.save(model, tmp_path / "ckpt", tokenizer=tokenizer),
                 save_hf(model, tmp_path / "hf", tokenizer=tokenizer),
                 tokenizer.save(tmp_path / "tok").parent):
        assert mode(path) == 0o755
        assert {p.name: mode(p) for p in path.iterdir()} == dict.fromkeys((p.name for p in path.iterdir()), 0o644)
    assert leftovers(tmp_path) == []


def test_shard_cache_and_loss_plot_are_written_whole(tmp_path, umask_022):
    from tformer.data import build_shards
    from tformer.tokenizer import Tokenizer
    from tformer.viz.loss import plot_loss

    text = "to be or not to be\n" * 50
    shards = build_shards([text], Tokenizer.train_char([text]), cache_dir=tmp_path / "shards")
    assert mode(shards.path) == 0o755 and mode(shards.path / "train.bin") == 0o644
    assert leftovers(tmp_path / "shards") == []
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"kind": "train", "step": 1, "loss": 2.0}\n')
    png = plot_loss(metrics, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and mode(png) == 0o644
    assert leftovers(tmp_path) == []
