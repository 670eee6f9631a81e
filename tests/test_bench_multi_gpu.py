"""bench/multi_gpu.py on gloo (CPU): its torchrun runs train and its resume check continues the curve."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench" / "multi_gpu.py"


@pytest.mark.slow
def test_the_scaling_runs_and_the_resume_check_work_on_gloo(tmp_path):
    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--shapes", "tiny", "--steps", "4", "--json",
                    str(out)], check=True, cwd=tmp_path, capture_output=True)
    rows = json.loads(out.read_text())
    runs = [r for r in rows if "parallel" in r]
    assert [(r["gpus"], r["parallel"], r["ac"]) for r in runs] == [
        (1, "none", "none"), (1, "none", "full"), (2, "fsdp", "none"), (2, "fsdp", "full"), (2, "ddp", "none")]
    assert all(r["tokens_per_s"] > 0 and "speedup_vs_one" in r for r in runs if r["gpus"] == 2)
    (check,) = [r for r in rows if "check" in r]
    losses = check["losses (step, straight on N, resumed on 1)"]
    assert [s for s, _, _ in losses] == [5, 6, 7, 8]
    assert all(abs(a - b) < 1e-3 for _, a, b in losses)
