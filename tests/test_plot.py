"""tformer plot: PNG charts and an HTML report from real training runs; the progress bar shows ETA."""

import json
import struct
from types import SimpleNamespace

import pytest

from tests.train.test_loop import TEXT, small_run
from tformer.cli import main
from tformer.train.logger import MetricsLogger
from tformer.train.loop import train


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A dense and a MoE run of 4 steps each (real `train`, CPU)."""
    tmp = tmp_path_factory.mktemp("runs")
    corpus = tmp / "corpus.txt"
    corpus.write_text(TEXT * 40)
    dirs = []
    for preset in ("tiny-llama", "tiny-moe"):
        cfg = small_run(corpus, tmp / preset, preset=preset, max_steps=4, eval_every=2, dropout=0.0)
        train(cfg, progress=False)
        dirs.append(tmp / preset / "run")
    return dirs


def test_the_loop_logs_the_gradient_norm(runs):
    rows = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    norms = [r["grad_norm"] for r in rows if r["kind"] == "train"]
    assert len(norms) == 4 and all(n > 0 for n in norms)


def test_plot_writes_pngs_of_the_expected_size_and_a_self_contained_report(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["plot", *map(str, runs), "--out", str(out)]) == 0
    written = capsys.readouterr().out.split()
    pngs = sorted(p.name for p in out.glob("*.png"))
    # no MFU chart: CPU runs log mfu = null
    assert pngs == ["grad_norm.png", "loss.png", "lr.png", "moe_load.png", "tokens_per_s.png"]
    assert sorted(written) == sorted(str(out / n) for n in [*pngs, "report.html"])
    for name in pngs:
        assert png_size(out / name) == (700, 400), name
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(pngs)
    assert "http" not in page  # nothing to fetch
    assert "tiny-llama/run" in page and "tiny-moe/run" in page  # runs named by their shortest distinct path
    assert page.count("<tr>") == 3  # header + one row per run


def test_plot_refuses_a_directory_without_metrics(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err


def test_progress_bar_shows_loss_throughput_and_eta(tmp_path):
    cfg = SimpleNamespace(out_dir=str(tmp_path), tensorboard=False, max_steps=100)
    logger = MetricsLogger(cfg, start_step=0, progress=True)
    logger.log_train(10, 2.5, 1e-3, 12345.0, None)
    line = str(logger.bar)
    logger.close()
    assert "10/100" in line and "loss=2.500" in line and "tok/s=12,345" in line
    assert "<" in line.split("[", 1)[1]  # tqdm's [elapsed<remaining, rate]: the ETA
