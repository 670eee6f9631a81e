"""The real `tformer` command's options (issue 24, points 2, 3, 9, 10): config values checked with
one-line errors, `train --help` showing the defaults of the model it would train, dashed and
underscored option spellings, and unknown options answered by the subcommand. Each test runs the
command in a subprocess."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

MAIN = "import sys; from tformer.cli import main; sys.exit(main())"


def tformer(*args, cwd=None) -> subprocess.CompletedProcess:
    exe = shutil.which("tformer")
    cmd = [exe] if exe else [sys.executable, "-c", MAIN]
    env = {**os.environ, "COLUMNS": "200"}  # one help entry a line where it fits
    return subprocess.run([*cmd, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def help_entries(text: str) -> dict[str, str]:
    """Each option of a --help text -> its help (continuation lines joined)."""
    entries: dict[str, str] = {}
    option = None
    for line in text.splitlines():
        m = re.match(r"  (-\S.*?)(?:\s{2,}(.*))?$", line)
        if m:
            option = m.group(1).split(",")[0].split(" ")[0]
            entries[option] = m.group(2) or ""
        elif option and line.startswith("    "):
            entries[option] = (entries[option] + " " + line.strip()).strip()
        else:
            option = None
    return entries


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr


# point 3: values from JSON and TOML files (tests/test_config.py checks every case in-process)


def test_bad_checkpoint_config_is_one_line_naming_the_field(tmp_path):
    from tformer.presets import get_preset

    model = {**get_preset("tiny-llama").to_dict(), "tie_embeddings": "false"}
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "tformer.json").write_text(json.dumps({"format": "tformer", "version": 1, "model": model}))
    err = one_line_error(tformer("params", "ckpt", cwd=tmp_path))
    assert "tie_embeddings: expected true or false, got 'false'" in err


@pytest.mark.parametrize(
    "toml, words",
    [
        ('max_steps = "20"', ["run.toml", "max_steps", "'20'", "an integer"]),
        ("[model]\ndimm = 64", ["run.toml", "'model.dimm'", "did you mean 'model.dim'"]),
    ],
)
def test_bad_train_config_file_is_one_line_naming_the_field(tmp_path, toml, words):
    (tmp_path / "run.toml").write_text(toml + "\n")
    err = one_line_error(tformer("train", "--config", "run.toml", cwd=tmp_path))
    for w in words:
        assert w in err


@pytest.mark.parametrize("architecture, pointer", [("encoder", "tformer finetune PRESET_OR_CKPT --task mlm"),
                                                    ("encoder_decoder", "--task seq2seq")])
def test_train_says_where_encoders_and_encoder_decoders_train(tmp_path, architecture, pointer):
    (tmp_path / "corpus.txt").write_text("to be or not to be, that is the question\n" * 40)
    err = one_line_error(tformer("train", "--data", "corpus.txt", "--tokenizer", "char", "--model.architecture",
                                 architecture, "--model.positions", "learned", "--max_steps", 1, cwd=tmp_path))
    assert "tformer train trains decoders" in err and pointer in err


# point 2: a changed width re-derives head_dim and n_kv_heads in the model that is trained


def test_train_rederives_the_presets_derived_sizes(tmp_path):
    (tmp_path / "corpus.txt").write_text("to be or not to be, that is the question\n" * 40)
    r = tformer("train", "--data", "corpus.txt", "--tokenizer", "char", "--model.dim", 96, "--model.n_heads", 3,
                "--model.n_layers", 1, "--seq_len", 8, "--batch_size", 2, "--max_steps", 1, "--eval_every", 1,
                "--eval_batches", 1, "--sample_tokens", 0, "--no-tensorboard", "--out_dir", "run",
                "--cache_dir", "cache", cwd=tmp_path)  # the underscored spellings that always worked
    assert r.returncode == 0, r.stderr[-3000:]
    saved = json.loads(next((tmp_path / "run").rglob("tformer.json")).read_text())["model"]
    assert (saved["dim"], saved["n_heads"], saved["head_dim"], saved["n_kv_heads"]) == (96, 3, 32, 3)


# point 9: train --help


def test_train_help_shows_the_default_presets_model_each_default_once():
    r = tformer("train", "--help")
    assert r.returncode == 0, r.stderr
    entries = help_entries(r.stdout)
    assert "--max-steps" in entries and "--model.rope.theta" in entries and "--model.moe.n-experts" in entries
    for option, text in entries.items():
        if option != "-h":
            assert text.count("default:") == 1, (option, text)
    # shakespeare-bpe: 192 wide, 3 layers, SwiGLU, RMSNorm; not ModelConfig's 768 / 12 / gelu / layernorm
    assert entries["--model.dim"] == "default: 192"
    assert entries["--model.n-layers"] == "default: 3"
    assert entries["--model.activation"] == "default: swiglu"
    assert entries["--model.norm"] == "default: rmsnorm"
    assert entries["--model.head-dim"].startswith("default: 48, derived")
    assert "tokenizer" in entries["--model.vocab-size"]  # fitted to the run's tokenizer
    assert entries["--max-steps"] == "default: 350"
    assert "--preset shakespeare-bpe has none" in r.stdout  # the MoE group says the preset has no MoE


def test_train_help_follows_preset_and_config_file(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"preset": "tiny-moe", "max_steps": 7, "model": {"dim": 128}}))
    entries = help_entries(tformer("train", "--config", "run.json", "--help", cwd=tmp_path).stdout)
    assert entries["--max-steps"] == "default: 7"
    assert (entries["--model.dim"], entries["--model.n-kv-heads"]) == ("default: 128", "default: 2")
    assert entries["--model.moe.n-experts"] == "default: 4"
    entries = help_entries(tformer("train", "--help", "--preset", "tiny-gpt2").stdout)
    assert (entries["--model.dim"], entries["--model.activation"]) == ("default: 64", "default: gelu_tanh")
    assert entries["--model.ffn-dim"] == "default: 256, derived: 4 * dim"


# point 10: --max-steps and --max_steps; unknown options


def test_train_takes_dashed_and_underscored_options():
    args = ["--max_steps=0", "--batch-size", 2, "--seq_len", 8, "--model.n_layers", 2,
            "--model.rope.partial-rotary-factor", 1, "--no_tensorboard"]
    err = one_line_error(tformer("train", *args))
    assert "max_steps must be > 0, got 0" in err  # parsed: refused by the config check, not by argparse


def test_other_commands_take_underscored_options(tmp_path):
    r = tformer("generate", tmp_path / "missing", "--max_new_tokens", 5, "--top_k", 3, "--repetition_penalty", 1)
    assert r.returncode == 2 and "unrecognized" not in r.stderr and "max_new_tokens" not in r.stderr, r.stderr


@pytest.mark.parametrize(
    "args, usage, suggestion",
    [
        (["train", "--max-stepz", "5"], "usage: tformer train", "did you mean --max-steps?"),
        (["generate", "ckpt", "--max-new-token_s", "5"], "usage: tformer generate", "did you mean --max-new-tokens?"),
    ],
)
def test_unknown_option_shows_the_subcommands_usage_and_the_closest_option(args, usage, suggestion):
    r = tformer(*args)
    assert r.returncode == 2
    assert usage in r.stderr and suggestion in r.stderr and "unrecognized arguments" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
