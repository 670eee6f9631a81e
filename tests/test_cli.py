import json

import pytest

from tformer.cli import COMMANDS, build_parser, main
from tformer.cli.train import make_config


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert list(commands) == COMMANDS
    for name in commands:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
    assert "--model.n-layers" in capsys.readouterr().out


def test_train_config_file_then_flags(tmp_path):
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps({"lr": 0.01, "max_steps": 50, "model": {"dim": 64, "n_heads": 4}}))
    args = build_parser().parse_args(
        ["train", "--config", str(cfg_file), "--max_steps", "7", "--model.n_layers", "3", "--no-tensorboard"]
    )
    cfg = make_config(args)
    assert (cfg.lr, cfg.max_steps, cfg.tensorboard) == (0.01, 7, False)
    assert cfg.model == {"dim": 64, "n_heads": 4, "n_layers": 3}


def test_train_rejects_unknown_file_option(tmp_path, capsys):
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps({"learning_rate": 0.01}))
    assert main(["train", "--config", str(cfg_file)]) == 2
    assert "learning_rate" in capsys.readouterr().err


def test_bad_enum_override_is_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--model.activation", "swish"])
    assert "swiglu" in capsys.readouterr().err


def _tiny_checkpoint(path, tokenizer, **changes):
    import tformer
    from tformer.presets import get_preset

    config = get_preset("tiny-llama").replace(vocab_size=tokenizer.vocab_size, tie_embeddings=False, **changes)
    tformer.save(tformer.build_model(config), path, tokenizer=tokenizer)


def test_generate_with_draft_equals_plain_greedy(tmp_path, capsys):
    from tformer.tokenizer import Tokenizer

    tok = Tokenizer.train_char("ROMEO: But soft, what light through yonder window breaks?\n")
    _tiny_checkpoint(tmp_path / "target", tok)
    _tiny_checkpoint(tmp_path / "draft", tok, n_layers=1)
    common = ["--prompt", "ROMEO:", "--max-new-tokens", "12", "--temperature", "0"]
    assert main(["generate", str(tmp_path / "target"), *common]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", str(tmp_path / "target"), *common, "--draft", str(tmp_path / "draft")]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == plain.strip()
    assert "draft tokens accepted" in out.err
