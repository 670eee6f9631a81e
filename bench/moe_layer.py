"""One Mixtral-shaped MoE layer, forward + backward, tformer vs HF transformers, timed in one process.

    PYTHONPATH=src python bench/moe_layer.py [--tokens 8192] [--repeats 20]

Shape: d 4096, expert ffn 14336 (SwiGLU), 8 experts, top-2, bf16 weights and activations, 8,192
tokens (1 x 8192). Both layers get the same weights (HF's fused gate_up_proj split into our w1/w3).
One timed call = forward, then backward of a fixed random output gradient (weights and input get
gradients). Median of --repeats CUDA-event timings after warm-up. TFLOP/s counts the active expert
matmuls only: 3 matmuls x 2 x d x ffn x top-k per token, x3 for forward + backward.

Variants: tformer eager (grouped matmuls), tformer compiled (`torch.compile`, fullgraph), HF
`MixtralSparseMoeBlock` with `experts_implementation="eager"` (a loop over experts) and
"grouped_mm" (what a full HF model picks by default where it can). "vs hf" is against the faster.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from tformer.config import ModelConfig, MoEConfig
from tformer.nn.moe import MoE

D, FFN, E, K = 4096, 14336, 8, 2
DEVICE = "cuda"


def time_fwd_bwd(layer, x, grad, repeats: int) -> float:
    def step():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(grad)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return statistics.median(times)


def hf_layer(implementation: str | None):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    kwargs = {"experts_implementation": implementation} if implementation else {}
    cfg = MixtralConfig(hidden_size=D, intermediate_size=FFN, num_local_experts=E, num_experts_per_tok=K, **kwargs)
    with torch.device(DEVICE):
        layer = MixtralSparseMoeBlock(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
    return layer


def tformer_layer(hf) -> MoE:
    config = ModelConfig(dim=D, ffn_dim=FFN, n_heads=32, activation="swiglu", moe=MoEConfig(n_experts=E, top_k=K))
    with torch.device(DEVICE):
        layer = MoE(config).to(torch.bfloat16)
    with torch.no_grad():  # HF: gate_up_proj (E, 2F, C) = [gate; up], down_proj (E, C, F)
        gate, up = hf.experts.gate_up_proj.chunk(2, dim=1)
        layer.experts.w1.copy_(gate)
        layer.experts.w3.copy_(up)
        layer.experts.w2.copy_(hf.experts.down_proj)
        layer.router.gate.weight.copy_(hf.gate.weight)
    return layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(1, args.tokens, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    hf = hf_layer("eager")
    ours = tformer_layer(hf)
    with torch.no_grad():
        err = ((ours(x).float() - hf(x).float()).norm() / hf(x).float().norm()).item()
    print(json.dumps({"relative_difference_ours_vs_hf": round(err, 5)}), flush=True)
    variants = {"tformer eager": ours, "tformer compiled": torch.compile(ours, fullgraph=True), "hf eager": hf}
    hf_grouped = hf_layer("grouped_mm")  # what a full HF model picks by default where it can dispatch
    hf_grouped.load_state_dict(hf.state_dict())
    variants["hf grouped_mm"] = hf_grouped
    flop = 3 * 2 * D * FFN * K * 3 * args.tokens
    rows = []
    for name, layer in variants.items():
        t = time_fwd_bwd(layer, x, grad, args.repeats)
        rows.append({"variant": name, "ms": round(t * 1e3, 2), "tokens_per_s": round(args.tokens / t),
                     "tflops": round(flop / t / 1e12, 1)})
        print(json.dumps(rows[-1]), flush=True)
    hf_tok = max(r["tokens_per_s"] for r in rows if r["variant"].startswith("hf"))  # the faster HF variant
    print(f"\ndevice: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'variant':18} {'ms':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'vs hf':>6}")
    for r in rows:
        print(f"{r['variant']:18} {r['ms']:>8.2f} {r['tokens_per_s']:>10,} {r['tflops']:>8.1f} "
              f"{r['tokens_per_s'] / hf_tok:>5.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
