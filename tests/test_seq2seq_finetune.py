"""Encoder-decoders and encoders from the command line (train/seq2seq_tasks.py, train/from_preset.py,
cli/generate_seq2seq.py): `tformer finetune PRESET|CKPT --task seq2seq|span-corruption|mlm` trains, saves
and evaluates (decoding metrics included); a new model learns a copy task; `tformer generate` decodes an
encoder-decoder greedily (equal to seq2seq_generate), by sampling and by beam search; batches are a
function of their index; tokenizers of new models carry their architecture's specials and template;
bad input is a one-line error."""

import json
import random

import pytest
import torch

from tformer.checkpoint import load
from tformer.cli import main
from tformer.data.seq2seq_splits import PairSplit, SpanSplit, segments
from tformer.inference.seq2seq import encode_texts, seq2seq_generate, start_id
from tformer.tokenizer import Tokenizer
from tformer.train.from_preset import train_tokenizer
from tformer.train.seq2seq_tasks import sentinels

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
TINY = ["--model.dim", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--model.ffn_dim", "64",
        "--vocab-size", "400", "--batch-size", "16", "--threads", "2"]


def _pairs(n: int, seed: int) -> list[dict]:
    """A word-for-word cipher: each word becomes the next one of WORDS."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(2, 5))
        out.append({"source": " ".join(words), "target": " ".join(WORDS[(WORDS.index(w) + 1) % 12] for w in words)})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2s")
    for name, n, seed in (("train", 600, 0), ("val", 40, 1)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in _pairs(n, seed)))
    (root / "text.txt").write_text("\n".join(" ".join(random.Random(i).choices(WORDS, k=12)) for i in range(300)))
    return root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """transformer-base from scratch on the cipher, a few hundred steps: (out dir, metrics)."""
    out = tmp_path_factory.mktemp("run")
    args = ["finetune", "transformer-base", "--task", "seq2seq", "--data", str(data / "train.jsonl"),
            "--val-data", str(data / "val.jsonl"), "--out-dir", str(out), "--max-steps", "400", "--eval-every", "100",
            "--eval-decode", "40", "--log-every", "100", "--dropout", "0", *TINY,
            "--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4", "--model.ffn_dim", "128"]
    assert main(args) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_a_new_transformer_learns_the_task_and_saves_what_generate_reads(trained, data, capsys):
    out, metrics = trained
    first, final = metrics["evaluations"][0], metrics["final"]
    assert final["val_loss"] < first["val_loss"] and final["val_exact_match"] >= 0.5
    assert metrics["config"]["lr"] == 1e-3  # a preset's default
    model, tok = load(out / "final"), Tokenizer.load(out / "final")
    source = "alpha beta gamma"
    ours = seq2seq_generate(model, encode_texts(tok, [source]), 12, start_id(tok), [tok.eos_id])[0]
    capsys.readouterr()
    assert main(["generate", str(out / "final"), "--temperature", "0", "--prompt", source,
                 "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip() == tok.decode(ours, skip_special_tokens=True).strip()
    assert main(["generate", str(out / "final"), "--beams", "3", "--n-best", "2", "--prompt", source,
                 "--prompt", "mu iota", "--max-new-tokens", "12"]) == 0
    shown = capsys.readouterr().out
    assert shown.count("=== ") == 4 and "score" in shown
    assert main(["generate", str(out / "final"), "--top-k", "5", "--seed", "3", "--prompt", source,
                 "--max-new-tokens", "6"]) == 0
    assert main(["generate", str(out / "final"), "--draft", str(out / "final"), "--prompt", source]) == 2
    assert "encoder-decoder" in capsys.readouterr().err
    assert main(["eval", "task", str(out / "final"), "--task", "seq2seq", "--data", str(data / "val.jsonl"),
                 "--json"]) == 0  # scored again without training: the run's last evaluation
    again = json.loads(capsys.readouterr().out)
    assert again["val_loss"] == pytest.approx(final["val_loss"], rel=1e-5)
    assert again["val_exact_match"] == final["val_exact_match"]


def test_a_checkpoint_continues_with_span_corruption_then_pairs(trained, data, tmp_path):
    """t5-small from scratch denoises text; its output fine-tunes on pairs from the checkpoint."""
    pre, tuned = tmp_path / "pre", tmp_path / "tuned"
    assert main(["finetune", "t5-small", "--task", "span-corruption", "--data", str(data / "text.txt"),
                 "--out-dir", str(pre), "--max-steps", "4", "--max-len", "24", *TINY]) == 0
    tok = Tokenizer.load(pre / "final")
    assert sentinels(tok) == (tok.token_to_id("<extra_id_0>"), 100)
    metrics = json.loads((pre / "metrics.json").read_text())["final"]
    assert metrics["val_loss"] > 0 and "val_exact_match" not in metrics
    assert main(["finetune", str(pre / "final"), "--task", "seq2seq", "--data", str(data / "train.jsonl"),
                 "--out-dir", str(tuned), "--max-steps", "3", "--eval-decode", "0", "--dropout", "0.2",
                 "--batch-size", "8"]) == 0
    assert json.loads((tuned / "metrics.json").read_text())["config"]["lr"] == 1e-4  # from a checkpoint
    assert load(tuned / "final").config.attn_dropout == 0.2


def test_mlm_from_a_preset_then_classify_with_lora(data, tmp_path, capsys):
    pre, cls = tmp_path / "bert", tmp_path / "cls"
    assert main(["finetune", "bert-base-uncased", "--task", "mlm", "--data", str(data / "text.txt"), "--out-dir",
                 str(pre), "--max-steps", "3", "--max-len", "32", *TINY]) == 0
    tok = Tokenizer.load(pre / "final")
    ids = tok.encode_batch(["alpha beta"], template=True)[0]
    assert tok.id_to_token(ids[0]) == "[CLS]" and tok.id_to_token(ids[-1]) == "[SEP]"
    rows = "text,label\n" + "".join(f"{w} {w},{w[0] < 'h'}\n" for w in WORDS * 4)
    (tmp_path / "c.csv").write_text(rows)
    capsys.readouterr()
    assert main(["finetune", str(pre / "final"), "--task", "classify", "--data", str(tmp_path / "c.csv"),
                 "--out-dir", str(cls), "--max-steps", "2", "--method", "lora"]) == 0
    assert " head parameters train" in capsys.readouterr().out  # the new classifier trains in full
    assert main(["classify", str(cls / "final"), "--text", "alpha alpha"]) == 0


@pytest.mark.parametrize("args, message", [
    (["tformer-nope-preset", "--task", "seq2seq"], "neither a directory nor a preset"),
    (["gpt2", "--task", "seq2seq"], "decoder preset"),
    (["transformer-base", "--task", "mlm"], "encoder-decoder preset"),
    (["bert-base-uncased", "--task", "classify"], "trains from scratch with --task mlm"),
])
def test_bad_starts_are_one_line_errors(args, message, data, tmp_path, capsys):
    argv = ["finetune", *args, "--data", str(data / "train.jsonl"), "--out-dir", str(tmp_path), "--max-steps", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_decoder_checkpoint_and_model_changes_to_a_checkpoint_are_refused(trained, data, tmp_path, capsys):
    import tformer
    from tests.conftest import tiny_config
    from tformer.models import build_model

    dec = tmp_path / "dec"
    tformer.save(build_model(tiny_config(vocab_size=448)), dec, tokenizer=Tokenizer.load(trained[0] / "final"))
    base = ["--data", str(data / "train.jsonl"), "--out-dir", str(tmp_path / "o"), "--max-steps", "1"]
    assert main(["finetune", str(dec), "--task", "seq2seq", *base]) == 2
    assert "not an encoder-decoder" in capsys.readouterr().err
    assert main(["finetune", str(trained[0] / "final"), "--task", "seq2seq", "--model.dim", "64", *base]) == 2
    assert "not a preset" in capsys.readouterr().err


def test_new_tokenizers_carry_their_specials_and_templates():
    texts = [" ".join(WORDS)] * 20
    t5 = train_tokenizer(texts, 300, "encoder_decoder", n_sentinels=5)
    assert (t5.pad_id, t5.eos_id) == (0, 1) and sentinels(t5) == (t5.token_to_id("<extra_id_0>"), 5)
    assert t5.token_to_id("<extra_id_4>") == t5.token_to_id("<extra_id_0>") - 4
    assert encode_texts(t5, ["alpha"])[0][-1] == t5.eos_id == t5.encode_batch(["alpha"], template=True)[0][-1]
    plain = Tokenizer.train_bpe(texts, 300, special_tokens=("<pad>", "</s>"))  # no template: </s> appended
    assert encode_texts(plain, ["alpha"])[0] == [*plain.encode("alpha"), plain.eos_id]
    with pytest.raises(ValueError, match="sentinel"):
        sentinels(plain)


def test_batches_are_a_function_of_their_index():
    rng = random.Random(0)
    pairs = [([rng.randrange(5, 50) for _ in range(rng.randint(1, 30))] + [1], [7, 1]) for _ in range(230)]
    split = PairSplit(pairs, 0, 0, seed=3)
    per_epoch = -(-len(pairs) // 8)
    seen = [split.batch(i, 8) for i in range(per_epoch)]
    assert torch.equal(split.batch(5, 8)["src"], seen[5]["src"])
    assert sum(b["src"].shape[0] for b in seen) == len(pairs)  # an epoch holds every pair once
    stream = list(range(5, 200))
    spans = SpanSplit(segments(stream, 40), first_sentinel=300, n_sentinels=10, eos_id=1, start_id=0, pad_id=0)
    a, b = spans.batch(2, 2), spans.batch(2, 2)
    assert torch.equal(a["src"], b["src"]) and torch.equal(a["targets"], b["targets"])
    assert not torch.equal(spans.batch(3, 2)["src"], a["src"])
    first = [x["src"] for x in spans.eval_batches(2)]
    assert all(torch.equal(x, y["src"]) for x, y in zip(first, spans.eval_batches(2)))
    with pytest.raises(ValueError, match="sentinel"):
        SpanSplit(segments(stream, 190), 300, 1, 1, 0, 0)


def test_an_interrupted_run_resumes_to_the_straight_runs_result(data, tmp_path):
    from tformer.train.encoder_tasks import EncoderTaskConfig, run
    from tformer.train.task_state import STATE_FILE

    class Stop(Exception):
        pass

    def stop_at_step_5(line: str) -> None:
        if line.startswith("step 5/"):
            raise Stop

    base = dict(task="seq2seq", checkpoint="transformer-base", data=[str(data / "train.jsonl")],
                val_data=[str(data / "val.jsonl")], max_steps=8, batch_size=8, vocab_size=400, eval_decode=0,
                log_every=1, save_every=2, eval_every=3, model={"dim": 32, "n_layers": 1, "n_heads": 2, "ffn_dim": 64})
    straight = run(EncoderTaskConfig(out_dir=str(tmp_path / "a"), **base), progress=lambda _: None)
    cut = EncoderTaskConfig(out_dir=str(tmp_path / "b"), **base)
    with pytest.raises(Stop):
        run(cut, progress=stop_at_step_5)
    assert (tmp_path / "b" / STATE_FILE).is_file()  # saved at step 4, with dropout's RNG
    resumed = run(EncoderTaskConfig(out_dir=str(tmp_path / "b"), resume=True, **base), progress=lambda _: None)
    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], abs=1e-6)
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["evaluations"] == \
        json.loads((tmp_path / "a" / "metrics.json").read_text())["evaluations"]
    assert not (tmp_path / "b" / STATE_FILE).exists()  # finished: only final/ remains
    with pytest.raises(ValueError, match="does not exist"):
        run(EncoderTaskConfig(out_dir=str(tmp_path / "c"), resume=True, **base), progress=lambda _: None)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_on_an_encoder_decoder_trains_adapters_only_and_saves_a_merged_model(trained, data, tmp_path, method,
                                                                                    capsys):
    from tformer.adapters.lora import lora_layers
    from tformer.train import task_lora

    out = tmp_path / method
    start = load(trained[0] / "final")
    assert main(["finetune", str(trained[0] / "final"), "--task", "seq2seq", "--data", str(data / "train.jsonl"),
                 "--out-dir", str(out), "--max-steps", "3", "--eval-decode", "0", "--batch-size", "8",
                 "--method", method, "--lora.r", "4", "--lr", "1e-2"]) == 0
    line = capsys.readouterr().out
    assert f"{method}: r 4" in line and "adapter parameters train" in line
    final = load(out / "final")
    assert not lora_layers(final)
    before, after = start.state_dict(), final.state_dict()
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    adapted = {n for n in moved if ".attn." in n or ".cross." in n}  # the attention group: self and cross
    assert "dec_layers.0.cross.wkv.weight" in adapted and "enc_layers.0.attn.wqkv.weight" in adapted
    if method == "lora":
        assert moved == adapted
    else:  # the rest went through NF4 and back: quantization error only
        for n in moved - adapted:
            assert (after[n] - before[n]).abs().max() <= 0.25 * before[n].abs().max()
    probe = start.train()
    task_lora.adapt(probe, "lora", {"r": 2})
    trainable = [n for n, p in probe.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or n.endswith(("lora_a", "lora_b")) for n in trainable)


def test_a_trained_transformer_exports_to_hf_with_its_tokenizer(trained, tmp_path, capsys):
    """MarianMTModel + AutoTokenizer from the export decode as tformer does (greedy, the same ids)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    assert main(["convert", str(trained[0] / "final"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model, tok = load(trained[0] / "final"), Tokenizer.load(trained[0] / "final")
    sources = ["alpha beta gamma", "mu iota kappa lambda"]
    ours = seq2seq_generate(model, encode_texts(tok, sources), 10, start_id(tok), [tok.eos_id])
    for source, row in zip(sources, ours):
        ids = hf_tok(source, return_tensors="pt").input_ids
        assert ids[0].tolist() == encode_texts(tok, [source])[0]  # the template's </s> included
        out = hf.generate(ids, max_new_tokens=10, do_sample=False, num_beams=1)[0, 1:].tolist()
        assert out[: len(row)] == row
    capsys.readouterr()
    for path in (trained[0] / "final", tmp_path / "hf"):  # the HF directory decodes through tformer as well
        assert main(["generate", str(path), "--temperature", "0", "--prompt", sources[0],
                     "--max-new-tokens", "10"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == second == tok.decode(ours[0], skip_special_tokens=True).strip()
