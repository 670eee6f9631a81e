"""Long-context evaluation: task prompts (exact lengths, needle depths, answers in the text, seeded),
the effective length, context extension past max_seq_len, and `tformer eval longctx` end to end."""

import json
import re

import pytest
import torch
import torch.nn.functional as F

import tformer
from tformer.cli import main
from tformer.config import ModelConfig
from tformer.data.corpus import shakespeare_text
from tformer.evals.longctx import TASKS, make_example, score
from tformer.evals.longctx_run import effective_length, prepare_model
from tformer.quantize.swap import quantize_model
from tformer.tokenizer import Tokenizer

TEXT = shakespeare_text()[:200_000]


@pytest.fixture(scope="module")
def tokenizers():
    char = Tokenizer.train_char([TEXT + "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ="])
    return {"char": char, "bpe": Tokenizer.train_bpe([TEXT], 600)}


def _config(tok, **changes) -> ModelConfig:
    base = dict(vocab_size=tok.vocab_size, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                activation="swiglu", norm="rmsnorm", positions="rope", tie_embeddings=False, max_seq_len=256)
    return ModelConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizers):
    """A tiny RoPE decoder trained for a few steps on the corpus (the pipeline is tested, not accuracy)."""
    tok = tokenizers["bpe"]
    torch.manual_seed(0)
    model = tformer.build_model(_config(tok))
    data = torch.tensor(tok.encode(TEXT[:60_000]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(6):
        starts = torch.randint(0, len(data) - 65, (4,))
        batch = torch.stack([data[s:s + 65] for s in starts])
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("longctx") / "ckpt"
    tformer.save(model.eval(), path, tokenizer=tok)
    return path


@pytest.mark.parametrize("kind", ["char", "bpe"])
@pytest.mark.parametrize("task", TASKS)
def test_prompts_have_the_exact_token_length(tokenizers, kind, task):
    tok = tokenizers[kind]
    for length in (333, 517):
        for depth in (0.0, 0.4, 1.0):
            ex = make_example(task, tok, length, depth, sample=1, haystack=TEXT)
            assert len(ex.ids) == length
            assert ex.filler > 0


@pytest.mark.parametrize("task", ["passkey", "niah"])
def test_the_needle_sits_at_the_requested_depth(tokenizers, task):
    tok = tokenizers["bpe"]
    head = make_example(task, tok, 600, 0.0, haystack=TEXT).needle_at  # the instruction's tokens
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        ex = make_example(task, tok, 600, depth, haystack=TEXT)
        before = ex.needle_at - head  # filler tokens before the needle
        assert abs(before - depth * ex.filler) <= 40  # at most a corpus line or filler sentence away
    assert before == ex.filler  # depth 1: just before the question


def test_answers_are_in_the_text(tokenizers):
    tok = tokenizers["char"]  # decodes to exactly the text it encodes
    for task in TASKS:
        for sample in range(3):
            ex = make_example(task, tok, 700, 0.3, sample, haystack=TEXT)
            text = tok.decode(ex.ids)
            for answer in ex.answers:
                assert answer in text
            question = text[text.rindex("\n"):]
            if task in ("niah", "multikey"):
                key = re.search(r"magic number for (\w+)\?", question)[1]
                assert f"The magic number for {key} is {ex.answers[0]}." in text
            if task == "vartrack":  # follow the chain: exactly the answers equal the asked value
                value = re.search(r"assigned the value (\d+)\?", question)[1]
                env = {}
                for name, rhs in re.findall(r"VAR (\w+) = (\w+)\.", text):
                    env[name] = env.get(rhs, rhs)
                assert sorted(n for n, v in env.items() if v == value) == sorted(ex.answers)


def test_examples_are_seeded(tokenizers):
    tok = tokenizers["bpe"]
    a = make_example("multikey", tok, 400, 0.5, sample=2, seed=7)  # the bundled corpus as haystack
    assert a == make_example("multikey", tok, 400, 0.5, sample=2, seed=7)
    assert a.ids != make_example("multikey", tok, 400, 0.5, sample=2, seed=8).ids
    assert a.ids != make_example("multikey", tok, 400, 0.5, sample=3, seed=7).ids


def test_bad_task_inputs_are_refused(tokenizers):
    tok = tokenizers["bpe"]
    with pytest.raises(ValueError, match="too short for task 'vartrack'.*pass lengths above"):
        make_example("vartrack", tok, 40, 0.5, haystack=TEXT)
    with pytest.raises(ValueError, match="unknown long-context task 'ruler'"):
        make_example("ruler", tok, 400, 0.5, haystack=TEXT)
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
        make_example("niah", tok, 400, 1.5, haystack=TEXT)


def test_score_is_string_match_recall(tokenizers):
    ex = make_example("multivalue", tokenizers["bpe"], 400, 0.5, haystack=TEXT)
    assert score(ex, " " + ", ".join(ex.answers)) == 1.0
    assert score(ex, f" {ex.answers[1]} and {ex.answers[3]}") == 0.5
    assert score(make_example("passkey", tokenizers["bpe"], 200, 0.5), " 12") == 0.0


def test_effective_length():
    assert effective_length({64: 1.0, 128: 0.9, 256: 0.5, 512: 0.95}, 0.85) == 128  # 512 after a failure: no
    assert effective_length({64: 0.85, 128: 0.86}, 0.85) == 128  # reaching the threshold passes
    assert effective_length({64: 0.5, 128: 1.0}, 0.85) is None
    assert effective_length({256: 1.0, 64: 1.0, 128: 0.2}, 0.85) == 64  # ordered by length, not by insertion


def test_context_extension_keeps_the_weights_and_refuses_learned_positions(tokenizers):
    tok = tokenizers["bpe"]
    ids = torch.tensor([tok.encode(TEXT[:400])[:100]])
    for positions in ("rope", "alibi", "t5", "none"):
        model = tformer.build_model(_config(tok, positions=positions, max_seq_len=128)).eval()
        longer, note = prepare_model(model, 300)
        assert longer.config.max_seq_len == 300 and "past the model's max_seq_len 128" in note
        torch.testing.assert_close(longer(ids), model(ids))
        assert longer(torch.zeros(1, 300, dtype=torch.long)).shape[1] == 300
    quantized = quantize_model(model, "int8")  # rebuilt with its quantized layers
    torch.testing.assert_close(prepare_model(quantized, 300)[0](ids), quantized(ids))
    model = tformer.build_model(_config(tok, positions="learned", max_seq_len=128)).eval()
    assert prepare_model(model, 100) == (model, None)
    with pytest.raises(ValueError, match="max_seq_len 128.*learned positions.*pass lengths up to 98"):
        prepare_model(model, 300, answer_room=30)


def test_rope_override_changes_the_frequencies(tokenizers):
    from tformer.evals.longctx_run import rope_override

    model = tformer.build_model(_config(tokenizers["bpe"])).eval()
    rope = rope_override(model.config, "linear", 4.0, None)
    scaled, note = prepare_model(model, 100, rope)
    assert note is None and scaled.config.rope.scaling == "linear"
    inv = {name: b for name, b in scaled.named_buffers() if name.endswith("inv_freq")}
    ref = dict(model.named_buffers())
    assert inv and all(torch.allclose(b * 4, ref[name]) for name, b in inv.items())
    assert rope_override(model.config, "yarn", 2.0, None)["original_max_seq_len"] == 256  # its max_seq_len
    with pytest.raises(ValueError, match="needs a factor"):
        rope_override(model.config, "dynamic", None, None)


def test_cli_writes_heatmaps_and_json(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "longctx", str(checkpoint), "--lengths", "192,288", "--depths", "0,1", "--samples", "2",
            "--out", str(out), "--device", "cpu", "--batch-size", "4"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "past the model's max_seq_len 256" in captured.err  # 288 + the answer: RoPE extrapolates
    assert "effective" in captured.out and "average" in captured.out
    for task in TASKS:
        assert (out / f"longctx_{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "longctx.json").read_text())
    assert data["lengths"] == [192, 288] and data["depths"] == [0.0, 1.0]
    assert set(data["tasks"]) == set(TASKS)
    assert all(len(t["accuracy"]) == 2 and len(t["accuracy"][0]) == 2 for t in data["tasks"].values())
    assert len(data["examples"]) == len(TASKS) * 2 * 2 * 2
    assert all(0 <= e["score"] <= 1 for e in data["examples"])
    assert not list(out.glob(".*"))  # no temporary leftovers


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "passkey,ruler"], "unknown long-context task 'ruler'"),
    (["--lengths", "256,lots"], "--lengths: 'lots' is not a positive whole number"),
    (["--depths", "0,2"], "--depths: '2' is not a number in [0, 1]"),
    (["--lengths", "100"], "length 100 is too short for task"),
    (["--rope-factor", "2"], "go with --rope-scaling"),
])
def test_cli_refuses_bad_input(checkpoint, tmp_path, capsys, extra, message):
    assert main(["eval", "longctx", str(checkpoint), "--out", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_refuses_lengths_past_learned_positions(tokenizers, tmp_path, capsys):
    tok = tokenizers["bpe"]
    tformer.save(tformer.build_model(_config(tok, positions="learned", max_seq_len=128)), tmp_path / "gpt",
                 tokenizer=tok)
    assert main(["eval", "longctx", str(tmp_path / "gpt"), "--lengths", "256", "--out", str(tmp_path / "o")]) == 2
    assert "max_seq_len 128, and its learned positions have no row past it" in capsys.readouterr().err
    assert main(["eval", "longctx", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_accuracy_grid_and_effective_lengths_follow_the_answers(tokenizers, monkeypatch):
    """Scores, their aggregation and the written numbers, with a stand-in model that answers by rule."""
    from tformer.evals import longctx_run
    from tformer.evals.longctx_report import to_dict
    from tformer.evals.longctx_run import build_examples, evaluate

    tok = tokenizers["bpe"]
    examples = build_examples(tok, ["passkey", "multivalue"], [300, 200, 250], [0.0, 1.0], 2, haystack=TEXT)
    by_ids = {tuple(e.ids): e for group in examples.values() for e in group}

    class Oracle:  # passkey: right below 300 tokens, and at 300 from depth 1 only; multivalue: half the values
        def __init__(self, model, tokenizer, batch_size):
            pass

        def __call__(self, prompts, max_new_tokens):
            out = []
            for ids in prompts:
                e = by_ids[tuple(ids)]
                right = e.task == "multivalue" or e.length < 300 or e.depth == 1.0
                answers = e.answers[:2] if e.task == "multivalue" else e.answers if right else ["00000"]
                out.append(tok.encode(" " + ", ".join(answers))[:max_new_tokens])
            return out

        def close(self):
            pass

    monkeypatch.setattr(longctx_run, "_Generator", Oracle)
    result = evaluate(None, tok, examples, threshold=0.85)
    assert result.lengths == [200, 250, 300]
    assert result.by_length("passkey") == {200: 1.0, 250: 1.0, 300: 0.5}
    assert result.effective_length("passkey") == 250
    assert result.by_length("multivalue") == {200: 0.5, 250: 0.5, 300: 0.5}
    assert result.effective_length("multivalue") is None and result.effective_length() is None
    data = to_dict(result)
    assert data["tasks"]["passkey"]["accuracy"] == [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]  # [depth][length]
    assert data["average"]["by_length"] == {"200": 0.75, "250": 0.75, "300": 0.5}


def test_cli_runs_an_encoder_decoder_past_max_seq_len(tokenizers, tmp_path, capsys):
    """T5's relative position bias has no length limit: the source may pass max_seq_len."""
    from tformer.presets import get_preset

    tok = tokenizers["bpe"]
    config = get_preset("t5-small").replace(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, head_dim=16,
                                            ffn_dim=64, max_seq_len=128)
    tformer.save(tformer.build_model(config), tmp_path / "t5", tokenizer=tok)
    argv = ["eval", "longctx", str(tmp_path / "t5"), "--tasks", "niah", "--lengths", "160", "--depths", "0.5",
            "--samples", "1", "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert main(argv) == 0
    assert "its t5 positions are evaluated beyond their training length" in capsys.readouterr().err
    assert (tmp_path / "o" / "longctx_niah.png").is_file()
