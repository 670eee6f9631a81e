"""Dense vs MoE at equal active parameters, trained on the default corpus with equal tokens.

    PYTHONPATH=src python bench/moe_train.py [--steps 1000] [--device cuda]

Both models: the default `shakespeare-bpe` recipe widened to 4 x 256 (4 heads, RoPE, RMSNorm, tied
8192-token BPE embeddings), trained by `tformer.train` with the same data order, schedule and
16 x 512-token batches.
  dense: SwiGLU FFN of width 768 in every layer
  moe:   8 SwiGLU experts of width 384, top-2 (softmax router, renormalised), in every layer:
         the same active FFN width (2 x 384 = 768) and four times the FFN parameters;
         Switch load-balancing loss 0.01 and router z-loss 0.001
Reports validation loss (bits/char) at each evaluation, the best of each, parameters (total and
active), and the MoE expert load: max and min of an expert's assignments over the mean, per layer,
from the last logged training steps.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from tformer.config import MoEConfig
from tformer.accounting import active_breakdown, parameter_breakdown
from tformer.presets import get_preset
from tformer.train.config import TrainConfig
from tformer.train.loop import train

BASE = {"dim": 256, "n_layers": 4, "n_heads": 4, "max_seq_len": 512}
MODELS = {
    "dense": {**BASE, "ffn_dim": 768},
    "moe": {**BASE, "ffn_dim": 768, "moe": {"n_experts": 8, "top_k": 2, "expert_dim": 384,
                                            "aux_loss_coef": 0.01, "z_loss_coef": 0.001}},
}


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "tformer-moe-train")
    ap.add_argument("--json")
    args = ap.parse_args()
    results = {}
    for name, model in MODELS.items():
        config = get_preset("shakespeare-bpe").replace(
            **{k: (MoEConfig(**v) if k == "moe" else v) for k, v in model.items()})
        total, active = parameter_breakdown(config)["total"], active_breakdown(config)["total"]
        out = args.out / name
        cfg = TrainConfig(model=model, out_dir=str(out), overwrite=True, max_steps=args.steps, batch_size=16, seq_len=512, lr=3e-3,
                          min_lr=1.5e-4, warmup=100, eval_every=args.eval_every, eval_batches=50, compile=True,
                          device=args.device, sample_tokens=0, tensorboard=False, log_every=50, keep_last=1)
        train(cfg, progress=False)
        rows = read_metrics(out)
        evals = [(r["step"], round(r["val_bpc"], 4)) for r in rows if "val_bpc" in r]
        loads = [r for r in rows if "moe_load_max" in r][-5:]
        results[name] = {
            "params_total": total, "params_active": active, "val_bpc": evals,
            "best_val_bpc": min(b for _, b in evals),
            **({"load_max": round(max(r["moe_load_max"] for r in loads), 3),
                "load_min": round(min(r["moe_load_min"] for r in loads), 3)} if loads else {}),
        }
        print(json.dumps({name: results[name]}), flush=True)
    print(f"\n{'model':6} {'total':>11} {'active':>11} {'best bpc':>9} {'final bpc':>9} {'load max/min':>13}")
    for name, r in results.items():
        load = f"{r['load_max']:.2f}/{r['load_min']:.2f}" if "load_max" in r else "-"
        print(f"{name:6} {r['params_total']:>11,} {r['params_active']:>11,} {r['best_val_bpc']:>9.4f} "
              f"{r['val_bpc'][-1][1]:>9.4f} {load:>13}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
