"""Where decode time goes: kernel time per generated token (or per speculative round).

    python bench/profile_decode.py [--gpt-fast third_party/gpt-fast-src] [--new 64] [--variants ...]

Runs bench/decode.py's batch-1 setup, warms up, then profiles one generate call and prints GPU
kernel time and wall time per unit, and the most expensive kernels. Variants: tformer,
tformer-int8, tformer-int4, gpt-fast, and spec-kN, a compiled greedy speculative round with
k = N: the target shape of bench/speculative.py and a 4-layer draft --draft-dim wide (same
vocabulary; `--vocab 8192 --draft-dim 512` is that script's pair), random weights. A round costs
the same whatever is accepted, so its unit is one round.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from decode import gpt_fast_runner, tformer_runner, tformer_variant  # noqa: E402

from tformer.presets import get_preset  # noqa: E402


def report(name: str, run, rows: int, per: int | None = None, unit: str = "tok") -> None:
    """Timings per unit: `per` units a call, or as many as run() returns (rounds)."""

    def units() -> int:
        out = run()
        return per if per is not None else out

    units()
    units()
    torch.cuda.synchronize()
    t = time.perf_counter()
    n = units()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / n
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        n = units()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu = sum(e.self_device_time_total for e in events) / 1e3 / n
    print(f"\n== {name}: wall {wall * 1e3:.3f} ms/{unit}, GPU kernels {gpu:.3f} ms/{unit}")
    events.sort(key=lambda e: -e.self_device_time_total)
    for e in events[:rows]:
        print(f"{e.self_device_time_total / 1e3 / n:8.4f} ms/{unit} {e.count / n:6.1f}/{unit}  {e.key[:90]}")


def speculative_runner(config, prompt, new: int, k: int, draft_dim: int = 256):
    from tformer.generate import SamplingConfig
    from tformer.generate.speculative import compiled_spec_steps, speculative_generate
    from tformer.models import build_model, with_decode_kernels

    heads = draft_dim // 64
    draft_config = config.replace(dim=draft_dim, n_layers=4, n_heads=heads, n_kv_heads=heads, ffn_dim=3 * draft_dim,
                                  tie_embeddings=True)
    target, draft = (with_decode_kernels(build_model(c, device="cuda", dtype=torch.bfloat16).eval())
                     for c in (config, draft_config))
    steps, greedy = compiled_spec_steps(), SamplingConfig(temperature=0)

    def run() -> int:
        _, stats = speculative_generate(target, draft, prompt.tolist(), new, k=k, sampling=greedy, steps=steps)
        return stats.target_forwards

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpt-fast", type=Path, default=Path("third_party/gpt-fast-src"))
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rows", type=int, default=14)
    ap.add_argument("--vocab", type=int, help="vocabulary size (default: Llama-3.2-1B's 128256; bench/speculative.py's "
                                              "pair has 8192)")
    ap.add_argument("--draft-dim", type=int, default=256, help="spec-kN: the 4-layer draft's width")
    ap.add_argument("--variants", default="tformer,gpt-fast",
                    help="comma-separated: tformer, tformer-int8, tformer-int4 (each may end in :nopdl), gpt-fast, "
                         "spec-kN (N draft tokens)")
    args = ap.parse_args()
    config = get_preset("llama-3.2-1b").replace(tie_embeddings=False, max_seq_len=2048)
    if args.vocab:
        config = config.replace(vocab_size=args.vocab)
    prompt = torch.randint(0, config.vocab_size, (128,))
    for name in args.variants.split(","):
        if name.startswith("spec-k"):
            report(name, speculative_runner(config, prompt, args.new, int(name[6:]), args.draft_dim), args.rows, unit="round")
            continue
        if name == "gpt-fast":
            _, run = gpt_fast_runner(args.gpt_fast, config, prompt, args.new, 1)
        else:
            _, run = tformer_runner(config, prompt, args.new, 1, *tformer_variant(name))
        report(name, run, args.rows, per=args.new)


if __name__ == "__main__":
    main()
