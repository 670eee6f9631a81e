"""Serving under load on one GPU: tformer's ServeEngine vs HF transformers, driven in one process.

    python bench/serve.py [--variants ...] [--concurrency 1 16 64] [--rates 8] [--json out.json]
    python bench/serve.py --tiny --device cpu      # every variant on a toy shape: a smoke test

On the lent H100, the whole table in one call of at most 9 minutes (about 6 by estimate; no setting
starts past --budget-s 480 less --max-s 50, each stops sending requests after --max-s; the unbounded
pieces are the batch-1 baseline's compile and HF's continuous-batching warm-up):
    export PYTHONPATH=src PYTHONUNBUFFERED=1; python3 bench/serve.py --json $OUT/serve.json 2>&1 | tee $OUT/serve.log

Shape: Llama-3.2-1B with an untied head (as bench/decode.py), random bf16 weights, max_seq_len 2048.
Workload: 256 requests drawn once (seed 0): random prompt tokens, ShareGPT-like lengths (prompt
lognormal, median 200, sigma 0.9, 4..1000 tokens; output median 150, sigma 0.8, 8..500, mean ~196),
no stop tokens (every implementation emits exactly the asked number), temperature 0.8, top-k 200.
Each setting takes the first n requests of that list, so its rows share requests:

    closed loop, C streams   n = min(256, max(8, 4 C)): 8 at C 1, 64 at C 16, 256 at C 64; C client
                             threads, each sends its next request when the last one ended
    open loop, rate R        all 256, Poisson arrivals at R requests/s, one client thread each
    HF static, batch C       n = min(256, 2 C): batches of C in order, left-padded, each run to its
                             longest request (HF `generate`, eager, SDPA)

Variants: tformer (ServeEngine, in-process, default settings: blocks of 16, 64 running, prefill chunks
of 512, prefix caching on; a fresh engine a setting, so no prompt hits the cache of an earlier one),
tformer-generate (`tformer generate --compile` one request at a time: DecodeEngine(compile=True,
max_batch_size=1) on the C=1 requests, each timed on its second run (GenerateClient); eager on CPU),
hf-static, hf-cb (HF's ContinuousBatchingManager as `generate_batch` sets it up, closed or open loop).
The anchors run at --anchor-concurrency (64). HTTP is not included: this is the engine alone.

Metrics: output tok/s = output tokens / (first arrival .. last token); TTFT = first token - arrival
(queueing included); ITL = gaps between a request's tokens; TPOT = a request's (last - first token) /
(tokens - 1). tformer's stamps are taken by the client thread as it reads each token off its stream;
HF CB's by HF's own `record_timestamps` inside its loop (no client work per token: in its favour);
tformer-generate's come from synchronised calls (GenerateClient), so its ITL is its TPOT. Decode
bandwidth share: bytes a decode step must read (weights but the embedding, plus the KV of every live
request's context) / its time / the device-to-device copy bandwidth measured in the run; tformer's
step time is GPU time between CUDA events around the engine's decode (host gaps inside included),
with host time per step in the JSON (decode_host_ms, decode_forward_launch_ms); HF static's is the
time between its steps, counting only the rows still wanted; HF CB has none. x HF static and x HF CB:
against the anchors' rows at the largest --anchor-concurrency (64). A setting sends no request after
--max-s; those in flight finish.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # serve_load, serve_hf: this script's parts

from serve_hf import HFContinuousClient, hf_cb_missing, hf_model, hf_static_rows  # noqa: E402
from serve_load import (  # noqa: E402
    TEMPERATURE, TOP_K, Lengths, Record, copy_bandwidth, drive, free_memory, label, summarize, sync, workload,
)

from tformer.inference import DecodeEngine, EngineOptions, SamplingConfig  # noqa: E402
from tformer.models import build_model  # noqa: E402
from tformer.presets import get_preset  # noqa: E402
from tformer.serve.engine import EngineFull, GenerationRequest, ServeEngine  # noqa: E402

VARIANTS = ("tformer-generate", "tformer", "hf-static", "hf-cb")


# --- tformer ---------------------------------------------------------------------------------------

class DecodeMeter:
    """Wraps a ServeEngine's decode: the bytes each step must read, its GPU (or CPU) time, and the
    host's time launching the forward, per step."""

    def __init__(self, engine: ServeEngine, weight_bytes: int, kv_per_token: int):
        self.engine, self.weight_bytes, self.kv_per_token = engine, weight_bytes, kv_per_token
        self.steps: list[tuple] = []  # (start, end, bytes, rows, host s, forward launch s)
        self.in_decode, self.forward_s = False, 0.0
        decode, forward = engine._decode, engine._forward
        cuda = engine.device.type == "cuda"

        def timed_forward(*args):
            t = time.perf_counter()
            out = forward(*args)
            if self.in_decode:
                self.forward_s += time.perf_counter() - t
            return out

        def timed_decode(seqs):
            nbytes = weight_bytes + kv_per_token * sum(len(s.tokens) for s in seqs)
            rows, self.in_decode, self.forward_s, host = len(seqs), True, 0.0, time.perf_counter()
            start = self.mark(cuda)
            decode(seqs)  # ends in a host sync (the sampled tokens' .tolist())
            end = self.mark(cuda)
            self.in_decode = False
            self.steps.append((start, end, nbytes, rows, time.perf_counter() - host, self.forward_s))

        engine._decode, engine._forward = timed_decode, timed_forward

    @staticmethod
    def mark(cuda: bool):
        """Now: a recorded CUDA event (GPU time), else the host clock."""
        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def summary(self, bandwidth: float) -> dict:
        if not self.steps:
            return {}
        sync(self.engine.device)
        secs = [s.elapsed_time(e) / 1e3 if isinstance(s, torch.cuda.Event) else e - s for s, e, *_ in self.steps]
        n = len(self.steps)
        return {"decode_bw_share": round(sum(st[2] for st in self.steps) / sum(secs) / bandwidth, 3),
                "decode_steps": n, "decode_rows_mean": round(sum(st[3] for st in self.steps) / n, 1),
                "decode_step_ms": round(1e3 * sum(secs) / n, 2),
                "decode_host_ms": round(1e3 * sum(st[4] for st in self.steps) / n, 2),
                "decode_forward_launch_ms": round(1e3 * sum(st[5] for st in self.steps) / n, 2)}


