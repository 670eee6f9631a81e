"""The Shakespeare modernisation task (tformer.data.seq2seq): the rules do what their docstring says,
the dataset is deterministic with disjoint splits; greedy `seq2seq_generate` equals HF T5
`generate(num_beams=1)`; a tiny end-to-end run of bench/seq2seq_demo.py's code path scores BLEU."""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from tests.reference.test_hf_t5 import TINY  # noqa: E402
from tformer.convert.hf_t5 import load_hf_t5  # noqa: E402
from tformer.data.seq2seq import (bare_form, build_pairs, modernisation_task, modernise, split_pairs,  # noqa: E402
                                  third_person, write_splits)
from tformer.inference.sampling import SamplingConfig  # noqa: E402
from tformer.inference.seq2seq import seq2seq_generate  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("line, modern", [
    ("Thou art a villain, and thy heart is black.", "You are a villain, and your heart is black."),
    ("Art thou mad? 'Tis so, methinks.", "Are you mad? It is so, I think."),
    ("What say'st thou? I prithee, speak.", "What say you? I pray you, speak."),
    ("Mine eyes and thine ear; the book is thine.", "My eyes and your ear; the book is yours."),
    ("He speaketh well, and THOU ART the fairest.", "He speaks well, and YOU ARE the fairest."),
    ("Nay, o'er the hills and whither thou goest.", "No, over the hills and where you go."),
    ("Hath he not doth, dost thou know'st?", "Has he not does, do you know?"),
    ("The art of the forest is the best rest.", "The art of the forest is the best rest."),  # no thou: kept
    ("His teeth, and Macbeth; the twentieth.", "His teeth, and Macbeth; the twentieth."),  # not -eth verbs
    ("mine own, thine own", "my own, your own"),
])  # fmt: skip
def test_rules_on_examples(line, modern):
    assert modernise(line) == modern


def test_spelling_rules():
    assert [third_person(w) for w in ["speaketh", "loveth", "toucheth", "passeth", "sitteth", "flieth", "draweth",
                                      "chargeth", "resembleth", "falleth"]] == \
        ["speaks", "loves", "touches", "passes", "sits", "flies", "draws", "charges", "resembles", "falls"]
    assert [bare_form(w) for w in ["lovest", "knowest", "liest", "criest", "goest", "seest", "makest", "know'st",
                                   "lov'st", "be'st", "sittest"]] == \
        ["love", "know", "lie", "cry", "go", "see", "make", "know", "love", "be", "sit"]


def test_pairs_and_splits():
    lines = ["Thou art here.", "Thou  art here.", "You are here.", "Hath he come?", "Go.", "I hath"]
    pairs = build_pairs(lines, min_words=2, max_words=5)
    assert pairs == [{"source": "Thou art here.", "target": "You are here."},  # whitespace-duplicate dropped,
                     {"source": "Hath he come?", "target": "Has he come?"},  # unchanged and short lines too
                     {"source": "I hath", "target": "I has"}]
    train, test = split_pairs(pairs, 1, seed=3)
    assert len(test) == 1 and len(train) == 2 and sorted(map(str, train + test)) == sorted(map(str, pairs))
    with pytest.raises(ValueError, match="n_test"):
        split_pairs(pairs, 3)
    with pytest.raises(ValueError, match="min_words"):
        build_pairs(lines, min_words=4, max_words=2)


@pytest.fixture(scope="module")
def task():
    return modernisation_task(n_test=200, seed=0)


def test_task_is_deterministic_with_disjoint_splits(task, tmp_path):
    train, test = task
    assert (train, test) == modernisation_task(n_test=200, seed=0)
    assert len(test) == 200 and len(train) > 10_000
    sources = [p["source"] for p in train + test]
    assert len(set(sources)) == len(sources)  # so no line is in both splits
    assert all(p["target"] == modernise(p["source"]) != p["source"] for p in test)
    assert modernisation_task(n_test=200, seed=1)[1] != test
    paths = write_splits(tmp_path, train[:3], test[:2])
    assert [json.loads(x) for x in paths[1].read_text().splitlines()] == test[:2]


@torch.no_grad()
def test_greedy_equals_hf_t5_generate(tmp_path):
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**{**TINY, "num_decoder_layers": 2})).eval()
    for p in hf.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    hf.shared.weight.mul_(0.3)  # as tests/test_beam_seq2seq.py: the third source meets the end id early
    hf.save_pretrained(tmp_path)
    ours = load_hf_t5(tmp_path)
    sources, eos = [[5, 9, 14, 3, 22, 7], [31, 2, 8], [7, 40, 41, 42, 43, 44, 45, 46, 47]], [24]
    outputs = seq2seq_generate(ours, sources, 12, start_id=0, eos_ids=eos)  # batched, right-padded
    ended = 0
    for source, out in zip(sources, outputs):
        ref = hf.generate(input_ids=torch.tensor([source]), decoder_start_token_id=0, max_new_tokens=12,
                          do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=0)[0, 1:].tolist()
        assert ref[: len(out)] == out and set(ref[len(out):]) <= {0}
        ended += out[-1] in eos
    assert ended == 1 and ours.cache_slots == 0  # one row stops early, the others run to max_new_tokens
    def sampled(seed):
        gen = torch.Generator().manual_seed(seed)
        return seq2seq_generate(ours, sources, 6, 0, sampling=SamplingConfig(1.0, top_k=5), generator=gen)

    assert sampled(1) == sampled(1) and sampled(1) != [out[:6] for out in outputs]  # seeded, not greedy
    with pytest.raises(ValueError, match="max_new_tokens"):
        seq2seq_generate(ours, sources, 0, 0)


def test_demo_end_to_end_smoke(tmp_path, monkeypatch, capsys):
    """A very small model, a few steps, the demo's own code path down to sacrebleu's scores."""
    pytest.importorskip("sacrebleu")
    monkeypatch.syspath_prepend(str(BENCH))
    import seq2seq_demo

    out = tmp_path / "r.json"
    args = ["--steps", "3", "--dim", "32", "--layers", "1", "--heads", "2", "--ffn", "64", "--vocab", "400",
            "--n-test", "8", "--train-pairs", "300", "--beams", "2", "--batch-size", "8", "--json", str(out),
            "--write-data", str(tmp_path)]
    assert seq2seq_demo.main(args) == 0
    results = json.loads(out.read_text())
    assert results["train"]["steps"] == 3 and results["task"]["train_pairs"] == 300
    for name in ("copy_source", "greedy", "beam2"):
        assert 0 <= results[name]["bleu"] <= 100 and results[name]["bleu_signature"].startswith("nrefs:1")
    assert results["copy_source"]["exact_match"] == 0  # every pair changes the line
    assert len((tmp_path / "test.jsonl").read_text().splitlines()) == 8
    with pytest.raises(SystemExit):
        seq2seq_demo.parse_args(["--dim", "0"])
    assert "--dim must be > 0" in capsys.readouterr().err
    sys.modules.pop("seq2seq_demo", None)
