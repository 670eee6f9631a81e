"""bench/serve.py's anchors: HF transformers' static-batch `generate` and its continuous batching."""

from __future__ import annotations

import threading
import time
from importlib.metadata import version
from types import SimpleNamespace

import torch
from serve_load import TEMPERATURE, TOP_K, Record, summarize


def hf_model(config, ctx):
    import transformers

    from tformer.convert.hf import config_to_hf

    hf_cfg = transformers.AutoConfig.for_model(**config_to_hf(config))
    with torch.device(ctx.device):  # random init in place: a 1B model initialised on the host is slow to copy
        return transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=ctx.dtype).eval()


def hf_static_rows(model, requests, args, ctx) -> None:
    """HF `generate` in static batches of C (C clients, each batch started once all of the last ended):
    every row runs to the batch's longest request; a request's arrival is its batch's start."""
    model.generate(torch.ones(2, 8, dtype=torch.long, device=ctx.device), max_new_tokens=4, do_sample=True,
                   pad_token_id=0)  # warm-up
    for c in args.anchor_concurrency:
        setting = ("concurrency", c)
        if (skip := ctx.out_of_time()) is not None:
            ctx.skipped("hf-static", setting, skip)
            continue
        subset, records, decode_bytes, decode_s = requests[:min(len(requests), 2 * c)], [], 0.0, 0.0
        deadline = time.perf_counter() + args.max_s
        for b in range(0, len(subset), c):
            if time.perf_counter() > deadline:
                break
            batch = subset[b:b + c]
            width, longest = max(len(p) for p, _ in batch), max(n for _, n in batch)
            ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch], device=ctx.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device=ctx.device)
            times, t0 = [], time.perf_counter()  # a streamer that notes when each step's tokens arrive
            streamer = SimpleNamespace(put=lambda _: times.append(time.perf_counter()), end=lambda: None)
            with torch.no_grad():
                model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                               do_sample=True, temperature=TEMPERATURE, top_k=TOP_K, pad_token_id=0, streamer=streamer)
            times = times[1:]  # its first put is the prompt; then times[j]: token j of every row
            records += [Record(t0, times[:n]) for _, n in batch]
            for j in range(1, longest):  # decode steps: bytes of the requests still wanted
                live = [len(p) + j for p, n in batch if n > j]
                decode_bytes += ctx.weight_bytes + ctx.kv_per_token * sum(live)
                decode_s += times[j] - times[j - 1]
        share = round(decode_bytes / decode_s / ctx.bandwidth, 3) if decode_s else None
        ctx.emit(summarize("hf-static", setting, records, {"decode_bw_share": share}))


def hf_cb_missing(model) -> str | None:
    """Why HF's continuous batching cannot run here, or None."""
    try:  # what HFContinuousClient uses, as transformers 5.x has it
        from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: F401
        from transformers.generation.continuous_batching.utils import WorkloadHints  # noqa: F401
    except ImportError as e:
        return f"this transformers ({version('transformers')}) lacks the 5.x continuous batching API: {e}"
    return None if hasattr(model, "init_continuous_batching") else "the HF model has no init_continuous_batching"


class HFContinuousClient:
    """HF's ContinuousBatchingManager as `generate_batch` makes it (sized by the same workload hints,
    warmed up on CUDA); one thread collects finished requests and wakes their clients."""

    def __init__(self, model, requests, ctx):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        from transformers.generation.continuous_batching.utils import WorkloadHints

        longest = max(n for _, n in requests)
        gen = GenerationConfig(do_sample=True, temperature=TEMPERATURE, top_k=TOP_K, eos_token_id=-1, pad_token_id=0,
                               max_new_tokens=longest)
        hints = WorkloadHints(max_prompt_length=max(len(p) for p, _ in requests), max_generated_length=longest,
                              num_requests=len(requests))
        # --tiny: a small cache; HF sizes its attention mask to the whole cache, which on a CPU fills host memory
        small = {"continuous_batching_config": ContinuousBatchingConfig(num_blocks=32, max_batch_tokens=256)}
        self.manager = model.init_continuous_batching(generation_config=gen, workload_hints=hints,
                                                      **(small if ctx.args.tiny else {}))
        if ctx.device.type == "cuda":
            self.manager.warmup()
        self.manager.start()
        self.done: dict[str, threading.Event] = {}
        self.results, self.stop = {}, threading.Event()
        self.collector = threading.Thread(target=self.collect)
        self.collector.start()

    def collect(self) -> None:
        while not self.stop.is_set():
            result = self.manager.get_result(timeout=0.05)
            if result is not None and result.is_finished():
                self.results[result.request_id] = result
                self.done[result.request_id].set()
            elif result is None and not self.manager.is_running():
                for event in list(self.done.values()):
                    event.set()  # the manager died: release every client
                return

    def run_one(self, i, request, t0) -> Record:
        prompt, n = request
        rid = f"r{i}"
        self.done[rid] = threading.Event()
        if self.manager.add_request(prompt, request_id=rid, max_new_tokens=n, record_timestamps=True,
                                    eos_token_id=-1) is None:
            return Record(t0, ok=False)  # refused (HF logs why)
        while not self.done[rid].wait(1.0) and self.manager.is_running():
            pass
        result = self.results.get(rid)
        if result is None:
            return Record(t0, ok=False)
        return Record(t0, list(result.timestamps or []), result.error is None and len(result.generated_tokens) == n)

    def close(self) -> dict:
        self.stop.set()
        self.collector.join()
        self.manager.stop(block=True, timeout=10)
        self.manager.destroy()
        return {}
