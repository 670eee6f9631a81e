"""Where a compiled training step's GPU time goes: torch.profiler over a few steps, kernels grouped.

    python bench/profile_train.py [--shape gpt2|llama] [--scope model|blocks] [--steps 5]

Builds the shape of bench/train_throughput.py, trains it through tformer's objective and optimiser
(bf16 autocast, fused AdamW), warms up (compiles), profiles --steps steps, and prints the kernels by
total CUDA time and the share of each group (matmul, attention, loss, optimiser, other).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import shapes, tformer_variant  # noqa: E402

GROUPS = [("matmul", r"gemm|matmul|cutlass|sm90_xmma|nvjet|cublas"), ("attention", r"flash|fmha|attention|sdpa"),
          ("optimizer", r"adam|multi_tensor|foreach"), ("loss", r"cross_entropy|log_softmax|nll")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["gpt2", "llama"], default="gpt2")
    ap.add_argument("--scope", choices=["model", "blocks"], default="model")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    (config, B, T, _), = shapes(args.shape).values()
    model, fn, opt = tformer_variant(config, True, scope=args.scope)
    x = torch.randint(0, config.vocab_size, (B, T), device="cuda")
    y = torch.randint(0, config.vocab_size, (B, T), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in kernels)
    groups: dict[str, float] = defaultdict(float)
    for e in kernels:
        name = next((g for g, pattern in GROUPS if re.search(pattern, e.key, re.I)), "other (elementwise, norms)")
        groups[name] += e.device_time_total
    print(f"{args.shape}, scope {args.scope}: {total / args.steps / 1e3:.2f} ms of kernels a step")
    for name, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {name:28} {t / total:6.1%}  {t / args.steps / 1e3:8.2f} ms")
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=20, max_name_column_width=90))


if __name__ == "__main__":
    main()
