"""Decode speed on one GPU: tformer vs gpt-fast vs HF `generate`, timed in one process.

    python bench/decode.py [--gpt-fast third_party/gpt-fast-src] [--batch 1 8] [--new 256]
    python bench/decode.py --floor 16 2     # the step's fixed cost, on near-weightless models

Shape: Llama-3.2-1B with an untied output head (gpt-fast cannot tie, so every implementation
reads the same bytes per token), random bf16 weights, a 128-token prompt, 256 new tokens,
temperature 0.8 and top-k 200 (gpt-fast's defaults). tokens/s = new tokens / wall time of the
whole generate call (prefill included), median of --repeats after one warm-up call whose time is
reported as the first-call (compile) time. Roofline: bytes read per token (all weights but the
embedding table, plus the KV cache at its mean length) against the measured device-to-device
copy bandwidth. tformer's rows also give the host's own time per step (its first 64 steps, while
the GPU is still behind), to tell a GPU-bound step from a host-bound one, and the time to the first
token (a generate call of one new token: the prompt's forward and first sample; median of 5).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch._inductor.config as inductor_config

from tformer.inference import DecodeEngine, EngineOptions, SamplingConfig
from tformer.models import build_model
from tformer.presets import get_preset

sys.path.insert(0, str(Path(__file__).parent))
from ablations import tree_decode, uncaptured_prefill  # noqa: E402

# gpt-fast's inductor settings; tformer's decode step overrides coordinate-descent tuning (off: see
# tformer.inference.steps.COMPILE_OPTIONS), its prefill compiles with these
inductor_config.coordinate_descent_tuning = True
inductor_config.triton.unique_kernel_names = True
inductor_config.fx_graph_cache = True


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy (median of 20)."""
    src = torch.randn(256 * 2**20, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * src.numel() * 4 / statistics.median(times[5:])


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        runs.append(time.perf_counter() - t)
    return first, runs


class Variant(NamedTuple):
    """A tformer row's settings (`tformer_variant`)."""

    quantize: str | None = None  # None, "int8" or "int4"
    pdl: bool = True  # programmatic dependent launch (EngineOptions.pdl)
    int4: str = "matvec"  # one-row int4 layers: fused "matvec" kernels or PyTorch's "tinygemm" (EngineOptions.int4)
    captured: bool = True  # the loop in the engine's CapturedDecode, else torch.compile's CUDA-graph tree
    captured_prefill: bool = True  # the prompt's forward in the engine's CapturedPrefill, else compiled, no graph
    one_step: bool = False  # one decode step a CapturedDecode replay (EngineOptions.steps_per_replay=1)


def tformer_runner(config, prompt, new, batch, variant: Variant = Variant()):
    torch._dynamo.reset()  # else a variant reuses the last one's compiled step, re-recorded without warm-up
    model = build_model(config, device="cuda", dtype=torch.bfloat16).eval()
    if variant.quantize:
        from tformer.quantize import quantize_model

        quantize_model(model, mode=variant.quantize, group_size=64)  # the untied head as int8 in both modes
    # as `tformer generate --compile`: fused kernels, CapturedPrefill and CapturedDecode
    options = EngineOptions(max_batch_size=batch, compile=True, cuda_graphs=True, int4=variant.int4, pdl=variant.pdl)
    if variant.one_step:
        options = dataclasses.replace(options, steps_per_replay=1)
    engine = DecodeEngine(model, options)
    if not variant.captured:
        tree_decode(engine)
    if not variant.captured_prefill:
        uncaptured_prefill(engine)
    sampling = SamplingConfig(temperature=0.8, top_k=200)
    prompts = [prompt.tolist()] * batch
    ticks: list[float] = []

    def run():
        ticks.clear()
        return engine.generate(prompts, new, sampling, on_tokens=lambda _: ticks.append(time.perf_counter()))

    run.host_ms = lambda: host_ms_per_step(ticks)
    run.first_token = lambda: engine.generate(prompts, 1, sampling)
    return model, run


def host_ms_per_step(ticks: list[float], steps: int = 64) -> float:
    """The host's own time per decode step: the mean gap over its first `steps` streaming callbacks
    (a replay of several steps makes its tokens' callbacks at once, so a median gap would say 0).
    Nothing in the loop waits on the GPU, so while the launch queue is short these gaps are host work
    alone. A step whose host time is close to its wall time is bound by the host."""
    steps = min(steps, len(ticks) - 1)
    return (ticks[steps] - ticks[0]) / steps * 1e3 if steps > 0 else float("nan")


def gpt_fast_runner(path: Path, config, prompt, new, batch):
    sys.path.insert(0, str(path))
    import generate as gf
    from model import ModelArgs, Transformer

    args = ModelArgs(block_size=config.max_seq_len, vocab_size=config.vocab_size, n_layer=config.n_layers,
                     n_head=config.n_heads, n_local_heads=config.n_kv_heads, dim=config.dim,
                     intermediate_size=config.ffn_dim, rope_base=config.rope.theta, norm_eps=config.norm_eps)
    with torch.device("cuda"):
        model = Transformer(args).to(torch.bfloat16).eval()
    gf.decode_one_token = torch.compile(gf.decode_one_token, mode="reduce-overhead", fullgraph=True)
    gf.prefill = torch.compile(gf.prefill, fullgraph=True, dynamic=True)
    x = prompt.cuda()

    def run():
        with torch.no_grad():
            gf.generate(model, x, new, batch_size=batch, interactive=False, draft_model=None,
                        temperature=0.8, top_k=200)

    return model, run


def hf_runner(config, prompt, new, batch):
    import transformers

    from tformer.convert.hf import config_to_hf

    hf_cfg = transformers.AutoConfig.for_model(**config_to_hf(config))
    with torch.device("cuda"):  # random init on the GPU: initialising a 1B model on the host and copying it is slow
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16).eval()
    x = prompt.cuda().repeat(batch, 1)

    def run():
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new, do_sample=True,
                       temperature=0.8, top_k=200, pad_token_id=0)

    return model, run


