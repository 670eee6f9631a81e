"""Data-parallel scaling: `tformer train` on one GPU and under `torchrun` on N, the same per-GPU batch.

    python bench/multi_gpu.py [--gpus 2] [--shapes 1b,3b] [--steps 30] [--json FILE]
    python bench/multi_gpu.py --device cpu --shapes tiny --steps 6     # the same runs on gloo (a check)

Each row is one `tformer train` run on the bundled corpus (bf16 autocast or FSDP2's bf16 policy,
compiled, random init), read back from its metrics.jsonl: tokens/s over all GPUs (the median of the
log intervals after the first, which holds compilation), MFU per GPU and peak memory on rank 0.
Rows: one GPU with and without activation checkpointing, FSDP2 on N GPUs with and without it, and
DDP on N GPUs for the 1B shape. Shapes: Llama-3.2-1B's (vocabulary 128256) at B4 x T2048 per GPU and
Llama-3.2-3B's at B2 x T2048, as bench/train_throughput.py. Then, for each shape but 3B, the resume
check (`resume_check`): a sharded checkpoint saved by FSDP2 on N GPUs resumed on one GPU, its losses
beside those of the run that went on on N GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPES = {  # name -> (train flags, per-GPU batch, seq_len)
    "1b": (["--preset", "llama-3.2-1b", "--model.vocab-size", "128256"], 4, 2048),
    "3b": (["--preset", "llama-3.2-1b", "--model.vocab-size", "128256", "--model.dim", "3072", "--model.n-layers",
            "28", "--model.n-heads", "24", "--model.n-kv-heads", "8", "--model.ffn-dim", "8192"], 2, 2048),
    "tiny": (["--model.dim", "64", "--model.n-layers", "2", "--model.n-heads", "4"], 4, 64),
}


def train(out: Path, gpus: int, flags: list[str], device: str) -> list[dict]:
    """One `tformer train` run (under torchrun when gpus > 1); its metrics.jsonl rows."""
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus)]
              if gpus > 1 else [sys.executable])
    cmd = [*launch, "-m", "tformer", "train", "--out-dir", str(out), "--device", device, "--no-tensorboard",
           "--sample-tokens", "0", *flags]
    print("$", " ".join(cmd[1:]), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"tformer train exited {done.returncode}:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summary(rows: list[dict], gpus: int) -> dict:
    train_rows = [r for r in rows if r.get("kind") == "train"]
    timed = train_rows[1:] or train_rows  # the first interval holds compilation
    mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in timed)
    return {"tokens_per_s": round(tokens_per_s), "tokens_per_s_per_gpu": round(tokens_per_s / gpus),
            "mfu": round(statistics.median(mfu), 3) if mfu else None,
            "peak_mem_gib": round(max((r.get("peak_mem_gib", 0.0) for r in timed), default=0.0), 2),
            "final_loss": round(train_rows[-1]["loss"], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--shapes", default="1b,3b")
    ap.add_argument("--steps", type=int, default=30, help="optimiser steps a run (logged every steps/5)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu (gloo) to check the runs")
    ap.add_argument("--no-resume", action="store_true", help="leave out the resume check")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = []
    work = Path(tempfile.mkdtemp(prefix="tformer-multi-gpu-"))
    compile_ = ["--compile"] if args.device == "cuda" else ["--no-compile"]
    for shape in args.shapes.split(","):
        model_flags, batch, seq_len = SHAPES[shape]

        def common(steps: int, rows: int = batch) -> list[str]:
            """The flags every run of this shape shares: `steps` optimiser steps of `rows` x seq_len a process."""
            return [*model_flags, "--batch-size", str(rows), "--seq-len", str(seq_len), "--max-steps", str(steps),
                    "--log-every", str(max(1, args.steps // 5)), "--eval-every", str(10 * args.steps),
                    "--eval-batches", "2", "--warmup", "5", *compile_]

        variants = [(1, "none", "none"), (1, "none", "full"), (args.gpus, "fsdp", "none"), (args.gpus, "fsdp", "full")]
        if shape != "3b":
            variants.append((args.gpus, "ddp", "none"))
        for gpus, parallel, ac in variants:
            out = work / f"{shape}-{gpus}-{parallel}-{ac}"
            row = {"shape": shape, "gpus": gpus, "parallel": parallel, "ac": ac}
            try:
                row.update(summary(train(out, gpus, [*common(args.steps), "--parallel", parallel,
                                                     "--activation-checkpointing", ac], args.device), gpus))
            except RuntimeError as e:
                row["error"] = str(e)[-500:]
            results.append(row)
            print(json.dumps(row), flush=True)
        one = next((r for r in results if r["shape"] == shape and r["gpus"] == 1 and r["ac"] == "none"
                    and "error" not in r), None)
        for r in results:
            if one and r["shape"] == shape and r["gpus"] > 1 and "error" not in r:
                r["speedup_vs_one"] = round(r["tokens_per_s"] / one["tokens_per_s"], 2)
        if not args.no_resume and shape != "3b":
            results.append(resume_check(work / f"{shape}-resume", shape, batch, args, common))
            print(json.dumps(results[-1]), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    header = ("shape", 6), ("gpus", 5), ("parallel", 10), ("ac", 6), ("tok/s", 10), ("tok/s/gpu", 10), ("MFU", 7), \
        ("GiB", 7), ("x one", 7)
    print("\n" + "".join(f"{name:>{width}}" for name, width in header))
    for r in results:
        if "tokens_per_s" in r:
            print(f"{r['shape']:>6}{r['gpus']:>5}{r['parallel']:>10}{r['ac']:>6}{r['tokens_per_s']:>10,}"
                  f"{r['tokens_per_s_per_gpu']:>10,}{r['mfu'] or float('nan'):>7.3f}{r['peak_mem_gib']:>7.2f}"
                  f"{r.get('speedup_vs_one', 1.0):>7.2f}")
        else:
            print(json.dumps(r))


def resume_check(out: Path, shape: str, batch: int, args, common) -> dict:
    """FSDP2 on N GPUs for 2 x --steps with a sharded checkpoint at --steps; a copy of the run stopped
    there resumes on one GPU with the same global batch (N x the per-GPU rows, activation checkpointing
    on to fit); the losses after --steps side by side (the same data, schedule and seed)."""
    row = {"shape": shape, "check": f"resume: {args.gpus} GPUs (fsdp) -> 1 GPU"}
    try:
        straight = train(out, args.gpus, [*common(2 * args.steps), "--parallel", "fsdp", "--save-every",
                                          str(args.steps), "--eval-every", str(args.steps)], args.device)
        copy = out.with_name(out.name + "-on-one")
        shutil.copytree(out, copy, symlinks=True)
        shutil.rmtree(copy / "checkpoints" / f"step-{2 * args.steps:06d}")
        (copy / "best").unlink(missing_ok=True)
        metrics = copy / "metrics.jsonl"  # as the run had written it by --steps
        metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()
                                   if json.loads(line).get("step", 0) <= args.steps))
        resumed = train(copy, 1, [*common(2 * args.steps, args.gpus * batch), "--parallel", "none",
                                  "--activation-checkpointing", "full", "--resume"], args.device)
        by_step = {r["step"]: r["loss"] for r in straight if r.get("kind") == "train"}
        row["losses (step, straight on N, resumed on 1)"] = [
            (r["step"], round(by_step.get(r["step"], float("nan")), 4), round(r["loss"], 4))
            for r in resumed if r.get("kind") == "train" and r["step"] > args.steps]
    except (RuntimeError, OSError) as e:
        row["error"] = str(e)[-500:]
    return row


if __name__ == "__main__":
    main()
