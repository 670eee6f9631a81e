"""What the real `tformer` command prints for a newcomer's first mistakes, and the modes of what it
writes (issue 24, points 11 and 12). Each test runs the installed console script in a subprocess."""

import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

from tformer.cli import COMMANDS

TEXT = "to be or not to be, that is the question\n" * 20  # 820 characters: a char tokenizer, 1 token each


def tformer(*args, cwd, umask=None) -> subprocess.CompletedProcess:
    exe = shutil.which("tformer")
    cmd = [exe] if exe else [sys.executable, "-m", "tformer.cli"]
    env = {**os.environ, "TFORMER_CACHE": str(cwd / "cache")}
    return subprocess.run([*cmd, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          umask=-1 if umask is None else umask)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A two-step `tformer train` run (char tokenizer, tiny-llama: max_seq_len 128) under umask 027."""
    tmp = tmp_path_factory.mktemp("run")
    (tmp / "text.txt").write_text(TEXT)
    r = tformer("train", "--data", "text.txt", "--tokenizer", "char", "--preset", "tiny-llama", "--seq_len", "8",
                "--batch_size", "2", "--max_steps", "2", "--out_dir", "run", cwd=tmp, umask=0o027)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp


def test_outputs_follow_the_umask(run_dir):
    written = [p for root in (run_dir / "run", run_dir / "cache") for p in [root, *root.rglob("*")]]
    assert any(p.name == "model.safetensors" for p in written) and any(p.suffix == ".bin" for p in written)
    wrong = {str(p.relative_to(run_dir)): oct(mode(p)) for p in written
             if mode(p) != (0o750 if p.is_dir() else 0o640)}
    assert wrong == {}  # mkstemp/mkdtemp would give 0o600/0o700, safetensors' writer 0o600


def test_version_is_the_installed_package_version(tmp_path):
    from importlib.metadata import version

    r = tformer("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"tformer {version('tformer')}"


def test_top_level_description_promises_only_existing_commands(tmp_path):
    r = tformer("--help", cwd=tmp_path)
    description = r.stdout.split("\n\n")[1]
    promised = {"serve": "serve", "fine-tune": "finetune", "chat": "chat", "merge": "merge", "quantize": "quantize"}
    for verb, command in promised.items():
        assert verb not in description or command in COMMANDS, (verb, description)


def test_generate_names_a_missing_path(tmp_path):
    r = tformer("generate", tmp_path / "nonexistent", cwd=tmp_path)
    assert r.returncode == 2 and "nonexistent does not exist" in r.stderr and "tokenizer.json" not in r.stderr


def test_generate_refuses_a_long_prompt_before_echoing_it(run_dir):
    prompt = "to be or not to be? " * 8  # 160 characters: more than max_seq_len 128 - 4 new tokens
    r = tformer("generate", "run/best", "--prompt", prompt, "--max-new-tokens", "4", cwd=run_dir)
    assert r.returncode == 2 and r.stdout == ""
    assert "the prompt is 160 tokens" in r.stderr and "room for 124" in r.stderr and "--truncate-prompt" in r.stderr


def test_generate_truncate_prompt_keeps_the_last_tokens_that_fit(run_dir):
    prompt = "x" * 30 + TEXT[:124]  # 154 characters; the model sees, and the command echoes, the last 124
    r = tformer("generate", "run/best", "--prompt", prompt, "--max-new-tokens", "4", "--temperature", "0",
                "--truncate-prompt", cwd=run_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "kept the last 124 of the prompt's 154 tokens" in r.stderr
    assert r.stdout.startswith(TEXT[:124])


def test_train_on_too_little_data_names_the_split_and_seq_len(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)  # val split: the last 10%, 82 tokens
    r = tformer("train", "--data", "text.txt", "--tokenizer", "char", "--preset", "tiny-llama", "--seq_len", "100",
                "--batch_size", "2", "--max_steps", "1", "--no-tensorboard", "--out_dir", "run", cwd=tmp_path)
    assert r.returncode == 2
    assert re.search(r"the val split has \d+ tokens, fewer than seq_len \+ 1 = 101", r.stderr), r.stderr[-2000:]
    assert "--seq_len" in r.stderr and "block_size" not in r.stderr


def test_tokenizer_train_refuses_an_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    r = tformer("tokenizer", "train", "--input", "empty.txt", "--out", "tok", cwd=tmp_path)
    assert r.returncode == 2 and "no text in empty.txt" in r.stderr
    assert not (tmp_path / "tok").exists()


def test_params_list_sources_are_hf_repos_or_tformer(tmp_path):
    r = tformer("params", "--list", cwd=tmp_path)
    assert r.returncode == 0
    rows = [line.split(None, 1) for line in r.stdout.splitlines()]
    assert len(rows) > 10
    odd = [row for row in rows if not re.fullmatch(r"[\w.-]+/[\w.-]+|tformer \([^)]+\)", row[1])]
    assert odd == []
    assert not re.search(r"seed text|\b\d{3}_[0-9a-f]{16}\b", r.stdout)  # no internal file names
