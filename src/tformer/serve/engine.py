"""Continuous batching: requests join and leave the running batch at token boundaries.

    submit(request) -> RequestStream          from any thread; the stream yields TokenEvents
    scheduling thread, each iteration:
        admit waiting requests while blocks allow (their cached prompt prefix reused: serve/blocks.py)
        prefill one chunk (<= prefill_chunk tokens) of one admitted request
        decode one token for every request whose prompt is in the cache, as one (B, 1) forward
        sample each row with its own settings and random stream (serve/sampling.py), emit, retire

The KV cache is paged (serve/blocks.py): a request holds only the blocks its tokens fill. When a
decode step needs a block and none is left, the most recently admitted request gives its blocks
back and waits to be recomputed (its tokens so far become its prompt; its stream goes on).
Model code is unchanged: each attention layer's cache is a PagedKVCache, and every row of a forward
has its own positions (`Decoder.forward(input_pos=(B, T))`). Decode steps run on bucketed static
buffers, replayed from CUDA graphs on a GPU (serve/graphs.py).
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
import sys
import threading
from dataclasses import dataclass, field

import torch

from tformer.nn.attention import Attention
from tformer.serve.blocks import BlockPool, PagedKVCache, PageTable, stream_window
from tformer.serve.graphs import DecodeGraphs
# the client side, importable from here too
from tformer.serve.requests import EngineFull, GenerationRequest, RequestStream, TokenEvent  # noqa: F401
from tformer.serve.sampling import apply_penalties, sample_rows


def _seed32(seed: int) -> int:
    """Any integer seed as the 32 bits the sampler's hash takes (every bit of a large seed counts)."""
    if 0 <= seed < 2**32:
        return seed
    return int.from_bytes(hashlib.blake2b(str(seed).encode(), digest_size=4).digest(), "little")


@dataclass
class _Sequence:
    """A request in the engine: its tokens (prompt, then generated), blocks, and how far the cache holds it."""
    stream: RequestStream
    tokens: list[int]
    n_prompt: int
    seed: int
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # chain hashes of the prompt's full blocks
    cached: int = 0  # positions 0..cached-1 are in the cache
    registered: int = 0  # prompt blocks offered to the prefix cache
    cancelled: bool = False

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.n_prompt:]

    @property
    def prefill_end(self) -> int:
        """Where prefill stops: the prompt's end, or (recomputing a preempted request) before the last token."""
        return self.n_prompt if len(self.tokens) == self.n_prompt else len(self.tokens) - 1


