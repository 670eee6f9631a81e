"""Attention variants: cost against sequence length, and quality at equal training tokens.

    python bench/attention.py scaling [--lengths 1024,2048,...,65536] [--json FILE]
    python bench/attention.py kernels [--lengths ...] [--json FILE]
    python bench/attention.py quality [--steps 600] [--batch-size 32] [--seq-len 256] [--device cuda|cpu] [--json FILE]

scaling: one decoder layer (dim 1024, 16 heads of 64, SwiGLU FFN, bf16) per variant, forward + backward
of one sequence of T tokens, median of CUDA-event timings after warm-up, and the peak memory. Exact
variants run through FlexAttention except "sdpa causal", torch SDPA's FlashAttention kernel;
Linformer, Performer and the SSD mixer run as tformer's plain-PyTorch modules. Every layer is compiled
whole (FlexAttention inside it, as `tformer train --compile` runs it). The FFN is the same in every row,
so differences between rows are the mixers'.

kernels: attention alone (1 x 16 heads x T x 64, bf16, causal), forward + backward: SDPA's
FlashAttention against FlexAttention compiled by default and with mode="max-autotune-no-cudagraphs"
(which searches its block sizes and pipeline stages).

quality: the bundled corpus, tformer's default model shape (3 x 192, 8192 BPE) with each variant in its
attention, the same seed, batches and number of steps (equal tokens), on one device; validation bits
per character on the whole held-out split.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tformer.config import ModelConfig

SCALING = {  # label -> ModelConfig changes (T-dependent values filled in by `scaling_config`)
    "sdpa causal (FlashAttention)": {"attention": {"backend": "sdpa"}},
    "flex causal": {"attention": {"backend": "flex"}},
    "flex sliding window 1024": {"sliding_window": 1024, "attention": {"backend": "flex"}},
    "flex local+global (w 1024, 64 global)": {"attention": {"pattern": "local_global", "windows": [1024],
                                                            "n_global": 64, "backend": "flex"}},
    "flex strided 128": {"attention": {"pattern": "strided", "block": 128, "backend": "flex"}},
    "flex fixed 128": {"attention": {"pattern": "fixed", "block": 128, "summary": 8, "backend": "flex"}},
    "flex prefix-LM (half)": {"attention": {"pattern": "prefix", "backend": "flex"}},
    "flex softcap 50": {"attention": {"softcap": 50.0, "backend": "flex"}},
    "flex ALiBi": {"positions": "alibi", "attention": {"backend": "flex"}},
    "Linformer k 256": {"attention": {"approx": "linformer", "rank": 256, "backend": "sdpa"}},
    "Performer m 256": {"attention": {"approx": "performer", "features": 256, "backend": "sdpa"}},
    "Mamba-2 SSD mixer": {"ssd": {"layers": [0], "head_dim": 64, "state_dim": 128, "chunk": 256}},
}

QUALITY = {
    "causal (baseline)": {},
    "sliding window 64": {"sliding_window": 64},
    "per-layer windows [64, 64, global]": {"attention": {"windows": [64, 64, 0]}},
    "local+global (w 64, 16 global)": {"attention": {"pattern": "local_global", "windows": [64], "n_global": 16}},
    "strided 16": {"attention": {"pattern": "strided", "block": 16}},
    "fixed 16, 2 summary": {"attention": {"pattern": "fixed", "block": 16, "summary": 2}},
    "softcap 30": {"attention": {"softcap": 30.0}},
    "ALiBi (no RoPE)": {"positions": "alibi"},
    "Linformer k 64": {"attention": {"approx": "linformer", "rank": 64}},
    "Performer m 64": {"attention": {"approx": "performer", "features": 64}},
    "Performer m 256": {"attention": {"approx": "performer", "features": 256}},
    "hybrid: SSD in layer 1 of 3": {"ssd": {"layers": [1], "head_dim": 32, "state_dim": 64}},
}


def scaling_config(changes: dict, T: int) -> ModelConfig:
    base = ModelConfig(vocab_size=256, dim=1024, n_layers=1, n_heads=16, ffn_dim=2816, activation="swiglu",
                       norm="rmsnorm", positions="rope", max_seq_len=T, tie_embeddings=False)
    changes = json.loads(json.dumps(changes))  # a copy
    if changes.get("attention", {}).get("pattern") == "prefix":
        changes["attention"]["prefix"] = T // 2
    return base.replace(**changes)


def time_layer(config: ModelConfig, T: int, steps: int, warmup: int) -> dict:
    from tformer.inference.flex import use_attention_backend
    from tformer.models import build_model

    model = build_model(config, device="cuda").to(torch.bfloat16)
    use_attention_backend(model, "cuda", compile=False)  # flex_attention compiles with the layer, as in training
    hidden = torch.compile(model.hidden)
    x = torch.randint(0, config.vocab_size, (1, T), device="cuda")
    times = []
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        hidden(x).float().square().mean().backward()
        end.record()
        if i >= warmup:
            times.append((start, end))
    torch.cuda.synchronize()
    return {"ms": statistics.median(s.elapsed_time(e) for s, e in times),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def scaling(args) -> list[dict]:
    rows = []
    for label, changes in SCALING.items():
        if args.only and not any(word in label for word in args.only.split(",")):
            continue
        for T in args.lengths:
            torch.cuda.reset_peak_memory_stats()
            try:
                r = time_layer(scaling_config(changes, T), T, args.steps, args.warmup)
                row = {"variant": label, "T": T, "ms": round(r["ms"], 3), "peak_gib": round(r["peak_gib"], 2)}
            except torch.OutOfMemoryError:
                row = {"variant": label, "T": T, "ms": None, "peak_gib": None, "note": "out of memory"}
            except Exception as e:  # noqa: BLE001 - a failing variant is reported, the others still run
                row = {"variant": label, "T": T, "ms": None, "peak_gib": None, "note": f"{type(e).__name__}: {e}"[:200]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            save(args, rows)
            gc.collect()
            torch.cuda.empty_cache()
            torch._dynamo.reset()
    print(f"\n{'variant':40}" + "".join(f"{T:>10}" for T in args.lengths) + "   (ms fwd+bwd; peak GiB below)")
    for label in dict.fromkeys(r["variant"] for r in rows):
        got = {r["T"]: r for r in rows if r["variant"] == label}
        print(f"{label:40}" + "".join(f"{got[T]['ms'] or float('nan'):>10.2f}" for T in args.lengths))
        print(f"{'':40}" + "".join(f"{got[T]['peak_gib'] or float('nan'):>10.2f}" for T in args.lengths))
    return rows


def kernels(args) -> list[dict]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from torch.nn.functional import scaled_dot_product_attention

    def causal(b, h, q, k):
        return q >= k

    rows = []
    for T in args.lengths:
        qkv = [torch.randn(1, 16, T, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
        block_mask = create_block_mask(causal, None, None, T, T, device="cuda")
        variants = {"sdpa (FlashAttention)": lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True),
                    "flex": torch.compile(flex_attention),
                    "flex max-autotune": torch.compile(flex_attention, mode="max-autotune-no-cudagraphs")}
        for label, attend in variants.items():
            kwargs = {} if label.startswith("sdpa") else {"block_mask": block_mask}
            times = []
            for i in range(args.warmup + args.steps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                attend(*qkv, **kwargs).sum().backward()
                end.record()
                if i >= args.warmup:
                    times.append((start, end))
            torch.cuda.synchronize()
            row = {"variant": label, "T": T, "ms": round(statistics.median(s.elapsed_time(e) for s, e in times), 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            save(args, rows)
        torch._dynamo.reset()
    return rows


def quality(args) -> list[dict]:
    from tformer.train.config import TrainConfig
    from tformer.train.loop import train

    rows = []
    out = Path(tempfile.mkdtemp(prefix="tformer-attn-"))
    for i, (label, changes) in enumerate(QUALITY.items()):
        if args.only and not any(word in label for word in args.only.split(",")):
            continue
        cfg = TrainConfig(model=changes, batch_size=args.batch_size, seq_len=args.seq_len, max_steps=args.steps,
                          warmup=min(50, args.steps // 5), lr=3e-3, device=args.device,
                          eval_every=args.steps, eval_batches=0, log_every=50, out_dir=str(out / f"run{i}"),
                          cache_dir=str(out / "cache"), tensorboard=False, sample_tokens=0, seed=1337)
        t = time.perf_counter()
        try:
            result = train(cfg, progress=False)
            row = {"variant": label, "val_bpc": round(result.val_bpc, 3), "steps": result.step,
                   "wall_s": round(time.perf_counter() - t, 1)}
        except Exception as e:  # noqa: BLE001
            row = {"variant": label, "val_bpc": None, "note": f"{type(e).__name__}: {e}"[:200]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        save(args, rows)
        torch._dynamo.reset()
    return rows


def save(args, rows: list[dict]) -> None:
    """Rows so far to --json (rewritten after each row, so a run cut short keeps what it measured)."""
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["scaling", "kernels", "quality"])
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768,65536")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps (scaling, kernels: 10); training steps (quality: 600)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", default="", help="comma-separated words: run the variants whose label has one")
    ap.add_argument("--batch-size", type=int, default=32, help="quality: rows a step")
    ap.add_argument("--seq-len", type=int, default=256, help="quality: tokens a row")
    ap.add_argument("--device", default="cuda", help="quality: where to train")
    args = ap.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.steps = args.steps or (600 if args.part == "quality" else 10)
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    print(f"device: {name}, {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    {"scaling": scaling, "kernels": kernels, "quality": quality}[args.part](args)


if __name__ == "__main__":
    main()