class ServeClient:
    """tformer's ServeEngine (default settings) behind `run_one`; a fresh engine a setting."""

    def __init__(self, model, ctx):
        self.model, self.engine = model, ServeEngine(model)
        self.meter = DecodeMeter(self.engine, ctx.weight_bytes, ctx.kv_per_token)
        self.bandwidth = ctx.bandwidth
        self.engine.start()
        for p in [[1] * 32, [2] * 32]:  # warm-up: the first forwards' one-off costs
            list(self.engine.submit(GenerationRequest(p, 4, temperature=TEMPERATURE)))
        self.meter.steps.clear()

    def run_one(self, i, request, t0) -> Record:
        prompt, n = request
        record = Record(t0)
        while True:
            try:
                stream = self.engine.submit(GenerationRequest(prompt, n, temperature=TEMPERATURE, top_k=TOP_K, seed=i))
                break
            except EngineFull:
                time.sleep(0.005)
        for event in stream:
            if event.finish_reason == "abort":
                record.ok = False
            else:
                record.stamps.append(time.perf_counter())
        return record

    def close(self) -> dict:
        extra = {**self.meter.summary(self.bandwidth), "preempted": self.engine.stats()["preempted"]}
        self.engine.stop()
        self.model.clear_caches()
        return extra


class GenerateClient:
    """`tformer generate --compile` (eager on a CPU), one request at a time. Its streaming callbacks run
    ahead of the GPU, and a call whose cache size is new compiles or captures, so each request is timed
    from synchronised calls, each the second of two alike: TTFT from a call for one token, every later
    token at TTFT + k (total - TTFT) / (n - 1); tok/s = tokens / the timed calls' time."""

    def __init__(self, config, requests, ctx):
        self.ctx, self.compile = ctx, ctx.device.type == "cuda"
        self.engine = DecodeEngine(build_model(config, device=ctx.device, dtype=ctx.dtype).eval(),
                                   EngineOptions(compile=self.compile, max_batch_size=1))
        self.sampling = SamplingConfig(temperature=TEMPERATURE, top_k=TOP_K)
        # compiles: a first shape, then a second (dynamo recompiles for dynamic shapes, used by every later one)
        self.first_call_s = sum(self.timed([1] * length, n, 0)[2] for length, n in ((64, 8), (150, 20)))
        self.tokens, self.seconds, self.decode_bytes, self.decode_s = 0, 0.0, 0.0, 0.0

    def timed(self, prompt, n, seed) -> tuple[int, float, float]:
        """(tokens made, start, seconds) of a generate call."""
        sync(self.ctx.device)
        t = time.perf_counter()
        tokens = self.engine.generate([prompt], n, self.sampling, seed=seed)[0]  # ends in a host sync
        return len(tokens), t, time.perf_counter() - t

    def run_one(self, i, request, t0) -> Record:
        prompt, n = request
        ttft = [self.timed(prompt, 1, i) for _ in range(2)][-1][2]
        got, start, total = [self.timed(prompt, n, i) for _ in range(2)][-1]
        tpot, ctx = (total - ttft) / max(1, n - 1), self.ctx
        self.tokens, self.seconds, self.decode_s = self.tokens + got, self.seconds + total, self.decode_s + total - ttft
        self.decode_bytes += (n - 1) * ctx.weight_bytes + ctx.kv_per_token * sum(len(prompt) + j for j in range(1, n))
        return Record(start, [start + ttft + k * tpot for k in range(got)], got == n)

    def close(self) -> dict:
        self.engine.close()
        share = self.decode_bytes / self.decode_s / self.ctx.bandwidth if self.decode_s > 0 else None
        return {"compile": self.compile, "first_call_s": round(self.first_call_s, 1),
                "decode_bw_share": share and round(share, 3), "seconds": round(self.seconds, 2),
                "output_tok_s": round(self.tokens / self.seconds, 1) if self.seconds else None}


