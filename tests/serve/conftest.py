"""A real `tformer serve` process on a free loopback port, shared by the server tests of this folder:
a tiny Llama-shaped checkpoint with a byte-level BPE (ChatML markers special), an API key, and small
limits so that the 429 and 503 answers are reachable."""

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

WORDS = "the cat sat on a mat and the dog ran to the park while birds sang in trees".split()
API_KEY = "test-key-123"
MODEL = "tiny"
CONTEXT = 1024
LIMITS = dict(max_running=4, max_waiting=4, max_streams=12, max_body_bytes=65536)
STARTUP_S = 120


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def metrics(self) -> dict[str, float]:
        """/metrics as {'name{labels}': value} (bucket lines left out)."""
        import httpx

        text = httpx.get(f"{self.url}/metrics", headers=auth(), timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "_bucket{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def engine(self, stat: str) -> float:
        return self.metrics()[f'tformer_engine_{stat}{{model="{MODEL}"}}']

    def wait_idle(self, timeout_s: float = 15) -> dict[str, float]:
        """The metrics once no request runs or waits and no KV block is held; fails after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            m = self.metrics()
            held = [m[f'tformer_engine_{k}{{model="{MODEL}"}}'] for k in ("running", "waiting", "blocks_used")]
            if held == [0, 0, 0]:
                return m
            assert time.monotonic() < deadline, f"still running, waiting, holding blocks: {held}"
            time.sleep(0.05)


def auth(key: str = API_KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="package")
def checkpoint(tmp_path_factory) -> Path:
    import tformer
    from tformer.models import build_model
    from tformer.tokenizer import Tokenizer
    from tests.conftest import tiny_config

    path = tmp_path_factory.mktemp("serve") / MODEL
    text = " ".join(WORDS * 30) + " héllo wörld"
    tok = Tokenizer.train_bpe([text], vocab_size=320,
                              special_tokens=("<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"))
    torch.manual_seed(0)
    tformer.save(build_model(tiny_config(vocab_size=320, max_seq_len=CONTEXT)), path, tokenizer=tok)
    return path


@pytest.fixture(scope="package")
def server(checkpoint, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    limits = [f"--{k.replace('_', '-')}={v}" for k, v in LIMITS.items()]
    cmd = [sys.executable, "-c", "import sys; from tformer.cli import main; sys.exit(main())", "serve",
           str(checkpoint), "--port", str(port), "--api-key", API_KEY, "--device", "cpu", "--block-size", "16",
           "--log-level", "warning", *limits]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    running = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        _wait_healthy(running)
        yield running
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait_healthy(server: Server) -> None:
    import httpx

    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"tformer serve exited with {server.process.returncode}:\n{server.log.read_text()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"tformer serve did not answer /health within {STARTUP_S} s:\n{server.log.read_text()}")


def greedy_reference(checkpoint: Path, ids: list[int], max_new_tokens: int) -> list[int]:
    """The model's greedy continuation through tformer.inference's generate, cut after EOS."""
    from tformer.checkpoint import load
    from tformer.inference import SamplingConfig, generate
    from tformer.tokenizer import Tokenizer

    eos = Tokenizer.load(checkpoint).eos_id
    out = generate(load(checkpoint), [ids], max_new_tokens, SamplingConfig(temperature=0))[0]
    return out[: out.index(eos) + 1] if eos in out else out
