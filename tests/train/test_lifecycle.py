"""A run's life: continuing a checkpoint keeps its tokenizer, Ctrl-C saves a resumable checkpoint,
resume skips corrupt checkpoints, `best` is never missing, and earlier outputs are not overwritten
unasked. CLI behaviour is checked on the real command in a child process (`tformer_cli`)."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import tformer
from tests.train.test_loop import TEXT, small_run, train_losses
from tformer.io import CheckpointError
from tformer.tokenizer import Tokenizer
from tformer.train.loop import train
from tformer.train.state import checkpoint_dirs, latest_intact, save_best

OTHER_TEXT = """HAMLET:
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die: to sleep.
"""

# the console script's code path (`tformer = tformer.cli:main`), whatever the environment's PATH holds
TFORMER = [sys.executable, "-c", "import sys; from tformer.cli import main; sys.exit(main())"]
TINY = ["--preset", "tiny-llama", "--tokenizer", "char", "--batch_size", "2", "--seq_len", "16", "--warmup", "2",
        "--no-tensorboard", "--sample_tokens", "0"]


def tformer_cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*TFORMER, *map(str, args)], capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT * 40)
    return path


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


# 4. Ctrl-C

def _start(tmp_path, corpus, *extra, launcher=TFORMER) -> tuple[subprocess.Popen, list[str], list[str],
                                                                 threading.Thread]:
    """A long tiny run in a child process, once it has logged three steps: the process, its args,
    its output (stdout and stderr) as it comes, and the thread that reads it."""
    args = ["train", *TINY, "--data", str(corpus), "--out_dir", str(tmp_path / "run"), "--cache_dir",
            str(tmp_path / "cache"), "--max_steps", "1000000", "--eval_every", "1000000", "--log_every", "1", *extra]
    proc = subprocess.Popen([*launcher, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(output)[-2000:]
        time.sleep(0.05)
    return proc, args, output, reader


def test_ctrl_c_saves_a_resumable_checkpoint_and_prints_the_resume_command(tmp_path, corpus):
    proc, args, output, reader = _start(tmp_path, corpus)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    printed = "".join(output)
    assert proc.returncode == 130, printed[-2000:]
    assert "Traceback" not in printed, printed[-2000:]
    saved = checkpoint_dirs(tmp_path / "run")
    assert len(saved) == 1 and "saved a resumable checkpoint of step" in printed and str(saved[0]) in printed
    step = int(saved[0].name.split("-")[1])
    assert step >= 3
    command = next(ln for ln in printed.splitlines() if ln.startswith("resume with: ")).removeprefix("resume with: ")
    assert shlex.split(command) == ["tformer", *args, "--resume"]

    # the printed command resumes (here until two more steps)
    r = subprocess.run([*TFORMER, *shlex.split(command)[1:], "--max_steps", str(step + 2)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming from {saved[0]} (step {step})" in r.stdout
    assert sorted(train_losses(tmp_path / "run")) == list(range(1, step + 3))


# the CLI with a checkpoint save that stalls for two minutes once train_state.pt is written, as on a slow disk
SLOW_SAVE = [sys.executable, "-c", "import sys, time, torch; save = torch.save; "
             "torch.save = lambda *a, **k: (save(*a, **k), time.sleep(120))[0]; "
             "from tformer.cli import main; sys.exit(main())"]


def test_a_second_ctrl_c_quits_at_once(tmp_path, corpus):
    """The first Ctrl-C starts the (slow) save; the second ends the process in the middle of it,
    which leaves no partial checkpoint."""
    proc, _, output, reader = _start(tmp_path, corpus, launcher=SLOW_SAVE)
    proc.send_signal(signal.SIGINT)
    root = tmp_path / "run" / "checkpoints"
    deadline = time.monotonic() + 60
    while not list(root.glob(".step-*/train_state.pt")):  # the save has begun and stalls
        assert time.monotonic() < deadline and proc.poll() is None, "".join(output)[-2000:]
        time.sleep(0.01)
    assert "Ctrl-C again" in "".join(output)
    t = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    assert time.monotonic() - t < 30  # not after the save
    assert proc.returncode == -signal.SIGINT  # SIGINT's own action: no handler, no traceback
    assert "Traceback" not in "".join(output)
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == []  # only the unfinished temp copy
    assert [(p / "train_state.pt").is_file() for p in root.iterdir()] == [True]
    assert latest_intact(tmp_path / "run") == (None, []) and not list(root.iterdir())  # resume clears it away


# 5. corrupt checkpoints, fsync, best/

@pytest.mark.parametrize("broken", ["train_state.pt", "model.safetensors"])
def test_resume_skips_a_truncated_checkpoint(corpus, tmp_path, capsys, broken):
    cfg = small_run(corpus, tmp_path)
    train(cfg, progress=False)
    full = train_losses(tmp_path / "run")
    newest = checkpoint_dirs(cfg.out_dir)[-1]
    assert newest.name == "step-000008"
    data = (newest / broken).read_bytes()
    (newest / broken).write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    cfg.resume = True
    result = train(cfg, progress=False)
    out = capsys.readouterr().out
    assert f"skipping checkpoint {newest}: " in out and broken in out, out
    assert "resuming from" in out and "step-000004 (step 4)" in out
    assert result.step == 8
    resumed = train_losses(tmp_path / "run")
    assert [resumed[s] for s in range(5, 9)] == [full[s] for s in range(5, 9)]  # exactly as before
    assert (tmp_path / "run" / "checkpoints" / "step-000008.corrupt").is_dir()  # kept aside, not listed
    assert [p.name for p in checkpoint_dirs(cfg.out_dir)] == ["step-000004", "step-000008"]


def test_resume_refuses_when_no_checkpoint_is_intact(corpus, tmp_path):
    cfg = small_run(corpus, tmp_path, max_steps=4)
    train(cfg, progress=False)
    (checkpoint_dirs(cfg.out_dir)[-1] / "train_state.pt").write_bytes(b"PK\x03\x04 cut")
    cfg.resume = True
    with pytest.raises(CheckpointError, match="no intact checkpoint.*step-000004: train_state.pt is truncated"):
        train(cfg, progress=False)


def test_checkpoints_are_fsynced_before_they_are_renamed_into_place(corpus, tmp_path, monkeypatch):
    events = []
    fsync, rename = os.fsync, os.rename

    def record_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def record_rename(src, dst):
        events.append(("rename", str(dst)))
        return rename(src, dst)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name an fd")
    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "rename", record_rename)
    train(small_run(corpus, tmp_path, max_steps=4), progress=False)
    published = next(i for i, e in enumerate(events) if e == ("rename", str(tmp_path / "run/checkpoints/step-000004")))
    synced = [path for kind, path in events[:published] if kind == "fsync"]
    assert any(p.endswith("train_state.pt") for p in synced) and any(p.endswith("model.safetensors") for p in synced)


def test_best_is_never_missing(tmp_path, monkeypatch):
    """Every rename, replace and delete while best is saved again finds a complete best/."""
    from tests.conftest import tiny_config

    model, tok = tformer.build_model(tiny_config(vocab_size=64)), Tokenizer.train_char(TEXT)
    save_best(tmp_path, model, tok, 1, 3.0)
    seen = []

    def checked(fn):
        def call(*args, **kwargs):
            seen.append(tformer.load(tmp_path / "best").config.vocab_size)  # readable before ...
            result = fn(*args, **kwargs)
            seen.append(tformer.load(tmp_path / "best").config.vocab_size)  # ... and after
            return result
        return call

    for name in ("rename", "replace"):
        monkeypatch.setattr(os, name, checked(getattr(os, name)))
    monkeypatch.setattr(shutil, "rmtree", checked(shutil.rmtree))
    save_best(tmp_path, model, tok, 2, 2.0)
    save_best(tmp_path, model, tok, 3, 1.0)
    monkeypatch.undo()
    assert seen and json.loads((tmp_path / "best" / "tformer.json").read_text())["step"] == 3
    assert len(list((tmp_path / "best-steps").iterdir())) == 2  # the current one and the one before


# 6. earlier outputs

def test_train_refuses_an_out_dir_holding_an_earlier_run(corpus, tmp_path):
    train(small_run(corpus, tmp_path, max_steps=8, tensorboard=True), progress=False)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    common = [*TINY, "--data", corpus, "--cache_dir", tmp_path / "cache", "--out_dir", tmp_path / "run",
              "--max_steps", "2", "--eval_every", "2", "--log_every", "1"]
    r = tformer_cli("train", *common)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "holds an earlier run" in r.stderr and "--resume" in r.stderr and "--overwrite" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics  # untouched

    r = tformer_cli("train", *common, "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(train_losses(tmp_path / "run")) == [1, 2]
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-000002"]  # none of the earlier run's
    assert not (tmp_path / "run" / "tb").exists()  # its TensorBoard logs went with it

    r = tformer_cli("train", *common, "--resume", "--overwrite")
    assert r.returncode == 2 and "only one" in r.stderr


def test_overwrite_keeps_a_preset_inside_the_run(corpus, tmp_path):
    train(small_run(corpus, tmp_path, max_steps=2, eval_every=2), progress=False)
    cfg = small_run(corpus, tmp_path, max_steps=2, preset=str(tmp_path / "run" / "best"), overwrite=True)
    with pytest.raises(ValueError, match="is part of the earlier run"):
        train(cfg, progress=False)
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
