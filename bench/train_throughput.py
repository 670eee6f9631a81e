"""Training throughput on one GPU: tformer vs nanoGPT vs HF transformers, timed in one process.

    python bench/train_throughput.py [--nanogpt third_party/nanoGPT] [--only gpt2|llama|llama3b] [--steps 20]

Shapes: GPT-2 124M at B16 x T1024, the Llama-3.2-1B shape at B4 x T2048 and the Llama-3.2-3B shape at
B2 x T2048; bf16 autocast over fp32 weights, fused AdamW (or tformer's bf16-moment AdamW where a row
says so), one optimiser step per iteration (forward, backward, step). tformer variants: the whole model
and loss compiled as one graph, each block compiled apart (`--compile-scope blocks`), bf16 optimiser
states, activation checkpointing of every block. Each variant is warmed up (compilation included
there; `warm_s` is that time), then timed with CUDA events over --steps iterations; the median step
gives tokens/s. MFU uses one FLOP count for every implementation of a shape (6 N + 12 L H Q T per
token, nanoGPT's estimate_mfu) against the device's bf16 peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tformer.accounting import peak_flops, training_flops_per_token
from tformer.models import build_model
from tformer.presets import get_preset


def time_steps(model, forward_loss, batch, steps: int, warmup: int, optimizer=None) -> dict:
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    x, y = batch
    times = []
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            warm_s = time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward_loss(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        end.record()
        if i >= warmup:
            times.append((start, end))
    torch.cuda.synchronize()
    ms = [s.elapsed_time(e) for s, e in times]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "loss": loss.item(), "warm_s": warm_s,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9}


def lm_loss(logits, y):
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def tformer_variant(config, compile_: bool, scope: str = "model", states: str = "float32", ac: str = "none"):
    from tformer.train.objectives import NextToken
    from tformer.train.optim import make_optimizer
    from tformer.train.parallel import apply_activation_checkpointing

    model = build_model(config, device="cuda")
    apply_activation_checkpointing(model, ac, 1)
    objective = NextToken(model, compile_=compile_, scope=scope)
    optimizer = make_optimizer(model, 1e-4, 0.1, state_dtype=getattr(torch, states))
    return model, lambda x, y: objective({"tokens": x, "targets": y})["loss"], optimizer


def nanogpt_variant(nanogpt: Path, config, compile_: bool):
    sys.path.insert(0, str(nanogpt))
    from model import GPT, GPTConfig

    cfg = GPTConfig(block_size=config.max_seq_len, vocab_size=config.vocab_size, n_layer=config.n_layers,
                    n_head=config.n_heads, n_embd=config.dim, dropout=0.0, bias=True)
    model = GPT(cfg).cuda()
    fn = torch.compile(model) if compile_ else model
    return model, lambda x, y: fn(x, y)[1]


def hf_variant(config, compile_: bool):
    import transformers

    from tformer.convert.hf import config_to_hf

    hf_cfg = transformers.AutoConfig.for_model(**config_to_hf(config))
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa").cuda()
    fn = torch.compile(model) if compile_ else model
    return model, lambda x, y: lm_loss(fn(input_ids=x).logits, y)


TFORMER = {"tformer compiled": {}, "tformer blocks": {"scope": "blocks"},
           "tformer bf16 states": {"states": "bfloat16"}}


def shapes(only: str | None):
    """name -> (config, B, T, variants): tformer variants (label -> tformer_variant kwargs) and anchors."""
    gpt2 = get_preset("gpt2").replace(vocab_size=50304, emb_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0)
    llama = get_preset("llama-3.2-1b").replace(max_seq_len=2048)
    llama3b = llama.replace(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192)  # Llama-3.2-3B's shape
    out = {"gpt2-124M B16xT1024": (gpt2, 16, 1024, {**TFORMER, "nanogpt": None, "hf": None}),
           "llama-3.2-1B B4xT2048": (llama, 4, 2048, {**TFORMER, "hf": None}),
           "llama-3.2-3B B2xT2048": (llama3b, 2, 2048, {
               "tformer compiled": {}, "tformer compiled + AC": {"ac": "full"},
               "tformer blocks + AC + bf16 states": {"scope": "blocks", "ac": "full", "states": "bfloat16"}})}
    prefix = {"gpt2": "gpt2-124M", "llama": "llama-3.2-1B", "llama3b": "llama-3.2-3B"}
    return {k: v for k, v in out.items() if only is None or k.startswith(prefix[only])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", type=Path, default=Path("third_party/nanoGPT"))
    ap.add_argument("--only", choices=["gpt2", "llama", "llama3b"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--variants", default="tformer,nanogpt,hf", help="comma-separated subset")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--eager", action="store_true", help="also time HF transformers uncompiled")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = torch.device("cuda")
    peak = peak_flops(device)
    rows = []
    for shape, (config, B, T, variants) in shapes(args.only).items():
        flops_tok = training_flops_per_token(config, T)
        for name, kwargs in variants.items():
            impl = name.split()[0]
            if impl not in args.variants.split(","):
                continue
            for compile_ in [True] if impl in ("tformer", "nanogpt") or not args.eager else [False, True]:
                label = name if impl == "tformer" else f"{name} {'compiled' if compile_ else 'eager'}"
                torch.manual_seed(0)
                optimizer = None
                try:
                    if impl == "tformer":
                        model, fn, optimizer = tformer_variant(config, compile_, **kwargs)
                    elif impl == "nanogpt":
                        model, fn = nanogpt_variant(args.nanogpt, config, compile_)
                    else:
                        model, fn = hf_variant(config, compile_)
                    batch = (torch.randint(0, config.vocab_size, (B, T), device="cuda"),
                             torch.randint(0, config.vocab_size, (B, T), device="cuda"))
                    torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                    r = time_steps(model, fn, batch, args.steps, args.warmup, optimizer)
                except torch.OutOfMemoryError:
                    rows.append({"shape": shape, "impl": label, "tokens_per_s": 0, "mfu": None, "step_ms": 0.0,
                                 "peak_mem_gb": float("nan"), "warm_s": 0.0, "note": "out of memory"})
                    print(json.dumps(rows[-1]), flush=True)
                else:
                    tok_s = B * T / (r["median_ms"] / 1e3)
                    rows.append({"shape": shape, "impl": label, "tokens_per_s": round(tok_s),
                                 "mfu": round(tok_s * flops_tok / peak, 3) if peak else None,
                                 "step_ms": round(r["median_ms"], 2), "peak_mem_gb": round(r["peak_mem_gb"], 1),
                                 "warm_s": round(r["warm_s"], 1), "wall_s": round(time.perf_counter() - t0, 1)})
                    print(json.dumps(rows[-1]), flush=True)
                model = fn = batch = optimizer = None
                gc.collect()
                torch.cuda.empty_cache()
                torch._dynamo.reset()
    print(f"\ndevice: {torch.cuda.get_device_name()}, torch {torch.__version__}, peak {peak / 1e12:.0f} TFLOP/s")
    print(f"{'shape':24} {'implementation':34} {'tokens/s':>10} {'MFU':>6} {'step ms':>8} {'mem GB':>7} {'warm s':>7}")
    for r in rows:
        print(f"{r['shape']:24} {r['impl']:34} {r['tokens_per_s']:>10,} {r['mfu'] or 0:>6.3f} "
              f"{r['step_ms']:>8.1f} {r['peak_mem_gb']:>7.1f} {r['warm_s']:>7.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
