"""Top-k sampling time on one GPU: tformer's sampling kernels against the torch.topk path, one process.

    python bench/sample.py [--vocab 128256] [--batch 1 8] [--k 200] [--temperature 0.8]

Each variant draws one token a row from (batch, vocab) bf16 logits, as a decode step does after the
output head: `kernel` is `tformer.inference.kernels.sampling.topk_sample` (what `sample` takes with a
decode engine's workspace on a GPU; seeds drawn a call, no `step`); `torch` is `sample`'s own path
without a workspace (torch.topk for the k-th largest logit, the rest masked, softmax, exponential race),
the same ops as gpt-fast's sampling. Times: 20 calls in one CUDA graph (as in a graphed decode step, so
launch cost is what the GPU pays, not what the host does), CUDA-event median of 20 replays
(`bench/gemv.py`'s `graph_time`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gemv import graph_time  # noqa: E402

from tformer.inference.sampling import SamplingConfig, sample  # noqa: E402
from tformer.inference.workspace import Workspace  # noqa: E402


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
        ws = Workspace("cuda", batch, n_heads=1)  # the sampler's counters and seeds, as an engine holds them
        for name, fn in (("kernel", lambda: sample(logits, cfg, workspace=ws)), ("torch", lambda: sample(logits, cfg))):
            us = graph_time([fn] * 20) * 1e6
            rows.append({"variant": name, "batch": batch, "vocab": args.vocab, "k": args.k, "us_per_call": us})
            print(f"{name:7s} batch {batch}: {us:8.1f} us a call", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
