"""Loss curves from a run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from tformer.io import atomic_path


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics_file: str | Path, png: str | Path) -> Path:
    """Train and validation loss against step, written atomically to `png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_file)
    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train", lw=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, png)


def save_png(fig, png: str | Path) -> Path:
    """Lay out a matplotlib figure, write it to `png` atomically, and close it (also on failure)."""
    import matplotlib.pyplot as plt

    png = Path(png)
    try:
        fig.tight_layout()
        with atomic_path(png) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return png
