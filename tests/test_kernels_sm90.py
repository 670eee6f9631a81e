"""tformer's Triton kernels compile for the H100 (sm_90) on a machine without a GPU.

The compiles run in a child Python process with the interpreter off (tests/sm90_compile.py holds
the cases and their PTX checks): without a GPU, tests/conftest.py turns TRITON_INTERPRET on for this
process, under which `@triton.jit` gives interpreted functions that the compiler cannot take.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sm90_compile import CASES

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"matvec", "rows", "cached_attention", "cached_attention_rows", "digit", "draw", "record"}


def test_kernels_compile_for_sm90_with_pdl():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, "-m", "tests.sm90_compile"], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=900)
    lines = child.stdout.strip().splitlines()
    assert lines, f"the compile child printed no results (exit {child.returncode}):\n{child.stderr[-4000:]}"
    results = json.loads(lines[-1])
    if "skip" in results:
        pytest.skip(results["skip"])
    failed = {name: result for name, result in results.items() if result != "ok"}
    assert not failed, "\n\n".join(f"{name}: {result}" for name, result in failed.items())
    assert set(results) == set(CASES), f"cases that did not run: {sorted(set(CASES) - set(results))}"
    assert {name.split()[0] for name in CASES} == KERNELS  # no kernel left out of the cases
    assert child.returncode == 0, child.stderr[-4000:]
