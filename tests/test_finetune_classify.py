"""Encoder fine-tuning (train/encoder_tasks.py) through `tformer finetune --task ...` and `tformer classify`:
a tiny random BERT learns a synthetic two-label CSV above chance, its labels round-trip through the
checkpoint, bad files are one-line errors; mean pooling trains and round-trips (`tformer classify`
predicts what the trained model did); masked-LM and DistilBERT-style distillation run, the student
starting from every other teacher layer; accuracy and macro-F1 are what they say."""

import csv
import json
import random

import pytest
import torch

import tformer
from tformer.checkpoint import save
from tformer.cli import main
from tformer.data.classify import classification_metrics
from tformer.models.build import build_model
from tformer.models.encoder import MaskedLM, SequenceClassifier
from tformer.presets.bert import bert_like
from tformer.train.distill import init_from_teacher
from tformer.train.encoder_models import load_classifier, load_with_head, save_with_head
from tests.test_mlm import bert_tokenizer

GOOD = "good great fine happy bright warm".split()
BAD = "bad awful sad poor dark cold".split()
FILLER = "the a day was and it felt very quite so".split()


def tiny_config(tok, **changes):
    return bert_like(vocab_size=tok.vocab_size, dim=32, n_layers=4, n_heads=2, ffn_dim=64, max_seq_len=64,
                     **changes)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A tformer checkpoint of a random 4-layer BERT encoder with a WordPiece tokenizer."""
    torch.manual_seed(0)
    tok = bert_tokenizer(GOOD + BAD + FILLER)
    path = tmp_path_factory.mktemp("enc") / "ckpt"
    save(build_model(tiny_config(tok)), path, tok)
    return path


def sentence(rng, words):
    return " ".join(rng.sample(FILLER, 3) + rng.sample(words, 2) + rng.sample(FILLER, 2))


def write_csv(path, n, seed):
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            label = "positive" if i % 2 else "negative"
            w.writerow([sentence(rng, GOOD if i % 2 else BAD), label])
    return path


def test_classifier_learns_and_labels_round_trip(encoder_dir, tmp_path, capsys):
    train = write_csv(tmp_path / "train.csv", 96, 0)
    val = write_csv(tmp_path / "val.csv", 40, 1)
    out = tmp_path / "run"
    code = main(["finetune", str(encoder_dir), "--task", "classify", "--data", str(train), "--val-data", str(val),
                 "--lr", "2e-3", "--epochs", "6", "--batch-size", "16", "--out-dir", str(out), "--dropout", "0"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["id2label"] == ["negative", "positive"]
    assert metrics["final"]["val_accuracy"] >= 0.85 and metrics["final"]["val_macro_f1"] >= 0.85
    model, labels = load_classifier(out / "final")
    assert labels == ["negative", "positive"]
    capsys.readouterr()
    assert main(["classify", str(out / "final"), "--text", "the day was good and happy", "--text",
                 "it felt sad and cold", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in result] == ["positive", "negative"]
    assert all(abs(sum(r["probs"].values()) - 1) < 1e-5 for r in result)


def test_mean_pooling_trains_and_round_trips(encoder_dir, tmp_path, capsys):
    train = write_csv(tmp_path / "train.csv", 96, 0)
    val = write_csv(tmp_path / "val.csv", 40, 1)
    out = tmp_path / "run"
    code = main(["finetune", str(encoder_dir), "--task", "classify", "--pooling", "mean", "--data", str(train),
                 "--val-data", str(val), "--lr", "2e-3", "--epochs", "6", "--batch-size", "16", "--out-dir", str(out),
                 "--dropout", "0"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["pooling"] == "mean" and metrics["final"]["val_accuracy"] >= 0.85
    assert json.loads((out / "final" / "tformer.json").read_text())["pooling"] == "mean"
    model, labels = load_classifier(out / "final")
    assert model.pooling == "mean" and model.encoder.pooler is None
    rows = list(csv.DictReader(val.open(encoding="utf-8")))
    (tmp_path / "texts.txt").write_text("".join(r["text"] + "\n" for r in rows), encoding="utf-8")
    capsys.readouterr()
    assert main(["classify", str(out / "final"), "--file", str(tmp_path / "texts.txt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    accuracy = sum(r["label"] == row["label"] for r, row in zip(result, rows)) / len(rows)
    assert accuracy == pytest.approx(metrics["final"]["val_accuracy"])  # the reloaded model predicts as the trained
    again, fresh = load_with_head(out / "final", SequenceClassifier)  # continues with the saved pooling
    assert again.pooling == "mean" and fresh == []
    loaded = tformer.load(out / "final")  # the head model itself, as `tformer classify` reads it
    tokens = torch.randint(model.config.vocab_size, (2, 7))
    assert isinstance(loaded, SequenceClassifier) and torch.equal(loaded(tokens), model(tokens))
    capsys.readouterr()
    assert main(["embed", str(out / "final"), "--text", "good day", "--text", "sad night"]) == 0  # its encoder
    assert capsys.readouterr().out.strip()


def test_an_unknown_pooling_is_a_one_line_error(encoder_dir, tmp_path, capsys):
    train = write_csv(tmp_path / "train.csv", 8, 0)
    code = main(["finetune", str(encoder_dir), "--task", "classify", "--pooling", "max", "--data", str(train),
                 "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown pooling 'max'; choose one of cls, mean" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["finetune", str(encoder_dir), "--task", "mlm", "--pooling", "mean", "--data", str(train)]) == 2
    assert "--pooling applies to --task classify only" in capsys.readouterr().err


@pytest.mark.parametrize("content, suffix, message", [
    ("words,label\nhello,a\n", ".csv", "no column 'text'"),
    ("text,label\n", ".csv", "holds no examples"),
    ("text,label\nhello,a\nworld,a\n", ".csv", "only one label"),
    ("text,label\nhello,\n", ".csv", ":2: an empty text or label"),
    ('{"text": "hello"}\n', ".jsonl", '"label" must be'),
    ('{"text": "hello", "label": "a"}\nnot json\n', ".jsonl", ":2: not valid JSON"),
    ("text\tlabel\n", ".tsv", "expected a .csv or .jsonl"),
])
def test_bad_files_are_one_line_errors(encoder_dir, tmp_path, capsys, content, suffix, message):
    data = tmp_path / f"data{suffix}"
    data.write_text(content, encoding="utf-8")
    code = main(["finetune", str(encoder_dir), "--task", "classify", "--data", str(data),
                 "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_options_of_the_other_task_are_refused(encoder_dir, tmp_path, capsys):
    assert main(["finetune", str(encoder_dir), "--task", "classify", "--data", "x.csv", "--dpo-beta", "0.2"]) == 2
    assert "--dpo-beta applies to --task sft only" in capsys.readouterr().err
    assert main(["finetune", str(encoder_dir), "--epochs", "2", "--data", "x.jsonl"]) == 2
    assert "--epochs applies to the encoder tasks" in capsys.readouterr().err
    assert main(["classify", str(encoder_dir), "--text", "good"]) == 2
    assert "has no classifier head (its model is Encoder)" in capsys.readouterr().err


def corpus(tmp_path, rng):
    lines = [sentence(rng, GOOD if i % 2 else BAD) for i in range(120)]
    docs = ["\n".join(lines[i: i + 6]) for i in range(0, 120, 6)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.mark.parametrize("nsp", [False, True])
def test_mlm_continues_an_encoder(encoder_dir, tmp_path, nsp):
    data = corpus(tmp_path, random.Random(2))
    out = tmp_path / "mlm"
    args = ["finetune", str(encoder_dir), "--task", "mlm", "--data", str(data), "--lr", "5e-3", "--max-steps", "20",
            "--batch-size", "8", "--out-dir", str(out), "--eval-every", "2", "--max-len", "24"]
    assert main(args + (["--nsp"] if nsp else [])) == 0
    record = json.loads((out / "metrics.json").read_text())
    metrics = record["final"]
    assert metrics["val_loss"] < record["evaluations"][0]["val_loss"] - 0.1
    assert (metrics["val_nsp_accuracy"] >= 0) if nsp else "val_nsp_accuracy" not in metrics
    model, fresh = load_with_head(out / "final", MaskedLM)
    assert fresh == [] if not nsp else "head.bias" not in fresh  # the head was saved and loaded back
    classifier_out = tmp_path / "cls"
    train = write_csv(tmp_path / "t.csv", 32, 3)
    assert main(["finetune", str(out / "final"), "--task", "classify", "--data", str(train), "--max-steps", "2",
                 "--out-dir", str(classifier_out)]) == 0  # a masked-LM checkpoint continues into a classifier


def test_student_starts_from_every_other_teacher_layer(encoder_dir):
    teacher, _ = load_with_head(encoder_dir, MaskedLM)
    student, _ = load_with_head(encoder_dir, MaskedLM, config_changes={"n_layers": 2})
    assert init_from_teacher(student, teacher) == [0, 2]
    t, s = teacher.state_dict(), student.state_dict()
    for i, j in ((0, 0), (1, 2)):
        for name in [n for n in s if n.startswith(f"encoder.layers.{i}.")]:
            assert torch.equal(s[name], t[name.replace(f"layers.{i}.", f"layers.{j}.")])
    assert torch.equal(s["encoder.tok_emb.weight"], t["encoder.tok_emb.weight"])
    assert torch.equal(s["head.dense.weight"], t["head.dense.weight"])


def test_distill_encoder_trains_a_half_depth_student(encoder_dir, tmp_path, capsys):
    teacher_dir = tmp_path / "teacher"
    teacher, _ = load_with_head(encoder_dir, MaskedLM)
    save_with_head(teacher, teacher_dir, encoder_dir)
    out = tmp_path / "student"
    code = main(["finetune", str(teacher_dir), "--task", "distill-encoder", "--teacher", str(teacher_dir),
                 "--data", str(corpus(tmp_path, random.Random(4))), "--max-steps", "4", "--batch-size", "8",
                 "--lr", "1e-3", "--out-dir", str(out)])
    assert code == 0, capsys.readouterr().err
    assert f"student layers from {teacher_dir}'s [0, 2]" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())["final"]
    assert {"val_ce_loss", "val_mlm_loss", "val_cos_loss"} <= set(metrics)
    student, _ = load_with_head(out / "final", MaskedLM)
    assert student.config.n_layers == 2
    assert main(["finetune", str(teacher_dir), "--task", "distill-encoder", "--teacher", str(encoder_dir),
                 "--data", "x.jsonl", "--out-dir", str(tmp_path / "s2")]) == 2
    assert "no masked-LM head" in capsys.readouterr().err


def test_metrics_count_what_they_say():
    pred, true = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 1, 1, 2, 0])
    m = classification_metrics(pred, true)
    assert m["accuracy"] == pytest.approx(4 / 6)
    f1 = [2 * 1 / (2 + 1 + 1), 2 * 2 / (4 + 0 + 1), 2 * 1 / (2 + 1 + 0)]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)


def test_an_hf_bert_directory_fine_tunes(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    tok = bert_tokenizer(GOOD + BAD + FILLER)
    hf = transformers.BertModel(transformers.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64))
    hf.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")
    train = write_csv(tmp_path / "t.csv", 32, 5)
    out = tmp_path / "run"
    assert main(["finetune", str(tmp_path / "hf"), "--task", "classify", "--data", str(train), "--max-steps", "3",
                 "--out-dir", str(out)]) == 0
    assert "new parameters: classifier.weight, classifier.bias" in capsys.readouterr().out
    model, labels = load_classifier(out / "final")
    assert labels == ["negative", "positive"] and model.classifier.out_features == 2
    assert not torch.equal(model.encoder.tok_emb.weight, hf.embeddings.word_embeddings.weight)  # trained


def test_encoder_objectives_equal_their_formulas(encoder_dir):
    import torch.nn.functional as F

    from tformer.data.mlm import MLMCollator, SpecialTokens, encode_pair
    from tformer.models.encoder import Pretraining
    from tformer.train.objectives import EncoderDistill, MaskedLMObjective
    from tformer.tokenizer import Tokenizer

    sp = SpecialTokens.from_tokenizer(Tokenizer.load(encoder_dir))
    rows = [encode_pair([7, 8, 9, 10, 11], [12, 13], sp), encode_pair([14, 15, 16], [17, 18, 19, 20], sp)]
    batch = MLMCollator(sp, mlm_prob=0.5)(rows, torch.Generator().manual_seed(0), [0, 1])
    pre, _ = load_with_head(encoder_dir, Pretraining)
    pre.eval()
    out = MaskedLMObjective(pre)(batch)
    logits, nsp = pre(batch["tokens"], batch["attention_mask"], batch["token_types"])
    mlm = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    assert torch.allclose(out["loss"], mlm + F.cross_entropy(nsp, batch["nsp_labels"]), atol=1e-6)

    teacher, _ = load_with_head(encoder_dir, MaskedLM)
    student, _ = load_with_head(encoder_dir, MaskedLM, config_changes={"n_layers": 2})
    teacher.eval(), student.eval()
    same = EncoderDistill(teacher, teacher, alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, temperature=2.0)(batch)
    assert same["ce_loss"].abs() < 1e-6 and same["cos_loss"].abs() < 1e-6  # a teacher matches itself
    out = EncoderDistill(student, teacher, alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, temperature=2.0)(batch)
    args = batch["tokens"], batch["attention_mask"], batch["token_types"]
    real = batch["attention_mask"].bool()
    s_h, t_h = student.encoder(*args)[real], teacher.encoder(*args)[real]
    s, t = student.head(s_h), teacher.head(t_h)  # (N, V) over the real positions
    kl = (F.softmax(t / 2, -1) * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    cos = (1 - F.cosine_similarity(s_h, t_h, dim=-1)).mean()
    mlm = F.cross_entropy(student(*args).flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    assert torch.allclose(out["loss"], 5 * kl + 2 * mlm + cos, atol=1e-5)
