"""Speculative decoding speed on one GPU: a trained target/draft pair, greedy, timed in one process.

    PYTHONPATH=src python bench/speculative.py [--target-steps 700] [--draft-steps 1500] [--k 3 5] [--new 256]
        [--drafts distilled plain] [--distill-alpha 1.0] [--draft-dim 256] [--draft-layers 4 2]

The models, all trained here by `tformer.train` on the default corpus (Shakespeare's plays, the
default 8192-token BPE tokenizer, so they share it):
  target: the Llama-3.2-1B layer shape (16 x 2048, 32/8 heads, SwiGLU 8192), untied, ~1.0B parameters
  draft:  the default `shakespeare-bpe` recipe widened to 4 x 256 (SwiGLU 768, tied), ~5.3M parameters
          (--draft-layers x --draft-dim: heads of 64, SwiGLU 3 x dim; at batch 1 a step's cost grows
          with the layers, hardly with the width; one draft per depth given; BENCHMARKS.md's best pair
          is a distilled 2 x 512 draft at k=5: `--drafts distilled --draft-dim 512 --draft-layers 2 --k 5`),
          trained on the corpus ("plain"), or distilled from the target ("distilled": `--teacher`,
          the loss mixes the target's distributions in with weight --distill-alpha; 1.0: those only)
Each is trained for a number of 16 x 512-token steps (bf16 autocast, compiled); a draft keeps its
best validation checkpoint (evaluated every 250 steps: the 1.3M-token corpus overfits fast).

Decoding: prompts are --prompts windows of --prompt tokens from the held-out validation split;
temperature 0, --new tokens each. Each model has a `DecodeEngine` made with compile=True (the fused
decode kernels, compiled forwards, CUDA graphs). Plain decoding is the target engine's `generate`
with the decode loop replayed from CUDA graphs (`CapturedDecode`, as bench/decode.py's tformer rows)
and the prompt's forward compiled but not captured (bench/ablations.py), as speculative decoding's
is; speculative decoding is `speculative_generate` on the target and draft engines (each round, k
draft steps, the target's (k+1)-token verify and its bookkeeping, replayed from one CUDA graph).
tokens/s = new tokens / wall time of the whole call (prefill included), median over prompts after a
warm-up call per variant.
same_as_plain: the share of tokens before the first difference from plain greedy decoding (in fp32
they are equal, as the tests check; in bf16 the (k+1)-token verify rounds differently from the
one-token step, so near-ties can go the other way). same_as_eager: the same share, compiled
against eager speculative decoding (first prompt). --no-tuning turns off inductor's
coordinate-descent tuning for both variants alike (it costs minutes of compile time).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config

from tformer.accounting import parameter_breakdown
from tformer.checkpoint import load
from tformer.inference import DecodeEngine, EngineOptions, SamplingConfig, speculative_generate
from tformer.train.config import TrainConfig
from tformer.train.loop import train
from tformer.train.data import prepare_data

sys.path.insert(0, str(Path(__file__).parent))
from ablations import uncaptured_prefill  # noqa: E402

TARGET = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "ffn_dim": 8192, "tie_embeddings": False,
          "max_seq_len": 1024}
GREEDY = SamplingConfig(temperature=0)


def draft_shape(dim: int, layers: int) -> dict:
    return {"dim": dim, "n_layers": layers, "n_heads": dim // 64, "ffn_dim": 3 * dim, "max_seq_len": 1024}


def train_model(out: Path, steps: int, model: dict, lr: float, eval_every: int, **distill) -> Path:
    """16 x 512-token batches; the checkpoint with the best validation loss (evaluated every eval_every).
    distill: TrainConfig's teacher and distill_alpha, for a distilled draft."""
    cfg = TrainConfig(model=model, out_dir=str(out), overwrite=True, max_steps=steps, batch_size=16, seq_len=512, lr=lr,
                      min_lr=lr / 20, warmup=100, eval_every=eval_every, eval_batches=50, compile=True,
                      sample_tokens=0, tensorboard=False, log_every=100, keep_last=1, **distill)
    t = time.perf_counter()
    result = train(cfg, progress=False)
    print(json.dumps({"trained": str(out), "steps": result.step, "val_bpc": round(result.val_bpc, 3),
                      "wall_s": round(time.perf_counter() - t, 1)}), flush=True)
    return out / "best"


def timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target-steps", type=int, default=700)
    ap.add_argument("--draft-steps", type=int, default=1500)
    ap.add_argument("--k", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "tformer-spec")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-tuning", action="store_true")
    ap.add_argument("--drafts", nargs="+", choices=["plain", "distilled"], default=["distilled", "plain"],
                    help="plain: the draft trained on the corpus alone; distilled: trained on the target's "
                         "distributions (tformer train --teacher, --distill-alpha)")
    ap.add_argument("--distill-alpha", type=float, default=1.0)
    ap.add_argument("--draft-dim", type=int, default=256)
    ap.add_argument("--draft-layers", type=int, nargs="+", default=[4],
                    help="a draft of each depth (fewer layers: a cheaper draft step, usually lower acceptance)")
    args = ap.parse_args()

    target_path = train_model(args.out / "target", args.target_steps, TARGET, lr=6e-4, eval_every=args.target_steps)
    target = load(target_path, device="cuda", dtype=torch.bfloat16).eval()
    drafts = {}
    for name, layers in itertools.product(args.drafts, args.draft_layers):
        distill = {"teacher": str(target_path), "distill_alpha": args.distill_alpha} if name == "distilled" else {}
        path = train_model(args.out / f"draft-{name}-{layers}", args.draft_steps, draft_shape(args.draft_dim, layers),
                           lr=3e-3, eval_every=250, **distill)
        drafts[f"{name} {layers}L"] = load(path, device="cuda", dtype=torch.bfloat16).eval()
    sizes = {n: parameter_breakdown(m.config)["total"] for n, m in (("target", target), *drafts.items())}
    print(json.dumps({"parameters": sizes, "ratio": {n: round(sizes["target"] / v, 1) for n, v in sizes.items()}}),
          flush=True)

    val = prepare_data(TrainConfig()).shards.val.tokens
    stride = len(val) // args.prompts
    prompts = [val[i * stride: i * stride + args.prompt].tolist() for i in range(args.prompts)]

    # eager speculative decoding (engines made and closed by each call), before the compiled engines own the models
    eager = {(name, k): speculative_generate(target, draft, prompts[0], args.new, k=k, sampling=GREEDY)[0]
             for (name, draft), k in itertools.product(drafts.items(), args.k)}
    if args.no_tuning:
        inductor_config.coordinate_descent_tuning = False
    options = EngineOptions(max_batch_size=1, compile=True, cuda_graphs=True)
    target = uncaptured_prefill(DecodeEngine(target, options))
    drafts = {name: DecodeEngine(draft, options) for name, draft in drafts.items()}
    plain = lambda p: target.generate([p], args.new, GREEDY)[0]  # noqa: E731
    warm, _ = timed(lambda: plain(prompts[0]))
    times, want = [], []
    for p in prompts:
        t, out = timed(lambda: plain(p))
        times.append(t)
        want.append(out)
    base = args.new / statistics.median(times)
    rows = [{"variant": "plain", "tokens_per_s": round(base, 1), "speedup": 1.0, "ms_per_forward": round(1e3 / base, 3),
             "first_call_s": round(warm, 1)}]
    print(json.dumps(rows[-1]), flush=True)

    for (name, draft), k in itertools.product(drafts.items(), args.k):
        spec = lambda p: speculative_generate(target, draft, p, args.new, k=k, sampling=GREEDY)  # noqa: E731
        warm, _ = timed(lambda: spec(prompts[0]))
        graphed, _ = spec(prompts[0])
        ungraphed = eager[name, k]
        same_eager = next((i for i, (a, b) in enumerate(zip(graphed, ungraphed)) if a != b), len(ungraphed))
        same_eager /= len(ungraphed)
        times, acc, prop, fwd, same = [], 0, 0, 0, 0
        for p, ref in zip(prompts, want):
            t, (out, stats) = timed(lambda: spec(p))
            same += next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), len(ref))
            times.append(t)
            acc, prop, fwd = acc + stats.accepted, prop + stats.proposed, fwd + stats.target_forwards
        tok_s = args.new / statistics.median(times)
        rows.append({"variant": f"{name} draft, k={k}", "tokens_per_s": round(tok_s, 1),
                     "speedup": round(tok_s / base, 2), "acceptance": round(acc / prop, 3),
                     "tokens_per_target_forward": round(len(prompts) * args.new / fwd, 2),
                     "same_as_plain": round(same / (len(prompts) * args.new), 3),
                     "ms_per_forward": round(1e3 * sum(times) / fwd, 3), "same_as_eager": round(same_eager, 3),
                     "first_call_s": round(warm, 1)})
        print(json.dumps(rows[-1]), flush=True)

    print(f"\ndevice: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'variant':22} {'tokens/s':>9} {'speedup':>8} {'acceptance':>11} {'tok/fwd':>8} {'same':>6} {'first s':>8}")
    for r in rows:
        print(f"{r['variant']:22} {r['tokens_per_s']:>9,.1f} {r['speedup']:>7.2f}x {r.get('acceptance', '-'):>11} "
              f"{r.get('tokens_per_target_forward', '-'):>8} {r.get('same_as_plain', '-'):>6} {r['first_call_s']:>8.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