def serve_rows(model, requests, args, ctx) -> None:
    settings = [("concurrency", c) for c in args.concurrency] + [("rate", r) for r in args.rates]
    measure("tformer", settings, lambda _: ServeClient(model, ctx), requests, args, ctx)


def measure(impl: str, settings, make, requests, args, ctx) -> None:
    """For each setting: a client from make(its requests) (setup), the load, a row."""
    for setting in settings:
        if (skip := ctx.out_of_time()) is not None:
            ctx.skipped(impl, setting, skip)
            continue
        subset, t = requests[:ctx.count(setting)], time.perf_counter()
        client = make(subset)
        setup = time.perf_counter() - t
        try:
            records = drive(client.run_one, subset, setting, time.perf_counter() + args.max_s)
        finally:
            extra = client.close()
            del client
            free_memory()
        ctx.emit(summarize(impl, setting, records, {"setup_s": round(setup, 1), **extra}))


# --- results ---------------------------------------------------------------------------------------

class Context:
    """What every measurement shares: device, bandwidth, byte counts, request counts, the time budget."""

    def __init__(self, args, config, device, dtype, bandwidth, weight_bytes):
        self.args, self.device, self.dtype = args, device, dtype
        self.bandwidth, self.weight_bytes = bandwidth, weight_bytes
        self.kv_per_token = 2 * config.n_layers * config.n_kv_heads * config.head_dim * dtype.itemsize
        self.start, self.rows = time.perf_counter(), []

    def count(self, setting) -> int:
        kind, value = setting
        n = self.args.requests
        return n if kind == "rate" else min(n, max(8, 4 * int(value)))

    def out_of_time(self) -> str | None:
        elapsed = time.perf_counter() - self.start
        if elapsed + self.args.max_s > self.args.budget_s:
            return f"time budget: {elapsed:.0f} s spent of --budget-s {self.args.budget_s:g}"
        return None

    def skipped(self, impl, setting, why: str) -> dict:
        return self.emit({"impl": impl, "setting": label(setting), "skipped": why})

    def emit(self, row: dict) -> dict:
        row["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        print(json.dumps(row), flush=True)
        self.rows.append(row)
        if self.args.json:
            self.args.json.write_text(json.dumps({"header": header(self), "rows": self.rows}, indent=2))
        return row


def header(ctx: Context) -> dict:
    import transformers

    name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "copy_bandwidth_tb_s": round(ctx.bandwidth / 1e12, 3), "tiny": ctx.args.tiny}