class ServeEngine:
    """Continuous batching over one model (module docstring). Not for MLA models (their latent cache
    is not paged)."""

    def __init__(self, model, *, block_size: int = 16, n_blocks: int | None = None, max_running: int = 64,
                 max_waiting: int = 256, prefill_chunk: int = 512, prefix_caching: bool = True,
                 cuda_graphs: bool | None = None):
        if getattr(model.config, "ssd", None) is not None:
            raise ValueError("serving pages KV caches: SSD layers (ssd) keep a recurrent state that is not paged; "
                             "generate with tformer.inference.generate")
        layers = [layer.attn for layer in model.layers]
        if not all(isinstance(a, Attention) for a in layers):
            raise ValueError("serving needs multi-head attention layers: MLA's latent cache is not paged yet")
        if model.config.attention.approx != "none":
            raise ValueError(f"serving pages KV caches: attention.approx={model.config.attention.approx!r} keeps a "
                             "running state instead; generate with tformer.inference.generate")
        a = model.config.attention
        if a.pattern == "prefix" and (prefix_caching or a.prefix > prefill_chunk):  # keys depend on later tokens
            raise ValueError(f"attention.pattern='prefix': the first {a.prefix} tokens see each other both ways, "
                             f"so their keys depend on the whole prefix: serve with prefix_caching=False and "
                             f"prefill_chunk >= {a.prefix}")
        self.model = model.eval()
        weight = model.tok_emb.weight
        self.device, dtype = weight.device, weight.dtype
        self.block_size, self.max_running, self.max_waiting = block_size, max_running, max_waiting
        self.prefill_chunk = prefill_chunk
        self.max_context = model.config.max_seq_len
        self.vocab_size = model.config.vocab_size
        n_blocks = n_blocks or self._default_blocks(layers, dtype)
        self.pool = BlockPool(n_blocks, block_size, prefix_caching)
        self.window = stream_window(model)  # blocks behind it are given back as a request goes on (None: kept)
        self.table = PageTable()
        model.attach_caches([PagedKVCache(self.table, n_blocks, block_size, a.n_kv_heads, a.head_dim, dtype,
                                          self.device) for a in layers])
        capture = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.decode_graphs = DecodeGraphs(model, self.table, block_size, max_running,
                                          math.ceil(self.max_context / block_size), capture)
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._running: list[_Sequence] = []
        self._cancel: set[RequestStream] = set()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.generated_tokens = self.preempted = 0

    def _default_blocks(self, layers, dtype) -> int:
        """Enough for every running request at full context on a CPU; on a GPU, 60% of the free memory."""
        per_block = sum(2 * a.n_kv_heads * a.head_dim for a in layers) * self.block_size * dtype.itemsize
        want = self.max_running * math.ceil(self.max_context / self.block_size) + 1
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(2, min(want, int(free * 0.6) // per_block))
        return want

    # --- the client side ----------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; ValueError when it cannot ever run, EngineFull when the queue is full."""
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
        if n + request.max_new_tokens > self.max_context:
            raise ValueError(f"the prompt ({n} tokens) and max_new_tokens ({request.max_new_tokens}) exceed the "
                             f"model's context of {self.max_context} tokens")
        if any(not 0 <= t < self.vocab_size for t in request.prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if self._peak_blocks(n + request.max_new_tokens) > self.pool.n_blocks - 1:
            raise ValueError(f"the request needs more KV blocks than the pool holds ({self.pool.n_blocks - 1})")
        stream = RequestStream(request)
        seed = _seed32(request.seed) if request.seed is not None else int.from_bytes(os.urandom(4), "little")
        with self._wake:
            if len(self._waiting) >= self.max_waiting:
                raise EngineFull(f"{len(self._waiting)} requests are already waiting: try again later")
            self._waiting.append(_Sequence(stream, list(request.prompt_ids), n, seed))
            self._wake.notify()
        return stream

    def cancel(self, stream: RequestStream) -> None:
        """Stop a request; its blocks are freed and its stream ends with finish_reason "abort"."""
        with self._wake:
            self._cancel.add(stream)
            self._wake.notify()

    def stats(self) -> dict:
        pool = self.pool
        return {"running": len(self._running), "waiting": len(self._waiting), "blocks_used": pool.used,
                "blocks_total": pool.n_blocks - 1, "block_size": self.block_size,
                "prefix_hit_tokens": pool.hit_tokens, "prompt_tokens": pool.queried_tokens,
                "generated_tokens": self.generated_tokens, "preempted": self.preempted}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tformer-serve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        for seq in list(self._running) + list(self._waiting):
            self._finish(seq, None, "abort")
        self._waiting.clear()

    # --- the scheduling thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._running or self._cancel):
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - a failed step aborts its requests, not the server
                print(f"tformer serve: engine step failed, aborting {len(self._running)} requests: {e!r}",
                      file=sys.stderr)
                for seq in list(self._running):
                    self._finish(seq, None, "abort")

    @torch.no_grad()
    def step(self) -> None:
        """One scheduling iteration (module docstring); the thread's loop calls it."""
        self._cancelled()
        self._admit()
        if (seq := next((s for s in self._running if s.cached < s.prefill_end), None)) is not None:
            self._prefill(seq)
        ready = [s for s in self._running if s.cached >= s.prefill_end and s.cached < len(s.tokens)]
        if ready:
            self._decode(ready)

    def _cancelled(self) -> None:
        with self._wake:
            streams, self._cancel = self._cancel, set()
            waiting = [s for s in self._waiting if s.stream in streams]
            for seq in waiting:
                self._waiting.remove(seq)
        for seq in waiting + [s for s in self._running if s.stream in streams]:
            self._finish(seq, None, "abort")

    def _admit(self) -> None:
        while len(self._running) < self.max_running:
            with self._wake:
                if not self._waiting:
                    return
                seq = self._waiting[0]
                end = seq.prefill_end
                hits, hashes = self.pool.lookup(seq.tokens[:seq.n_prompt], (end - 1) // self.block_size)
                need = self._peak_blocks(end + 1) - len(hits)
                if need > self.pool.available():
                    self.pool.release(hits)
                    return
                self._waiting.popleft()
            self.pool.count_admission(seq.n_prompt, len(hits))
            seq.blocks, seq.hashes = hits, hashes
            seq.registered, seq.cached = len(hits), len(hits) * self.block_size
            self._running.append(seq)

    def _peak_blocks(self, length: int) -> int:
        """The most blocks a request of `length` positions holds at once: all of them, or with a window
        the blocks of window - 1 + prefill_chunk positions (`_drop_behind`), however they straddle blocks."""
        full = math.ceil(length / self.block_size)
        if self.window is None:
            return full
        return min(full, (self.window + self.prefill_chunk - 2) // self.block_size + 2)

    def _drop_behind(self, seq: _Sequence, start: int) -> None:
        """Give back `seq`'s blocks that lie wholly behind the window of a forward from position `start`
        (positions < start - window + 1: no query from here on reads them); their entries become 0."""
        if self.window is None:
            return
        dead = min(len(seq.blocks), max(0, start - self.window + 1) // self.block_size)
        self.pool.release(seq.blocks[:dead])
        seq.blocks[:dead] = [0] * dead

    def _reserve(self, seq: _Sequence, end: int) -> bool:
        """Blocks for positions up to `end` (exclusive): from the pool, else by sending the most recently
        admitted other request back to wait (recomputed later). False, and `seq` aborted, when no other
        request is left to make room."""
        while len(seq.blocks) * self.block_size < end:
            if self.pool.available() > 0:
                seq.blocks.append(self.pool.allocate())
                continue
            others = [s for s in self._running if s is not seq]
            if not others:
                self._finish(seq, None, "abort")
                return False
            victim = others[-1]
            self._running.remove(victim)
            self.pool.release(victim.blocks)
            victim.blocks, victim.cached, victim.registered = [], 0, 0
            self.preempted += 1
            with self._wake:
                self._waiting.appendleft(victim)
        return True

    def _forward(self, seqs: list[_Sequence], tokens: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Logits (B, V) of the last of `tokens` (rows of equal length) at positions starts[b]..; the KV
        cache takes them all. Only the last position goes through the output head."""
        width = max(len(s.blocks) for s in seqs)
        tables = torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s in seqs], device=self.device)
        T = len(tokens[0])
        pos = torch.tensor(starts, device=self.device)[:, None] + torch.arange(T, device=self.device)
        self.table.tables = tables
        self.model.cache_slots = width * self.block_size
        hidden = self.model.features(torch.tensor(tokens, device=self.device), input_pos=pos)
        return self.model.output(hidden[:, -1])

    def _prefill(self, seq: _Sequence) -> None:
        start, end = seq.cached, min(seq.prefill_end, seq.cached + self.prefill_chunk)
        self._drop_behind(seq, start)
        if not self._reserve(seq, end):
            return
        logits = self._forward([seq], [seq.tokens[start:end]], [start])
        seq.cached = end
        while seq.registered < min(len(seq.hashes), end // self.block_size):
            self.pool.register(seq.blocks[seq.registered], seq.hashes[seq.registered])
            seq.registered += 1
        if end == seq.n_prompt == len(seq.tokens):  # the prompt is in: its last logits give the first token
            self._emit([seq], logits)

    def _decode(self, seqs: list[_Sequence]) -> None:
        for seq in seqs:
            self._drop_behind(seq, len(seq.tokens) - 1)
        for seq in seqs:
            if seq in self._running:
                self._reserve(seq, len(seq.tokens))
        seqs = [s for s in seqs if s in self._running]  # some may have made room for the others
        if not seqs:
            return
        logits = self.decode_graphs([s.tokens[-1] for s in seqs], [len(s.tokens) - 1 for s in seqs],
                                    [s.blocks for s in seqs])
        for s in seqs:
            s.cached = len(s.tokens)
        self._emit(seqs, logits)

    def _emit(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Sample one token a row, stream it, and retire the finished requests. logits (B, V)."""
        reqs = [s.stream.request for s in seqs]
        f32 = logits.float()
        work = f32
        if any(r.presence_penalty or r.frequency_penalty for r in reqs):
            counts = torch.zeros_like(work)
            for b, s in enumerate(seqs):
                if s.generated:
                    counts[b].index_add_(0, torch.tensor(s.generated, device=self.device),
                                         torch.ones(len(s.generated), device=self.device))
            work = apply_penalties(work, counts, *self._params(reqs, "presence_penalty", "frequency_penalty"))
        for b, (s, r) in enumerate(zip(seqs, reqs)):
            if r.token_filter is not None and (allowed := r.token_filter(s.generated)) is not None:
                work = work.clone() if work is f32 else work
                work[b].masked_fill_(~allowed.to(self.device), float("-inf"))
        temperature, top_p, min_p = self._params(reqs, "temperature", "top_p", "min_p")
        top_k = torch.tensor([r.top_k for r in reqs], device=self.device)
        seeds = torch.tensor([s.seed for s in seqs], device=self.device)
        steps = torch.tensor([len(s.generated) for s in seqs], device=self.device)
        tokens = sample_rows(work, temperature, top_k, top_p, min_p, seeds, steps).tolist()
        logp = f32.log_softmax(-1) if any(r.logprobs is not None for r in reqs) else None
        for b, (s, r, token) in enumerate(zip(seqs, reqs, tokens)):
            s.tokens.append(token)
            self.generated_tokens += 1
            finish = None
            if token in r.stop_ids:
                finish = "stop"
            elif len(s.generated) >= r.max_new_tokens or len(s.tokens) >= self.max_context:
                finish = "length"
            logprob = top = None
            if r.logprobs is not None:
                logprob = logp[b, token].item()
                if r.logprobs > 0:
                    values, ids = logp[b].topk(r.logprobs)
                    top = list(zip(ids.tolist(), values.tolist()))
            event = TokenEvent(token, logprob, top, finish)
            if finish is None:
                s.stream._push(event)
            else:
                self._finish(s, event, finish)

    def _params(self, reqs, *names) -> list[torch.Tensor]:
        return [torch.tensor([float(getattr(r, n)) for r in reqs], device=self.device) for n in names]

    def _finish(self, seq: _Sequence, event: TokenEvent | None, reason: str) -> None:
        if seq in self._running:
            self._running.remove(seq)
            self.pool.release(seq.blocks)
            seq.blocks = []
        if not seq.stream.finished:
            seq.stream.finished = True
            last = event or TokenEvent(seq.tokens[-1] if len(seq.tokens) > seq.n_prompt else -1, None, None, reason)
            seq.stream._push(last)
