"""Where decode time goes: kernel time per generated token (or per speculative round).

    python bench/profile_decode.py [--gpt-fast third_party/gpt-fast-src] [--new 64] [--variants ...]

Runs bench/decode.py's batch-1 setup, warms up, then profiles one generate call and prints GPU
kernel time and wall time per unit, and the most expensive kernels. Variants: tformer,
tformer-int8, tformer-int4, gpt-fast, and spec-kN, a compiled greedy speculative round with
k = N: the target shape of bench/speculative.py and a --draft-layers x --draft-dim draft (same
vocabulary; `--vocab 8192 --draft-dim 512` is that script's pair), random weights. A round costs
the same whatever is accepted, so its unit is one round.

Under programmatic dependent launch a kernel starts before the one it waits for ends, and the
profiler counts that wait as its own time, so per-kernel sums overstate. The critical path does
not: in a step's chain of dependent kernels, a kernel's share of the wall time is how far it moves
the latest end time on (`end - max(earlier ends)`). `--out DIR` writes, per variant, that share by
kernel name and the ordered kernel list of one unit in the middle of the run (DIR/<variant>.txt),
and the Chrome trace (DIR/<variant>.json.gz).
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


def critical_path(prof, n: int, unit_ms: float, unit: str, out: Path, name: str) -> str:
    """Each kernel's share of the wall time, `end - max(earlier ends)` (module docstring), summed by kernel
    name per unit; writes the table and one unit's ordered kernels (from the middle of the run) to out/."""
    ks = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CUDA)
    if not ks:
        return "no kernels recorded"
    share: dict[str, list[float]] = {}
    lines, latest = [], ks[0][0]
    mid = (ks[0][0] + ks[-1][1]) / 2
    for start, end, kname in ks:
        moved = max(0.0, end - latest)
        idle = max(0.0, start - latest)  # nothing ran on the GPU before this kernel started
        row = share.setdefault(kname, [0.0, 0, 0.0])
        row[0], row[1], row[2] = row[0] + moved, row[1] + 1, row[2] + idle
        if mid <= start < mid + unit_ms * 1e3:
            lines.append(f"{start - mid:9.1f} {end - start:7.1f} {moved:7.1f} {idle:6.1f}  {kname[:110]}")
        latest = max(latest, end)
    table = sorted(share.items(), key=lambda kv: -kv[1][0])
    total = sum(v[0] for v in share.values()) / n
    head = (f"{name}: critical path {total / 1e3:.3f} ms/{unit} (wall {unit_ms:.3f}); by kernel: "
            f"ms/{unit}, calls/{unit}, idle before them ms/{unit}")
    body = [f"{v[0] / 1e3 / n:8.4f} {v[1] / n:6.1f} {v[2] / 1e3 / n:8.4f}  {k[:110]}" for k, v in table]
    text = "\n".join([head, *body, "", f"one {unit} from the middle: start us, duration, moved the end by, idle before",
                      *lines])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.txt").write_text(text + "\n")
    prof.export_chrome_trace(str(out / f"{name}.json.gz"))
    return "\n".join([head, *body[:12]])


def report(name: str, run, rows: int, per: int | None = None, unit: str = "tok", out: Path | None = None) -> None:
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
    averages = prof.key_averages()
    events = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu = sum(e.self_device_time_total for e in events) / 1e3 / n
    print(f"\n== {name}: wall {wall * 1e3:.3f} ms/{unit}, GPU kernels {gpu:.3f} ms/{unit}")
    launches = {e.key: e.count / n for e in averages if e.key in LAUNCHES}
    print("host launches per " + unit + ": " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(launches.items())))
    events.sort(key=lambda e: -e.self_device_time_total)
    for e in events[:rows]:
        print(f"{e.self_device_time_total / 1e3 / n:8.4f} ms/{unit} {e.count / n:6.1f}/{unit}  {e.key[:90]}")
    if out is not None:
        print(critical_path(prof, n, wall * 1e3, unit, out, name.replace(":", "_")))


LAUNCHES = ("cudaGraphLaunch", "cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC",
            "cudaMemcpyAsync", "cudaMemsetAsync")


