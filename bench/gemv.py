"""Batch-1 matrix-vector products of the Llama-3.2-1B decode step, one kernel choice at a time.

    PYTHONPATH=src python bench/gemv.py [--m 1]

For each weight shape of the decode step (wqkv, wo, w1/w3, w2, the untied head) and each way of
computing y = x W^T with a bf16, int8 or int4 weight, the GPU time of one call, measured inside a
CUDA graph of 50 calls (no launch overhead; median of 20 replays), and the bandwidth it implies
from the bytes of the weight as stored. Variants:
  bf16-linear     F.linear, eager (cuBLAS)
  bf16-compiled   F.linear under torch.compile
  bf16-reduce     (x[:, None, :] * W).sum(-1) compiled: inductor's own reduction kernel
  int8-linear     F.linear(x, Wq.to(bf16)) * s compiled (tformer's Int8Linear, gpt-fast's form)
  int8-reduce     (x[:, None, :] * Wq.to(bf16)).sum(-1) * s compiled
  int4-tinygemm   aten._weight_int4pack_mm, group 64 (tformer's Int4Linear)
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F

from tformer.quantize.int4 import Int4Linear
from tformer.quantize.int8 import quantize_int8

inductor_config.coordinate_descent_tuning = True

SHAPES = {"wqkv": (3072, 2048), "wo": (2048, 2048), "w1": (8192, 2048), "w2": (2048, 8192), "head": (128256, 2048)}


def graph_time(fn, x, calls: int = 50, replays: int = 20) -> float:
    """Seconds per call of fn(x), from a CUDA graph of `calls` calls."""
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn(x)
    times = []
    for _ in range(replays):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / calls)
    return statistics.median(times)


def variants(w: torch.Tensor):
    """name -> (fn(x), bytes of the weight as stored)."""
    q, s = quantize_int8(w)
    lin4 = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="cuda", dtype=torch.bfloat16)
    lin4.weight.data.copy_(w)
    int4 = Int4Linear.from_linear(lin4, group_size=64)
    compile_ = torch.compile
    return {
        "bf16-linear": (lambda x: F.linear(x, w), w.numel() * 2),
        "bf16-compiled": (compile_(lambda x: F.linear(x, w)), w.numel() * 2),
        "bf16-reduce": (compile_(lambda x: (x[:, None, :] * w).sum(-1)), w.numel() * 2),
        "int8-linear": (compile_(lambda x: F.linear(x, q.to(x.dtype)) * s), q.numel() + s.numel() * 2),
        "int8-reduce": (compile_(lambda x: (x[:, None, :] * q.to(x.dtype)).sum(-1) * s), q.numel() + s.numel() * 2),
        "int4-tinygemm": (int4, w.numel() // 2 + w.numel() // 64 * 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=1, help="rows of x (the decode batch)")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x, w).float()
        for variant, (fn, nbytes) in variants(w).items():
            err = ((fn(x).float() - ref).norm() / ref.norm()).item()
            t = graph_time(fn, x)
            rows.append({"shape": name, "variant": variant, "us": round(t * 1e6, 2), "GB/s": round(nbytes / t / 1e9),
                         "rel_err": round(err, 4)})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'shape':6} " + " ".join(f"{v:>14}" for v in dict.fromkeys(r["variant"] for r in rows)))
    for name in SHAPES:
        cells = [f"{r['us']:>7.1f}us {r['GB/s']:>4}" for r in rows if r["shape"] == name]
        print(f"{name:6} " + " ".join(f"{c:>14}" for c in cells))


if __name__ == "__main__":
    main()
