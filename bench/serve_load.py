"""bench/serve.py's workload, load drivers and per-request records: what every implementation shares."""

from __future__ import annotations

import gc
import math
import random
import threading
import time
from dataclasses import dataclass, field

import torch

TEMPERATURE, TOP_K = 0.8, 200


@dataclass
class Record:
    """One request's arrival and the times its tokens arrived."""
    t0: float
    stamps: list[float] = field(default_factory=list)
    ok: bool = True


@dataclass
class Lengths:
    prompt_median: int
    prompt_max: int
    output_median: int
    output_max: int


def workload(n: int, vocab: int, lengths: Lengths, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt ids, output tokens) per request: lognormal lengths, capped; random prompt tokens."""
    rng = random.Random(seed)

    def draw(median, sigma, lo, hi):
        return max(lo, min(hi, round(rng.lognormvariate(math.log(median), sigma))))

    out = []
    for _ in range(n):
        p = draw(lengths.prompt_median, 0.9, 4, lengths.prompt_max)
        out.append(([rng.randrange(vocab) for _ in range(p)], draw(lengths.output_median, 0.8, 8, lengths.output_max)))
    return out


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a large copy (median of 20 after 5)."""
    src = torch.randn((256 if device.type == "cuda" else 16) * 2**20, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / sorted(times[5:])[len(times[5:]) // 2]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- load drivers: run_one(index, request, t0) -> Record -------------------------------------------

def closed_loop(run_one, requests, concurrency: int, deadline: float) -> list[Record]:
    """`concurrency` clients, each sending its next request when its last one ended, until the deadline."""
    todo, lock, records = iter(enumerate(requests)), threading.Lock(), []

    def client():
        while time.perf_counter() < deadline:
            with lock:
                item = next(todo, None)
            if item is None:
                return
            records.append(run_one(*item, time.perf_counter()))

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def open_loop(run_one, requests, rate: float, deadline: float, seed: int = 1) -> list[Record]:
    """Poisson arrivals at `rate` a second, one thread a request; a request's arrival is its scheduled
    time, so a late start counts against the engine."""
    rng, records, threads = random.Random(seed), [], []
    arrival = time.perf_counter()
    for i, request in enumerate(requests):
        arrival += rng.expovariate(rate)
        if arrival > deadline:
            break
        time.sleep(max(0.0, arrival - time.perf_counter()))
        threads.append(threading.Thread(target=lambda i=i, r=request, t=arrival: records.append(run_one(i, r, t))))
        threads[-1].start()
    for t in threads:
        t.join()
    return records


def drive(run_one, requests, setting: tuple[str, float], deadline: float) -> list[Record]:
    kind, value = setting
    if kind == "rate":
        return open_loop(run_one, requests, value, deadline)
    return closed_loop(run_one, requests, int(value), deadline)


def percentile(xs: list[float], q: float) -> float | None:
    return round(1e3 * torch.tensor(xs, dtype=torch.float64).quantile(q).item(), 2) if xs else None


def summarize(impl: str, setting: tuple[str, float], records: list[Record], extra: dict) -> dict:
    done = [r for r in records if r.ok and r.stamps]
    tokens = sum(len(r.stamps) for r in done)
    span = max((r.stamps[-1] for r in done), default=0) - min((r.t0 for r in records), default=0)
    itl = [b - a for r in done for a, b in zip(r.stamps, r.stamps[1:])]
    tpot = [(r.stamps[-1] - r.stamps[0]) / (len(r.stamps) - 1) for r in done if len(r.stamps) > 1]
    ttft = [r.stamps[0] - r.t0 for r in done]
    return {"impl": impl, "setting": label(setting), "requests": len(done), "failed": len(records) - len(done),
            "output_tokens": tokens, "seconds": round(span, 2),
            "output_tok_s": round(tokens / span, 1) if done and span > 0 else None,
            "ttft_p50_ms": percentile(ttft, 0.5), "ttft_p99_ms": percentile(ttft, 0.99),
            "itl_p50_ms": percentile(itl, 0.5), "itl_p99_ms": percentile(itl, 0.99),
            "tpot_p50_ms": percentile(tpot, 0.5), **extra}


def label(setting: tuple[str, float]) -> str:
    kind, value = setting
    return f"rate {value:g}/s" if kind == "rate" else f"C {int(value)}"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
