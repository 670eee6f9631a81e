"""Batch-1 matrix-vector products of the Llama-3.2-1B decode step, one kernel choice at a time.

    PYTHONPATH=src python bench/gemv.py [--copies 16] [--rows 6] [--variants bf16-cublas,bf16-triton]

--rows M multiplies M rows of x at once (a speculative verify, a batch of M sequences): the
triton variants then take the tensor-core kernel for a few rows.

For each weight shape of the decode step (wqkv, wo, w1/w3, w2, the untied head) and each way of
computing y = W x with a bf16, int8 or int4 weight: the GPU time of one call, measured inside a
CUDA graph that calls it once on each of --copies different weights (as a decode step walks the
layers, so the weights come from HBM, not the 50 MB L2 cache; median of 20 replays), and the
bandwidth that implies from the bytes of the weight as stored. Variants:
  bf16-cublas     F.linear, eager (cuBLAS)
  bf16-inductor   F.linear under torch.compile (coordinate-descent tuning)
  int8-inductor   F.linear(x, Wq.to(bf16)) * s under torch.compile (gpt-fast's form)
  int4-tinygemm   aten._weight_int4pack_mm, group 64
  {bf16,int8,int4}-triton   tformer.inference.kernels.matvec (int4: group 64), with programmatic dependent
                  launch on Hopper (each call's first weight tile loads while the one before finishes;
                  TFORMER_PDL=0 turns it off here too)
  {bf16,int8}-triton-nopdl  the same with matvec(..., pdl=False)
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F

from tformer.inference.kernels import matvec
from tformer.inference.workspace import Workspace
from tformer.quantize.int4 import Int4Linear, dequantize_int4, quantize_int4
from tformer.quantize.int8 import dequantize_int8, quantize_int8

inductor_config.coordinate_descent_tuning = True

SHAPES = {"wqkv": (3072, 2048), "wo": (2048, 2048), "w1": (8192, 2048), "w2": (2048, 8192), "head": (128256, 2048)}


def graph_time(calls, replays: int = 20) -> float:
    """Seconds per call, from a CUDA graph running every call in `calls` once."""
    for _ in range(2):
        for c in calls:
            c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    times = []
    for _ in range(replays):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / len(calls))
    return statistics.median(times)


def variants(w: torch.Tensor, counts: torch.Tensor):
    """name -> (fn(x), bytes of the weight as stored, the weight it stands for). counts: the merge
    counters of a few-row product (a decode engine's workspace holds them; fresh ones a call would add
    a memset kernel)."""
    N, K = w.shape
    q8, s8 = quantize_int8(w)
    p4, s4, z4 = quantize_int4(w, 64)
    lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
    lin.weight.data.copy_(w)
    tiny = Int4Linear.from_linear(lin, group_size=64)
    del lin
    b8, b4 = q8.numel() + s8.numel() * 2, p4.numel() + s4.numel() * 4
    w8, w4 = dequantize_int8(q8, s8), dequantize_int4(p4, s4, z4, 64)
    return {
        "bf16-cublas": (lambda x: F.linear(x, w), w.numel() * 2, w),
        "bf16-inductor": (torch.compile(lambda x: F.linear(x, w)), w.numel() * 2, w),
        "int8-inductor": (torch.compile(lambda x: F.linear(x, q8.to(x.dtype)) * s8), b8, w8),
        "int4-tinygemm": (lambda x: torch.ops.aten._weight_int4pack_mm(x, tiny.int4pack, 64, tiny.scales_and_zeros),
                          b4, w4),
        "bf16-triton": (lambda x: matvec(x, w, counts=counts), w.numel() * 2, w),
        "int8-triton": (lambda x: matvec(x, q8, s8, fmt="int8", counts=counts), b8, w8),
        "int4-triton": (lambda x: matvec(x, p4, s4, z4, fmt="int4", group_size=64, counts=counts), b4, w4),
        "bf16-triton-nopdl": (lambda x: matvec(x, w, counts=counts, pdl=False), w.numel() * 2, w),
        "int8-triton-nopdl": (lambda x: matvec(x, q8, s8, fmt="int8", counts=counts, pdl=False), b8, w8),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=16, help="different weights per shape, called in turn")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--rows", type=int, default=1, help="rows of x (at most tformer.inference.kernels.gemv.MAX_ROWS)")
    ap.add_argument("--variants", help="comma-separated subset of the variants (default: all)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    counts = Workspace("cuda", args.rows, n_heads=1).merge
    rows = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        x = torch.randn(args.rows, k, device="cuda", dtype=torch.bfloat16)
        copies = [variants(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, counts)
                  for _ in range(args.copies if name != "head" else 4)]
        for variant in args.variants.split(",") if args.variants else copies[0]:
            fn, nbytes, ref_w = copies[0][variant]
            ref = F.linear(x.float(), ref_w.float())
            err = ((fn(x).float() - ref).norm() / ref.norm()).item()
            t = graph_time([lambda f=c[variant][0]: f(x) for c in copies])
            rows.append({"shape": name, "rows": args.rows, "variant": variant, "us": round(t * 1e6, 2), "GB/s": round(nbytes / t / 1e9),
                         "rel_err": round(err, 4)})
            print(json.dumps(rows[-1]), flush=True)
        del copies
        torch.cuda.empty_cache()
    print(f"\ndevice: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name in dict.fromkeys(r["shape"] for r in rows):
        print(name + ": " + ", ".join(f"{r['variant']} {r['us']:.1f}us {r['GB/s']}GB/s"
                                      for r in rows if r["shape"] == name))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
