"""Where decode time goes: kernel time per generated token, tformer vs gpt-fast.

    python bench/profile_decode.py [--gpt-fast third_party/gpt-fast-src] [--new 64]

Runs bench/decode.py's batch-1 setup for both, warms up, then profiles one generate call and
prints GPU kernel time per token, wall time per token, and the most expensive kernels.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from decode import gpt_fast_runner, tformer_runner  # noqa: E402

from tformer.presets import get_preset  # noqa: E402


def report(name: str, run, new: int, rows: int) -> None:
    run()
    run()
    torch.cuda.synchronize()
    t = time.perf_counter()
    run()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / new
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        run()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu = sum(e.self_device_time_total for e in events) / 1e3 / new
    print(f"\n== {name}: wall {wall * 1e3:.3f} ms/token, GPU kernels {gpu:.3f} ms/token")
    events.sort(key=lambda e: -e.self_device_time_total)
    for e in events[:rows]:
        print(f"{e.self_device_time_total / 1e3 / new:8.4f} ms/tok {e.count / new:6.1f}/tok  {e.key[:90]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpt-fast", type=Path, default=Path("third_party/gpt-fast-src"))
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rows", type=int, default=14)
    ap.add_argument("--variants", default="tformer,gpt-fast", help="tformer, tformer-int8, tformer-int4, gpt-fast")
    args = ap.parse_args()
    config = get_preset("llama-3.2-1b").replace(tie_embeddings=False, max_seq_len=2048)
    prompt = torch.randint(0, config.vocab_size, (128,))
    for name in args.variants.split(","):
        if name == "gpt-fast":
            _, run = gpt_fast_runner(args.gpt_fast, config, prompt, args.new, 1)
        else:
            _, run = tformer_runner(config, prompt, args.new, 1, name.split("-")[1] if "-" in name else None)
        report(name, run, args.new, args.rows)


if __name__ == "__main__":
    main()
