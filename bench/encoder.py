"""Encoder forward throughput on mixed sequence lengths: tformer padded, tformer padding-free, HF BertModel.

    PYTHONPATH=src python bench/encoder.py [--json out.json] [--compile]
    PYTHONPATH=src python bench/encoder.py --device cpu --tiny       # every variant on a toy shape: a smoke test

Shape: BERT-base (12 layers, dim 768, 12 heads, ffn 3072, vocab 30522), random weights, bf16 on CUDA
(fp32 on CPU; --dtype), inference (eval, no grad). Batch: 256 sequences whose lengths are lognormal (median
128, sigma 1) clipped to [16, 512], fixed seed; random token ids. One forward takes the whole batch.

    hf-sdpa-padded      transformers BertModel, attn_implementation="sdpa", the batch padded to its
                        longest sequence with an attention_mask (the usual HF pipeline)
    tformer-padded      tformer Encoder of the same shape (random weights), the same padded batch;
                        torch SDPA with a (B,1,1,T) key mask
    tformer-packed      the same Encoder on the padding-free batch: every sequence end to end in one
                        row (1, N) with `segments`; on CUDA FlexAttention (tformer.inference.encoder_flex:
                        compiled flex_attention, block-diagonal document mask built once per forward),
                        on CPU SDPA with a dense block-diagonal mask
    *-compile           (--compile) the tformer variants with the model in torch.compile

tokens/s counts real tokens only (the sum of the lengths) over the median forward; CUDA forwards are
timed one by one with CUDA events after --warmup forwards (compilation included there). Every
tformer variant's hidden states on the real tokens are checked against tformer-padded's (max |diff|
column); HF's model has its own random weights (HF parity: tests/reference/test_hf_bert.py).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from tformer.inference.encoder_flex import use_flex_attention, use_sdpa
from tformer.models import build_model
from tformer.models.encoder import pack
from tformer.presets.bert import bert_like

BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            max_position_embeddings=512)  # fmt: skip
TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64)  # fmt: skip
BASELINE = "hf-sdpa-padded"
REFERENCE = "tformer-padded"  # the hidden states every tformer variant is checked against


def lengths_of(n: int, lo: int, hi: int, seed: int) -> list[int]:
    """n lognormal lengths (median sqrt(lo * hi) capped at 128, sigma 1), clipped to [lo, hi]."""
    g = torch.Generator().manual_seed(seed)
    median = min(128.0, math.sqrt(lo * hi))
    raw = torch.empty(n).log_normal_(math.log(median), 1.0, generator=g)
    return raw.round().clamp(lo, hi).long().tolist()


def make_batch(lengths: list[int], vocab: int, seed: int, device) -> dict:
    g = torch.Generator().manual_seed(seed + 1)
    rows = [torch.randint(1000 if vocab > 2000 else 1, vocab, (n,), generator=g) for n in lengths]
    T = max(lengths)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], mask[i, : len(r)] = r, 1
    packed, segments = pack(rows)
    return {k: v.to(device) for k, v in dict(tokens=tokens, mask=mask, packed=packed, segments=segments).items()}


def build(shape: dict, device, dtype):
    """(HF BertModel, tformer Encoder) of the same shape, each with its own random weights. (Equal
    weights would need tformer.convert, whose package imports gguf, absent on some GPU machines; HF
    parity is tests/reference/test_hf_bert.py's job.)"""
    import transformers

    hf_config = transformers.BertConfig(**shape, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                        attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.BertModel(hf_config).eval()
    if hf.config._attn_implementation != "sdpa":
        raise RuntimeError(f"HF BertModel attends with {hf.config._attn_implementation!r}, not 'sdpa'")
    config = bert_like(vocab_size=shape["vocab_size"], dim=shape["hidden_size"], n_layers=shape["num_hidden_layers"],
                       n_heads=shape["num_attention_heads"], ffn_dim=shape["intermediate_size"],
                       max_seq_len=shape["max_position_embeddings"], emb_dropout=0.0, attn_dropout=0.0,
                       resid_dropout=0.0)  # fmt: skip
    ours = build_model(config, device=device, dtype=dtype).eval()
    return hf.to(device, dtype), ours


def timed(fn, warmup: int, iters: int, device) -> tuple[list[float], float]:
    """(milliseconds of each timed call, seconds of the warm-up)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync()
    warm_s = time.perf_counter() - start
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return times, warm_s


def variants(hf, ours, batch: dict, device, compile: bool) -> dict:
    """name -> (forward returning the real tokens' hidden states (N, C), setup to run first or None)."""
    tokens, mask, packed, segments = batch["tokens"], batch["mask"], batch["packed"], batch["segments"]
    real = mask.bool()
    flex = device.type == "cuda"

    def use_packed():
        if flex:
            use_flex_attention(ours)

    def use_padded():
        use_sdpa(ours)

    out = {
        BASELINE: (lambda: hf(input_ids=tokens, attention_mask=mask).last_hidden_state[real], None),
        "tformer-padded": (lambda: ours(tokens, mask)[real], use_padded),
        "tformer-packed": (lambda: ours(packed, segments=segments)[0], use_packed),
    }
    if compile:
        compiled = torch.compile(ours, dynamic=False)
        out["tformer-padded-compile"] = (lambda: compiled(tokens, mask)[real], use_padded)
        out["tformer-packed-compile"] = (lambda: compiled(packed, segments=segments)[0], use_packed)
    return out


@torch.no_grad()
def run(args) -> dict:
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("fp32" if device.type == "cpu" else "bf16")]
    shape = TINY if args.tiny else BASE
    n, hi = (32, 64) if args.tiny else (args.n_seqs, args.max_len)
    lengths = lengths_of(n, args.min_len, hi, args.seed)
    batch = make_batch(lengths, shape["vocab_size"], args.seed, device)
    hf, ours = build(shape, device, dtype)
    n_tokens = sum(lengths)
    ref = None
    rows = []
    for name, (fn, setup) in variants(hf, ours, batch, device, args.compile).items():
        if args.variants and name not in args.variants:
            continue
        if setup is not None:
            setup()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, warm_s = timed(fn, args.warmup, args.iters, device)
        hidden = fn().float()
        ref = hidden if name == REFERENCE else ref
        ms = statistics.median(times)
        checked = ref is not None and name.startswith("tformer")
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        row = dict(variant=name, ms=round(ms, 3), tokens_per_s=round(n_tokens / ms * 1e3), warmup_s=round(warm_s, 2),
                   max_abs_diff=float((hidden - ref).abs().max()) if checked else None,
                   peak_mem_gib=round(peak, 2) if peak is not None else None)  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r["ms"] for r in rows if r["variant"] == BASELINE), None)
    for r in rows:
        r["speedup_vs_hf"] = round(base / r["ms"], 2) if base else None
    import transformers

    return dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        versions=f"torch {torch.__version__}, transformers {transformers.__version__}",
        dtype=str(dtype).removeprefix("torch."),
        shape="tiny" if args.tiny else "bert-base",
        n_seqs=n, real_tokens=n_tokens, padded_tokens=n * max(lengths),
        lengths=dict(min=min(lengths), median=statistics.median(lengths), mean=round(n_tokens / n, 1),
                     max=max(lengths)),
        rows=rows,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="toy shape (2 layers, dim 64, 32 sequences of <= 64)")
    ap.add_argument("--n-seqs", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, help="untimed forwards first (default 3; --tiny 1)")
    ap.add_argument("--iters", type=int, help="timed forwards (default 10; --tiny 3)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--compile", action="store_true", help="add the tformer variants under torch.compile")
    ap.add_argument("--variants", nargs="*", help="run only these")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    args.warmup = args.warmup if args.warmup is not None else 1 if args.tiny else 3
    args.iters = args.iters if args.iters is not None else 3 if args.tiny else 10
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here; pass --device cpu (with --tiny for a quick run)")
    if not 1 <= args.min_len <= args.max_len <= 512:
        sys.exit(f"need 1 <= --min-len <= --max-len <= 512 (BERT's positions), got {args.min_len}, {args.max_len}")
    result = run(args)
    for r in result["rows"]:
        print(f"{r['variant']:<24} {r['ms']:>9.2f} ms {r['tokens_per_s']:>12,} tok/s  x{r['speedup_vs_hf']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