def table(rows: list[dict], anchor_setting: str) -> str:
    def ref(impl):
        return next((r["output_tok_s"] for r in rows if r["impl"] == impl and r["setting"] == anchor_setting
                     and r.get("output_tok_s")), None)

    static, cb = ref("hf-static"), ref("hf-cb")

    def f(x, fmt=",.1f"):
        return "" if x is None else format(x, fmt)

    lines = ["| impl | setting | requests | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | "
             "TPOT p50 ms | decode BW share | x HF static | x HF CB |", "|" + " --- |" * 2 + " ---: |" * 10]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['impl']} | {r['setting']} | skipped: {r['skipped']} |" + " |" * 9)
            continue
        tok = r["output_tok_s"]
        ratio = [f"{tok / a:.2f}×" if tok and a else "" for a in (static, cb)]
        lines.append(f"| {r['impl']} | {r['setting']} | {r['requests']} | {f(tok)} | {f(r['ttft_p50_ms'])} | "
                     f"{f(r['ttft_p99_ms'])} | {f(r['itl_p50_ms'], '.2f')} | {f(r['itl_p99_ms'], '.2f')} | "
                     f"{f(r['tpot_p50_ms'], '.2f')} | {f(r.get('decode_bw_share'), '.3f')} | {ratio[0]} | {ratio[1]} |")
    return "\n".join(lines)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--concurrency", type=int, nargs="*", help="tformer's closed-loop settings (1 16 64)")
    ap.add_argument("--rates", type=float, nargs="*", help="tformer's open-loop rates, requests/s (8)")
    ap.add_argument("--anchor-concurrency", type=int, nargs="*", help="HF static batch sizes and HF CB streams (64)")
    ap.add_argument("--anchor-rates", type=float, nargs="*", default=[], help="HF CB open-loop rates (none)")
    ap.add_argument("--requests", type=int, help="the workload's size (256)")
    ap.add_argument("--max-s", type=float, help="a setting stops sending requests after this many seconds (50)")
    ap.add_argument("--budget-s", type=float, help="no setting starts after budget - max-s seconds (480)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="toy shape and lengths, few requests: a smoke test")
    ap.add_argument("--json", type=Path, help="write the header and rows here (after every measurement)")
    args = ap.parse_args()
    tiny = dict(concurrency=[1, 4], rates=[40.0], anchor_concurrency=[4], requests=16, max_s=10.0, budget_s=120.0)
    full = dict(concurrency=[1, 16, 64], rates=[8.0], anchor_concurrency=[64], requests=256, max_s=50.0, budget_s=480.0)
    for k, v in (tiny if args.tiny else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if unknown := set(args.variants.split(",")) - set(VARIANTS):
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}: choose from {', '.join(VARIANTS)}")
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = get_preset("llama-3.2-1b").replace(tie_embeddings=False, max_seq_len=2048)
    lengths = Lengths(200, 1000, 150, 500)
    if args.tiny:
        if device.type == "cpu":
            torch.set_num_threads(1)  # toy-sized ops gain nothing from threads, and a shared host's cores stall them
        config = config.replace(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, vocab_size=512,
                                max_seq_len=256)
        lengths = Lengths(24, 96, 16, 48)
    torch.manual_seed(0)
    model = build_model(config, device=device, dtype=dtype).eval()
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "emb" not in n)
    ctx = Context(args, config, device, dtype, copy_bandwidth(device), weight_bytes)
    requests = workload(args.requests, config.vocab_size, lengths)
    print(json.dumps(header(ctx)), flush=True)
    variants = args.variants.split(",")
    if "tformer-generate" in variants:  # first: its compile is the run's largest unknown cost
        measure("tformer-generate", [("concurrency", 1)], lambda reqs: GenerateClient(config, reqs, ctx),
                requests, args, ctx)
    if "tformer" in variants:
        serve_rows(model, requests, args, ctx)
    del model
    free_memory()
    if "hf-static" in variants or "hf-cb" in variants:
        hf = hf_model(config, ctx)  # one model for both: HF CB swaps its attention for a paged one while it runs
        if "hf-static" in variants:
            hf_static_rows(hf, requests, args, ctx)
        settings = [("concurrency", c) for c in args.anchor_concurrency] + [("rate", r) for r in args.anchor_rates]
        if "hf-cb" in variants and (why := hf_cb_missing(hf)):
            for setting in settings:
                ctx.skipped("hf-cb", setting, why)
        elif "hf-cb" in variants:
            measure("hf-cb", settings, lambda reqs: HFContinuousClient(hf, reqs, ctx), requests, args, ctx)
    anchor = label(("concurrency", max(args.anchor_concurrency, default=64)))
    print(f"\n{header(ctx)}; x HF: against the anchors at {anchor}\n{table(ctx.rows, anchor)}")


if __name__ == "__main__":
    sys.exit(main())
