"""The embedded default run (the README's main job) keeps its quality.

This trains the default model exactly as `tformer train` does (350 steps on Shakespeare's plays,
CPU, about 2-3 minutes on 2 cores including the tokenizer) and checks bits per character on the
whole validation split. Measured 2026-11-23 on the 2-core CPU machine: 2.266 bits/char (nanoGPT's
README CPU recipe reaches 2.731 on the same split; see BENCHMARKS.md). The pin is the issue's
target, 2.30: a change that makes the default learn less per step fails here.
"""

import torch

from tformer.train.config import TrainConfig
from tformer.train.loop import train


def test_default_run_reaches_target_bits_per_char(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), tensorboard=False,
                      sample_tokens=0, threads=min(2, torch.get_num_threads()))
    result = train(cfg, progress=False)
    assert result.step == cfg.max_steps
    assert result.val_bpc <= 2.30, f"default run reached {result.val_bpc:.3f} bits/char (pinned at 2.30)"