def bytes_per_token(model, config, prompt_len: int, new: int, batch: int) -> float:
    """Bytes the step must read: weights (quantized ones as stored) but the embedding table, and the KV cache."""
    skip = ("kv_cache", "int4pack", "scales_and_zeros")  # the cache is counted below; the rest are copies
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers()
                                                 if not any(k in n for k in skip)]
    weights = sum(t.numel() * t.element_size() for n, t in tensors if "emb" not in n)
    kv = 2 * config.n_layers * config.n_kv_heads * config.head_dim * 2 * (prompt_len + new / 2)
    return (weights + batch * kv) / batch  # per generated token


def tformer_variant(name: str) -> Variant:
    """"tformer[-int8|-int4][:nopdl][:tinygemm][:tree][:plainprefill][:onestep]" -> its `Variant`."""
    name, *options = name.split(":")
    known = {"nopdl", "tinygemm", "tree", "plainprefill", "onestep"}
    if unknown := set(options) - known:
        raise SystemExit(f"unknown variant option(s) {sorted(unknown)} in {name} (known: {', '.join(sorted(known))})")
    return Variant(name.split("-")[1] if "-" in name else None, "nopdl" not in options,
                   "tinygemm" if "tinygemm" in options else "matvec", "tree" not in options,
                   "plainprefill" not in options, "onestep" in options)


def floor(config, layer_counts: list[int], prompt_len: int, new: int, repeats: int) -> None:
    """Per-token time of steps whose weights take no time to read: kernel latencies, sampling and
    the host's loop, which the full-size step pays on top of its weight reads."""
    prompt = torch.randint(0, 4096, (prompt_len,))
    for layers in layer_counts:
        tiny = config.replace(n_layers=layers, dim=256, n_heads=4, n_kv_heads=2, ffn_dim=512, vocab_size=4096)
        _, run = tformer_runner(tiny, prompt, new, 1)
        first, runs = timed(run, repeats)
        ms = statistics.median(runs) / new * 1e3
        print(json.dumps({"floor_layers": layers, "ms_per_token": round(ms, 3),
                          "host_ms_per_step": round(run.host_ms(), 3), "first_call_s": round(first, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpt-fast", type=Path, default=Path("third_party/gpt-fast-src"))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="tformer,gpt-fast,hf",
                    help="comma-separated: tformer, tformer-int8, tformer-int4 (each may end in :nopdl, "
                         "kernels without programmatic dependent launch, and :tree, the step in torch.compile's "
                         "CUDA-graph tree instead of the engine's CapturedDecode, and :plainprefill, the prompt's "
                         "forward compiled without the engine's CapturedPrefill, and :onestep, one decode step a "
                         "CapturedDecode replay instead of its default; int4 in :tinygemm, one-row int4 "
                         "layers through PyTorch's tinygemm, not the fused matvec kernels), gpt-fast, hf")
    ap.add_argument("--floor", type=int, nargs="+", metavar="LAYERS",
                    help="instead: the fixed cost of tformer's bf16 step, timed on models of these layer counts "
                         "with almost no weights (dim 256, 4/2 heads, SwiGLU 512, vocabulary 4096)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    config = get_preset("llama-3.2-1b").replace(tie_embeddings=False, max_seq_len=2048)
    if args.floor:
        return floor(config, args.floor, args.prompt, args.new, args.repeats)
    bw = copy_bandwidth()
    torch.manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (args.prompt,))
    rows = []
    for batch in args.batch:
        for name in args.variants.split(","):
            torch.cuda.reset_peak_memory_stats()
            if name.startswith("tformer"):  # tformer, tformer-int8, tformer-int4, each may end in :nopdl
                model, run = tformer_runner(config, prompt, args.new, batch, tformer_variant(name))
            elif name == "gpt-fast":
                model, run = gpt_fast_runner(args.gpt_fast, config, prompt, args.new, batch)
            else:
                model, run = hf_runner(config, prompt, args.new, batch)
            first, runs = timed(run, args.repeats)
            tok_s = batch * args.new / statistics.median(runs)
            bpt = bytes_per_token(model, config, args.prompt, args.new, batch)
            row = {"impl": name, "batch": batch, "tokens_per_s": round(tok_s, 1),
                   "per_sequence_tok_s": round(tok_s / batch, 1), "roofline_share": round(tok_s * bpt / bw, 3),
                   "first_call_s": round(first, 1), "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)}
            if hasattr(run, "host_ms"):  # the last timed call's host time per step, against its wall time
                row.update(host_ms_per_step=round(run.host_ms(), 3), wall_ms_per_step=round(1e3 * batch / tok_s, 3))
            if hasattr(run, "first_token"):  # a generate call of one new token: the prompt's forward and sample
                row.update(first_token_ms=round(1e3 * statistics.median(timed(run.first_token, 5)[1]), 2))
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model, run
            gc.collect()
            torch.cuda.empty_cache()
    print(f"\ndevice: {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'impl':10} {'batch':>5} {'tokens/s':>10} {'roofline':>9} {'first call s':>13} {'mem GB':>7}")
    for r in rows:
        print(f"{r['impl']:10} {r['batch']:>5} {r['tokens_per_s']:>10,.1f} {r['roofline_share']:>9.3f} "
              f"{r['first_call_s']:>13.1f} {r['peak_mem_gb']:>7.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
