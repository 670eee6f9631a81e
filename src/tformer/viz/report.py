"""Training reports: the curves of one or more runs' metrics.jsonl as PNGs and one self-contained HTML page.

Charts (each drawn where some run logged its metric; runs overlaid, one colour each):
  loss.png        train loss (thin) and validation loss (dots)
  lr.png          learning rate
  grad_norm.png   total gradient norm before clipping
  tokens_per_s.png, mfu.png
  moe_load.png    MoE expert load: the most and least loaded expert over layers / mean load (1 = balanced)
report.html embeds the PNGs as base64 data URLs and a table of each run's last step, last train loss and
best validation loss, so the file opens anywhere with no other files and no network.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from tformer.io import atomic_write_text
from tformer.viz.loss import read_metrics, save_png

FIGSIZE, DPI = (7, 4), 100  # 700 x 400 pixels
# (file stem, title, y label, [(row kind, metric, style suffix)], log scale)
CHARTS = [
    ("loss", "loss", "loss (nats/token)", [("train", "loss", ""), ("eval", "val_loss", " (validation)")], False),
    ("lr", "learning rate", "lr", [("train", "lr", "")], False),
    ("grad_norm", "gradient norm (before clipping)", "total L2 norm", [("train", "grad_norm", "")], True),
    ("tokens_per_s", "throughput", "tokens/s", [("train", "tokens_per_s", "")], False),
    ("mfu", "model FLOP utilisation", "MFU", [("train", "mfu", "")], False),
    ("moe_load", "MoE expert load (1 = balanced)", "load / mean load",
     [("train", "moe_load_max", " (max)"), ("train", "moe_load_min", " (min)")], False),
]


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's shortest trailing path that no other run shares ("a/run", "b/run"), its folder name if unique."""
    parts = [d.resolve().parts for d in run_dirs]
    labels = []
    for p in parts:
        n = 1
        while n < len(p) and sum(q[-n:] == p[-n:] for q in parts) > 1:
            n += 1
        labels.append("/".join(p[-n:]))
    return labels


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Write the charts (see the module docstring) and report.html to `out_dir`; returns their paths.
    Raises FileNotFoundError for a run without metrics.jsonl."""
    run_dirs = [Path(d) for d in run_dirs]
    runs = {}
    for label, d in zip(run_labels(run_dirs), run_dirs):
        if not (d / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{d} has no metrics.jsonl: give the out_dir of a `tformer train` run")
        runs[label] = read_metrics(d / "metrics.jsonl")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = [p for chart in CHARTS if (p := _chart(runs, out_dir, *chart)) is not None]
    page = out_dir / "report.html"
    atomic_write_text(page, report_html(runs, pngs))
    return [*pngs, page]


def _series(rows: list[dict], kind: str, key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in rows if r.get("kind") == kind and r.get(key) is not None]
    return ([s for s, _ in points], [v for _, v in points])


def _chart(runs: dict[str, list[dict]], out_dir: Path, stem: str, title: str, ylabel: str, lines, log: bool):
    """One PNG of `lines` for every run, or None where no run logged them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(label, i, kind, suffix, _series(rows, kind, key))
              for i, (label, rows) in enumerate(runs.items()) for kind, key, suffix in lines]
    series = [s for s in series if s[-1][0]]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for label, i, kind, suffix, (steps, values) in series:
        style = dict(marker="o", ms=3, lw=1.5) if kind == "eval" else dict(lw=1, alpha=0.85)
        ax.plot(steps, values, color=f"C{i % 10}", ls="--" if "(min)" in suffix else "-",
                label=f"{label}{suffix}", **style)
    if log and all(v > 0 for *_, (_, values) in series for v in values):
        ax.set_yscale("log")
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, out_dir / f"{stem}.png")


def report_html(runs: dict[str, list[dict]], pngs: list[Path]) -> str:
    """A page with a summary table of the runs and every PNG inline."""
    head = "<tr><th>run</th><th>steps</th><th>last train loss</th><th>best val loss</th></tr>"
    rows = []
    for label, metrics in runs.items():
        steps, losses = _series(metrics, "train", "loss")
        _, val = _series(metrics, "eval", "val_loss")
        cells = [label, f"{steps[-1]:,}" if steps else "-", f"{losses[-1]:.4f}" if losses else "-",
                 f"{min(val):.4f}" if val else "-"]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    images = "\n".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{p.name}</figcaption></figure>" for p in pngs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tformer training report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}} td:first-child{{text-align:left}}
figure{{display:inline-block;margin:1em}}</style></head>
<body><h1>Training report</h1>
<table>{head}{''.join(rows)}</table>
{images}
</body></html>
"""
