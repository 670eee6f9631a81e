"""Where a serving decode step's time goes: torch.profiler over ServeEngine steps at a full batch.

    PYTHONPATH=src python bench/profile_serve.py [--rows 64] [--prompt 300] [--tiny]

The Llama-3.2-1B shape of bench/serve.py (random bf16 weights); `rows` greedy requests of `prompt`
random tokens are admitted and prefilled, then decode steps are profiled. Prints the operators by
device time and the step's wall time.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tformer.models import build_model
from tformer.presets import get_preset
from tformer.serve.engine import GenerationRequest, ServeEngine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=300)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = get_preset("llama-3.2-1b").replace(tie_embeddings=False, max_seq_len=2048)
    if args.tiny:
        config = config.replace(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                                vocab_size=512, max_seq_len=512)
    torch.manual_seed(0)
    model = build_model(config, device=device, dtype=torch.bfloat16 if device == "cuda" else None).eval()
    engine = ServeEngine(model, max_running=args.rows)
    for i in range(args.rows):
        prompt = torch.randint(config.vocab_size, (args.prompt,)).tolist()
        engine.submit(GenerationRequest(prompt, 1000 if not args.tiny else 100, temperature=0.8, top_k=200, seed=i))
    while any(s.cached < s.prefill_end for s in engine._running) or engine._waiting:
        engine.step()
    for _ in range(5):
        engine.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        wall = (time.perf_counter() - start) / args.steps
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25))
    print(f"rows {len(engine._running)}  wall per step {wall * 1e3:.2f} ms  (profiled)")


if __name__ == "__main__":
    main()
