"""Training output: a progress bar, metrics.jsonl, TensorBoard scalars and loss.png."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from tqdm import tqdm

from tformer.io import atomic_write_text
from tformer.viz.loss import plot_loss


class MetricsLogger:
    """A run's logs from `start_step` on. Starting at step 0 replaces earlier logs (the loop refuses
    an out_dir holding an earlier run unless told to resume or overwrite it); a resumed run drops the
    rows and TensorBoard events past its checkpoint, since those steps are trained again."""

    def __init__(self, cfg, start_step: int, progress: bool = True):
        self.dir = Path(cfg.out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = self.dir / "metrics.jsonl"
        if start_step == 0:
            self.metrics_file.unlink(missing_ok=True)
            shutil.rmtree(self.dir / "tb", ignore_errors=True)
        else:
            keep = [row for row in _rows(self.metrics_file) if json.loads(row)["step"] <= start_step]
            atomic_write_text(self.metrics_file, "".join(row + "\n" for row in keep))
        self.tb = _tensorboard(self.dir / "tb", start_step + 1 if start_step else None) if cfg.tensorboard else None
        self.bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not progress, dynamic_ncols=True,
                        desc="train", unit="step")

    def _write(self, row: dict) -> None:
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def log_train(self, step: int, loss, lr: float, tokens_per_s: float, mfu: float | None,
                  extra: dict | None = None) -> None:
        """extra: more scalars for the row and TensorBoard (e.g. MoE expert-load stats)."""
        loss = float(loss)
        extra = extra or {}
        row = {"kind": "train", "step": step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s,
               "mfu": mfu, **extra, "time": time.time()}
        self._write(row)
        post = {"loss": f"{loss:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}
        if mfu is not None:
            post["mfu"] = f"{mfu:.1%}"
        if "peak_mem_gib" in extra:
            post["mem"] = f"{extra['peak_mem_gib']:.1f}GiB"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(step - self.bar.n)
        if self.tb:
            for key in ("loss", "lr", "tokens_per_s", *extra) + (("mfu",) if mfu is not None else ()):
                self.tb.add_scalar(f"train/{key}", row[key], step)

    def log_eval(self, step: int, metrics: dict, elapsed: float) -> None:
        row = {"kind": "eval", "step": step, **{k: v for k, v in metrics.items() if k != "step"},
               "elapsed_s": elapsed}
        self._write(row)
        shown = [f"val loss {metrics['val_loss']:.4f}", f"ppl {metrics['val_ppl']:.2f}"]
        if metrics.get("val_bpc") is not None:
            shown.append(f"{metrics['val_bpc']:.3f} bits/char")
        if "val_reward_margin" in metrics:  # DPO
            shown.append(f"reward margin {metrics['val_reward_margin']:.3f}, "
                         f"accuracy {metrics['val_reward_accuracy']:.1%}")
        self.bar.write(f"step {step}: {', '.join(shown)} ({elapsed:.0f}s)")
        if self.tb:
            for key, value in metrics.items():
                if key.startswith("val_") and isinstance(value, float):
                    self.tb.add_scalar(f"eval/{key}", value, step)
            self.tb.flush()
        plot_loss(self.metrics_file, self.dir / "loss.png")

    def close(self) -> None:
        self.bar.close()
        if self.tb:
            self.tb.close()


def _rows(path: Path) -> list[str]:
    """The rows of a metrics file; a line cut short by a killed process is left out."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            json.loads(line)
        except json.JSONDecodeError:
            continue
        rows.append(line)
    return rows


def _tensorboard(log_dir: Path, first_step: int | None):
    """A writer whose events from `first_step` on replace those an earlier writer logged there."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
        return None
    return SummaryWriter(str(log_dir), purge_step=first_step)
