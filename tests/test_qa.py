"""Extractive QA (data/qa.py, train/qa_task.py) through `tformer finetune --task qa` and `tformer answer`: a
tiny random BERT learns to pick the span a question asks for (SQuAD EM/F1 far above chance) in contexts
longer than one window; windows overlap and label the answer's tokens or [CLS]; the scores are SQuAD
v1.1's; SQuAD .json files read as .jsonl ones; bad files are one-line errors."""

import json
import random

import pytest
import torch

import tformer
from tformer.cli import main
from tformer.data.qa import QAExample, QASplit, best_answers, read_squad, squad_scores, windows
from tformer.models.build import build_model
from tformer.presets.bert import bert_like
from tformer.tokenizer import Tokenizer
from tests.test_mlm import bert_tokenizer

COLORS = "red green blue yellow purple orange".split()
CITIES = "paris rome oslo lima cairo delhi".split()
FILLER = "the a it was and then we saw there walked near old house today".split()
QUESTIONS = {"color": "what color was it ?", "city": "which city was it ?"}


def example(rng: random.Random, i: int, n_words: int) -> dict:
    """n_words of filler holding one color and one city; the question asks for one of them."""
    words = [rng.choice(FILLER) for _ in range(n_words)]
    answers = {"color": rng.choice(COLORS), "city": rng.choice(CITIES)}
    slots = dict(zip(answers, rng.sample(range(n_words), 2)))
    for kind, slot in slots.items():
        words[slot] = answers[kind]
    kind = rng.choice(["color", "city"])
    start = len(" ".join(words[: slots[kind]])) + (slots[kind] > 0)
    return {"id": str(i), "question": QUESTIONS[kind], "context": " ".join(words),
            "answers": {"text": [answers[kind]], "answer_start": [start]}}


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    torch.manual_seed(0)
    tok = bert_tokenizer(COLORS + CITIES + FILLER + "what color which city was it".split())
    path = tmp_path_factory.mktemp("enc") / "ckpt"
    tformer.save(build_model(bert_like(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, ffn_dim=128,
                                       max_seq_len=64)), path, tokenizer=tok)
    return path


def test_a_tiny_bert_learns_to_answer_across_windows(encoder_dir, tmp_path, capsys):
    rng = random.Random(0)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(example(rng, i, rng.randint(6, 30))) + "\n"
                                                  for i in range(400)))
    squad = {"data": [{"paragraphs": [{"context": e["context"], "qas": [
        {"id": e["id"], "question": e["question"],
         "answers": [{"text": e["answers"]["text"][0], "answer_start": e["answers"]["answer_start"][0]}]}]}
        for e in (example(rng, 1000 + i, rng.randint(6, 30)) for i in range(40))]}]}
    (tmp_path / "val.json").write_text(json.dumps(squad))
    out = tmp_path / "run"
    assert main(["finetune", str(encoder_dir), "--task", "qa", "--data", str(tmp_path / "train.jsonl"),
                 "--val-data", str(tmp_path / "val.json"), "--out-dir", str(out), "--max-len", "24",
                 "--doc-stride", "8", "--lr", "1e-3", "--epochs", "12", "--batch-size", "16",
                 "--log-every", "200"]) == 0
    stats = capsys.readouterr().out
    assert "400 training questions (" in stats and "windows)" in stats
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert final["val_exact_match"] > 80 and final["val_f1"] >= final["val_exact_match"]
    assert main(["eval", "task", str(out / "final"), "--task", "qa", "--data", str(tmp_path / "val.json"),
                 "--max-len", "24", "--json"]) == 0  # doc stride: a third of 24, as the run's default would be 8
    again = json.loads(capsys.readouterr().out)
    assert again["examples"] == 40 and again["val_exact_match"] > 80
    context = "we saw the old house near rome and it was blue today"
    assert main(["answer", str(out / "final"), "--context", context, "--question", QUESTIONS["city"],
                 "--question", QUESTIONS["color"], "--json", "--max-len", "24", "--doc-stride", "8"]) == 0
    assert [a["answer"] for a in json.loads(capsys.readouterr().out)] == ["rome", "blue"]


def test_windows_overlap_and_label_the_answer_or_cls(encoder_dir):
    tok = Tokenizer.load(encoder_dir)
    context = " ".join(["the"] * 20 + ["red"] + ["the"] * 3)
    ex = QAExample("0", "what color was it ?", context, [("red", context.index("red"))])
    ws = windows([ex], tok, tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]"), max_len=16, stride=4)
    assert len(ws) == 5 and all(len(w.ids) <= 16 for w in ws)  # 8 context tokens a window, 4 new each
    assert [w.start for w in ws][:1] == [0] and ws[0].end == 0  # not in the first window: [CLS]
    labelled = [w for w in ws if w.start]
    assert labelled and all(tok.id_to_token(w.ids[w.start]) == "red" for w in labelled)
    shared = set(filter(None, ws[0].offsets)) & set(filter(None, ws[1].offsets))
    assert len(shared) == 4  # the stride: two windows share 4 context tokens
    starts, ends = torch.full((len(ws), 16), -10.0), torch.full((len(ws), 16), -10.0)
    for i, w in enumerate(ws):
        if w.start:
            starts[i, w.start], ends[i, w.end] = 5.0, 5.0
    assert best_answers(QASplit([ex], ws, 0), starts, ends) == ["red"]


def test_squad_scores_are_the_official_ones():
    ex = [QAExample("1", "q", "c", [("the Cat", 0), ("a dog", 0)]), QAExample("2", "q", "c", [("blue sky", 0)])]
    scores = squad_scores(["a cat!", "sky"], ex)  # EM by normalisation; F1 2/3 on the second
    assert scores["exact_match"] == 50.0 and scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_bad_files_are_one_line_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"question": "q", "context": "abc",
                                                  "answers": {"text": ["x"], "answer_start": [0]}}) + "\n")
    with pytest.raises(ValueError, match="not at character 0"):
        read_squad(tmp_path / "a.jsonl")
    (tmp_path / "b.json").write_text('{"data": 5}')
    with pytest.raises(ValueError, match="not a SQuAD file"):
        read_squad(tmp_path / "b.json")
