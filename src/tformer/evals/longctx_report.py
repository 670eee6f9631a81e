"""What a long-context run writes: a table, a heatmap per task (depth x length) and a JSON of every
number (tformer.evals.longctx_run.LongCtxResult), each file written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from tformer.evals.longctx_run import LongCtxResult
from tformer.io import atomic_write_text
from tformer.viz.loss import save_png


def format_length(n: int) -> str:
    """1024 -> "1k", 1536 -> "1536", 131072 -> "128k" (k = 1024, as in the --lengths option)."""
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _effective(n: int | None) -> str:
    return "none" if n is None else format_length(n)


def table(result: LongCtxResult) -> str:
    """Accuracy per task and length (averaged over depths) and each task's effective length."""
    names = [format_length(n) for n in result.lengths]
    width = max([len(t) for t in result.tasks] + [len("average")])
    lines = [f"{'task':<{width}}  " + "  ".join(f"{n:>6}" for n in names) + "  effective"]
    for task in [*result.tasks, None]:
        row = result.by_length(task)
        lines.append(f"{task or 'average':<{width}}  " + "  ".join(f"{row[n]:6.2f}" for n in result.lengths)
                     + f"  {_effective(result.effective_length(task)):>9}")
    lines.append(f"effective length: the longest length with accuracy >= {result.threshold:g} there and at every "
                 "shorter length")
    return "\n".join(lines)


def to_dict(result: LongCtxResult, about: dict | None = None) -> dict:
    """Every number of the run: the grid per task, accuracy by length, effective lengths, each example."""
    tasks = {}
    for task in result.tasks:
        tasks[task] = {
            "accuracy": [[result.accuracy(task, n, d) for n in result.lengths] for d in result.depths],
            "by_length": {str(n): a for n, a in result.by_length(task).items()},
            "effective_length": result.effective_length(task),
        }
    return {
        **(about or {}),
        "threshold": result.threshold,
        "lengths": result.lengths,
        "depths": result.depths,
        "layout": "tasks[t].accuracy[depth index][length index]",
        "tasks": tasks,
        "average": {"by_length": {str(n): a for n, a in result.by_length().items()},
                    "effective_length": result.effective_length()},
        "examples": result.records,
    }


def heatmap(result: LongCtxResult, task: str, png: str | Path, title: str = "") -> Path:
    """Accuracy of `task` by depth (rows, 0 = start of the haystack) and length (columns), annotated,
    with the effective length in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [[result.accuracy(task, n, d) for n in result.lengths] for d in result.depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(result.lengths), 1.2 + 0.5 * len(result.depths)), dpi=110)
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(result.lengths)), [format_length(n) for n in result.lengths])
    ax.set_yticks(range(len(result.depths)), [f"{d:.0%}" for d in result.depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    heading = f"{task}: effective length {_effective(result.effective_length(task))} (>= {result.threshold:g})"
    ax.set_title(f"{title}\n{heading}" if title else heading, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05, label="accuracy")
    return save_png(fig, png)


def write(result: LongCtxResult, out: str | Path, about: dict | None = None, title: str = "") -> list[Path]:
    """out/longctx.json and out/longctx_<task>.png for each task; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [heatmap(result, task, out / f"longctx_{task}.png", title) for task in result.tasks]
    json_path = out / "longctx.json"
    atomic_write_text(json_path, json.dumps(to_dict(result, about), indent=1) + "\n")
    return [*paths, json_path]