def host_profile(name: str, run, per: int, top: int = 30) -> None:
    """The host's own time per unit by Python function (cProfile, after a warm-up call), and whether
    inductor skipped a CUDA graph: a step that is not one graph replay launches its kernels one by one."""
    import cProfile
    import pstats

    from torch._dynamo.utils import counters

    run()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    t = time.perf_counter()
    pr.enable()
    run()
    pr.disable()
    host = (time.perf_counter() - t) / per
    torch.cuda.synchronize()
    skips = counters["inductor"]["cudagraph_skips"]  # the reasons are logged as perf hints (main turns them on)
    print(f"\n== {name} host: {host * 1e3:.3f} ms/tok before the final sync (profiled); cudagraph skips: {skips}")
    stats = pstats.Stats(pr)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # by own time
    print("own ms/tok  total ms/tok  calls/tok  function")
    for (file, line, fn), (_, calls, own, total, _) in rows:
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if line else file
        print(f"{own / per * 1e3:10.4f} {total / per * 1e3:12.4f} {calls / per:10.1f}  {fn} {where[-70:]}")


def speculative_runner(config, prompt, new: int, k: int, draft_dim: int = 256, draft_layers: int = 4):
    from tformer.inference import DecodeEngine, EngineOptions, SamplingConfig, speculative_generate
    from tformer.models import build_model

    heads = draft_dim // 64
    draft_config = config.replace(dim=draft_dim, n_layers=draft_layers, n_heads=heads, n_kv_heads=heads, ffn_dim=3 * draft_dim,
                                  tie_embeddings=True)
    # compile on CUDA: both prompts' forwards compiled, each round replayed from one CUDA graph
    options = EngineOptions(max_batch_size=1, compile=True, cuda_graphs=True)
    target, draft = (DecodeEngine(build_model(c, device="cuda", dtype=torch.bfloat16).eval(), options)
                     for c in (config, draft_config))
    greedy = SamplingConfig(temperature=0)

    def run() -> int:
        _, stats = speculative_generate(target, draft, prompt.tolist(), new, k=k, sampling=greedy)
        return stats.target_forwards

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpt-fast", type=Path, default=Path("third_party/gpt-fast-src"))
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rows", type=int, default=14)
    ap.add_argument("--vocab", type=int, help="vocabulary size (default: Llama-3.2-1B's 128256; bench/speculative.py's "
                                              "pair has 8192)")
    ap.add_argument("--draft-dim", type=int, default=256, help="spec-kN: the draft's width")
    ap.add_argument("--draft-layers", type=int, nargs="+", default=[4], help="spec-kN: the draft's layers (each "
                                                                           "count in turn)")
    ap.add_argument("--out", type=Path, help="write each variant's critical path, one unit's kernels and its Chrome "
                                             "trace here (module docstring)")
    ap.add_argument("--host", action="store_true", help="also profile the host side of each tformer/gpt-fast "
                                                          "variant by Python function (cProfile)")
    ap.add_argument("--variants", default="tformer,gpt-fast",
                    help="comma-separated: tformer, tformer-int8, tformer-int4 (each may end in :nopdl, :tree "
                         "and, for int4, :tinygemm, as in bench/decode.py), gpt-fast, spec-kN (N draft tokens)")
    args = ap.parse_args()
    if args.host:
        torch._logging.set_logs(perf_hints=True)  # "skipping cudagraphs due to ..."
    config = get_preset("llama-3.2-1b").replace(tie_embeddings=False, max_seq_len=2048)
    if args.vocab:
        config = config.replace(vocab_size=args.vocab)
    prompt = torch.randint(0, config.vocab_size, (128,))
    for name in args.variants.split(","):
        if name.startswith("spec-k"):
            for layers in args.draft_layers:
                run = speculative_runner(config, prompt, args.new, int(name[6:]), args.draft_dim, layers)
                report(f"{name}-L{layers}", run, args.rows, unit="round", out=args.out)
            continue
        if name == "gpt-fast":
            _, run = gpt_fast_runner(args.gpt_fast, config, prompt, args.new, 1)
        else:
            _, run = tformer_runner(config, prompt, args.new, 1, tformer_variant(name))
        report(name, run, args.rows, per=args.new, out=args.out)
        if args.host:
            host_profile(name, run, args.new)


if __name__ == "__main__":
    main()
