"""Top-k sampling time on one GPU: tformer's one-kernel sampler against the torch.topk path, one process.

    python bench/sample.py [--vocab 128256] [--batch 1 8] [--k 200] [--temperature 0.8]

Each variant draws one token a row from (batch, vocab) bf16 logits, as a decode step does after the
output head: `kernel` is `tformer.kernels.sampling.topk_sample` (what `sample` takes on a GPU);
`torch` is `sample`'s own path without it (torch.topk, softmax over the k best, exponential race),
the same ops as gpt-fast's sampling. Times are CUDA-event medians over 200 calls after 20 warm-ups,
each call inside a CUDA graph of 20 calls (as in a graphed decode step, so launch cost is what the
GPU pays, not what the host does).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from tformer.generate import sampling
from tformer.generate.sampling import SamplingConfig, sample


def _torch_path(logits, cfg):
    original = sampling.use_topk_sample
    sampling.use_topk_sample = lambda *a: False
    try:
        return sample(logits, cfg)
    finally:
        sampling.use_topk_sample = original


def time_graphed(fn, calls: int = 20, repeats: int = 10) -> float:
    """Microseconds a call: fn captured `calls` times in one CUDA graph, the replay timed with events."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / calls)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--json")
    args = ap.parse_args()
    cfg = SamplingConfig(temperature=args.temperature, top_k=args.k)
    rows = []
    for batch in args.batch:
        logits = torch.randn(batch, args.vocab, device="cuda", dtype=torch.bfloat16) * 3
        for name, fn in (("kernel", lambda: sample(logits, cfg)), ("torch", lambda: _torch_path(logits, cfg))):
            us = time_graphed(fn)
            rows.append({"variant": name, "batch": batch, "vocab": args.vocab, "k": args.k, "us_per_call": us})
            print(f"{name:7s} batch {batch}: {us:8.1f} us a call", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
