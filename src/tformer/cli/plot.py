"""`tformer plot RUN_DIR [RUN_DIR ...]`: training curves of one or more runs as PNGs and an HTML report."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  tformer plot out/run                       PNGs and report.html in out/run/plots
  tformer plot out/a out/b --out cmp         two runs overlaid, written to cmp/

Reads each run's metrics.jsonl (written by tformer train and tformer finetune). Charts: loss and
validation loss, learning rate, gradient norm, tokens/s, MFU (GPU runs) and, for MoE models, expert
load; a chart is left out where no run logged its metric. report.html embeds the images."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="plot training runs' loss, lr, gradient norm, throughput, MFU, MoE load as PNGs and HTML",
        description="Draw the metrics of one or more training runs (overlaid) as PNG charts and one "
        "self-contained HTML report.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a training run's output directory (metrics.jsonl)")
    p.add_argument("--out", metavar="DIR", help="where to write (default: RUN_DIR/plots of the first run)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tformer.viz.report import plot_runs

    out = Path(args.out) if args.out else Path(args.runs[0]) / "plots"
    for path in plot_runs(args.runs, out):
        print(path)
    return 0
