"""Token classification (data/tagging.py, train/tagging_task.py) through `tformer finetune --task
token-classify` and `tformer classify`: a tiny random BERT learns synthetic named entities (entity F1
far above chance) from JSONL and CoNLL files; labels sit on first sub-tokens only; entities are read as
seqeval reads BIO tags; bad files are one-line errors."""

import json
import random

import pytest
import torch

import tformer
from tformer.cli import main
from tformer.data.sft import IGNORE
from tformer.data.tagging import encode_tagged, entities, entity_scores, read_tagged
from tformer.models.build import build_model
from tformer.presets.bert import bert_like
from tests.test_mlm import bert_tokenizer

PEOPLE = "alice bob carol dave erin frank".split()
PLACES = "paris rome oslo lima cairo delhi".split()
FILLER = "met in the at went to and saw from city today".split()


def sentence(rng: random.Random) -> tuple[list[str], list[str]]:
    words, tags = [], []
    for _ in range(rng.randint(3, 7)):
        kind = rng.random()
        if kind < 0.25:  # a two-word person: B-PER I-PER, then a filler (two people in a row would be ambiguous)
            words += [rng.choice(PEOPLE), rng.choice(PEOPLE), rng.choice(FILLER)]
            tags += ["B-PER", "I-PER", "O"]
        elif kind < 0.45:
            words.append(rng.choice(PLACES))
            tags.append("B-LOC")
        else:
            words.append(rng.choice(FILLER))
            tags.append("O")
    return words, tags


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    torch.manual_seed(0)
    tok = bert_tokenizer(PEOPLE + PLACES + FILLER)
    path = tmp_path_factory.mktemp("enc") / "ckpt"
    model = build_model(bert_like(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, ffn_dim=64,
                                  max_seq_len=64))
    tformer.save(model, path, tokenizer=tok)
    return path


def test_a_tiny_bert_learns_entities_and_tags_text(encoder_dir, tmp_path, capsys):
    rng = random.Random(0)
    train = [sentence(rng) for _ in range(300)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"tokens": w, "tags": t}) + "\n" for w, t in train))
    conll = "-DOCSTART- -X- O\n\n" + "\n\n".join("\n".join(f"{w} NN {t}" for w, t in zip(*sentence(rng)))
                                                for _ in range(40))
    (tmp_path / "val.conll").write_text(conll + "\n")
    out = tmp_path / "run"
    assert main(["finetune", str(encoder_dir), "--task", "token-classify", "--data", str(tmp_path / "train.jsonl"),
                 "--val-data", str(tmp_path / "val.conll"), "--out-dir", str(out), "--lr", "3e-3", "--epochs", "30",
                 "--batch-size", "16", "--log-every", "50"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["id2label"] == ["B-LOC", "B-PER", "I-PER", "O"]
    assert metrics["final"]["val_entity_f1"] > 0.9 and metrics["final"]["val_word_accuracy"] > 0.9
    capsys.readouterr()
    assert main(["eval", "task", str(out / "final"), "--task", "token-classify", "--data", str(tmp_path / "val.conll"),
                 "--json"]) == 0  # the same split scored again, without training: the same numbers
    again = json.loads(capsys.readouterr().out)
    assert again["examples"] == 40 and again["val_entity_f1"] == pytest.approx(metrics["final"]["val_entity_f1"])
    assert main(["eval", "task", str(out / "final"), "--task", "classify", "--data", str(tmp_path / "val.conll")]) == 2
    assert "holds TokenClassifier, not the SequenceClassifier" in capsys.readouterr().err
    assert main(["classify", str(out / "final"), "--text", "bob alice went to paris", "--json"]) == 0
    tagged = json.loads(capsys.readouterr().out)[0]
    assert tagged["tags"] == ["B-PER", "I-PER", "O", "O", "B-LOC"]
    assert [(e["type"], e["text"]) for e in tagged["entities"]] == [("PER", "bob alice"), ("LOC", "paris")]


def test_labels_sit_on_first_sub_tokens_and_cut_sentences_keep_sep(encoder_dir):
    from tformer.tokenizer import Tokenizer

    tok = Tokenizer.load(encoder_dir)
    words, tags = ["alice", "zzz", "paris"], ["B-PER", "O", "B-LOC"]  # "zzz" is unknown: one [UNK]
    rows, labels, firsts = encode_tagged(tok, [(words, tags)], {"B-LOC": 0, "B-PER": 1, "O": 2}, 64)
    assert tok.id_to_token(rows[0][0]) == "[CLS]" and tok.id_to_token(rows[0][-1]) == "[SEP]"
    assert [labels[0][i] for i in firsts[0]] == [1, 2, 0]
    assert labels[0][0] == labels[0][-1] == IGNORE
    rows, labels, firsts = encode_tagged(tok, [(words, tags)], {"B-LOC": 0, "B-PER": 1, "O": 2}, 3)
    assert len(rows[0]) == 3 and tok.id_to_token(rows[0][-1]) == "[SEP]" and len(firsts[0]) == 1


def test_entities_are_read_as_seqeval_reads_bio():
    assert entities(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 1), ("LOC", 3, 3)}
    assert entities(["I-PER", "I-PER", "B-PER"]) == {("PER", 0, 1), ("PER", 2, 2)}  # I after O starts one
    assert entities(["B-PER", "I-LOC"]) == {("PER", 0, 0), ("LOC", 1, 1)}  # another type starts one
    scores = entity_scores([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "O"]])
    assert (scores["precision"], scores["recall"], scores["accuracy"]) == (1.0, 0.5, 0.75)


@pytest.mark.parametrize("content, message", [
    ('{"tokens": ["a", "b"], "tags": ["O"]}\n', "equal length"),
    ('{"words": ["a"], "tags": ["O"]}\n', '"tokens"'),
])
def test_bad_files_are_one_line_errors(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        read_tagged(tmp_path / "bad.jsonl")
    (tmp_path / "bad.conll").write_text("alice B-PER\nlonely\n")
    with pytest.raises(ValueError, match="bad.conll:2"):
        read_tagged(tmp_path / "bad.conll")


@pytest.mark.parametrize("head", ["TokenClassifier", "SequenceClassifier", "QuestionAnswering"])
def test_fine_tuned_heads_convert_both_ways_with_their_labels(encoder_dir, tmp_path, head):
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    from tformer.tokenizer import Tokenizer
    from tformer.train.encoder_models import HEADS, load_saved, load_with_head, read_head_meta, save_with_head

    n = None if head == "QuestionAnswering" else 3
    model = load_with_head(encoder_dir, HEADS[head], n)[0].eval()
    labels = None if n is None else ["B-LOC", "B-PER", "O"]
    save_with_head(model, tmp_path / "ours", Tokenizer.load(encoder_dir), labels)
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "tformer"]) == 0
    hf = getattr(transformers, f"BertFor{head.replace('Classifier', 'Classification')}").from_pretrained(
        tmp_path / "hf").eval()
    if labels:
        assert [hf.config.id2label[i] for i in range(3)] == labels == read_head_meta(tmp_path / "back")["id2label"]
    tokens = torch.tensor([[2, 8, 9, 10, 3]])
    back = load_saved(tmp_path / "back")[0]
    with torch.no_grad():
        ours, again = model(tokens), back(tokens)
        theirs = hf(input_ids=tokens)
    ours, again = (ours if isinstance(ours, tuple) else (ours,)), (again if isinstance(again, tuple) else (again,))
    ref = (theirs.start_logits, theirs.end_logits) if head == "QuestionAnswering" else (theirs.logits,)
    for a, b, c in zip(ours, again, ref):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a, b)
