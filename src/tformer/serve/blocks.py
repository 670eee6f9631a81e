"""The paged KV cache: one pool of fixed-size blocks per layer, a block table per request, prefix reuse.

Shapes: N blocks, Hkv key/value heads, P block_size positions, D head_dim, B requests, M blocks a request.

    k, v pools (N, P, Hkv, D)                  one pair per attention layer (PagedKVCache); a row's
                                               blocks gathered end to end are its keys (M * P, Hkv, D),
                                               read by attention as a strided (Hkv, M * P, D) view
    block table (B, M) int                     request b's position p lives in block table[b, p // P], slot p % P

Block 0 is never handed out: table entries past a request's blocks point at it, and the causal mask
hides what they would read. A request holds only the blocks its tokens fill (no reservation of the
longest length), so memory goes to the requests that run. In a model whose every layer attends within
a sliding window (`stream_window`), a block wholly behind every window is given back as the request
goes on (its entry points at block 0, which the window mask hides), so a long stream holds a window's
worth of blocks.

Prefix caching: a block filled with prompt tokens is registered under the hash of its tokens and of
every token before it (a chain hash), so a later prompt that starts the same way takes the cached
blocks instead of recomputing them. A block whose last user is gone stays cached, least recently
used first to be reused for new tokens, until its memory is needed.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import nn

from tformer.models.decoder import rolling_window


class PagedKVCache(nn.Module):
    """One attention layer's blocks. `table` is the engine's PageTable, shared by every layer: the
    engine sets the batch's block tables once a forward, the layers read them."""

    def __init__(self, table: PageTable, n_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device=None):
        super().__init__()
        self.table, self.block_size, self.n_slots = table, block_size, 0
        shape = (n_blocks, block_size, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at each row's positions input_pos (B, T); return every row's keys and
        values in position order, (B, Hkv, M * P, D)."""
        tables = self.table.tables  # (B, M)
        block = tables.gather(1, input_pos // self.block_size)  # (B, T)
        slot = input_pos % self.block_size
        self.k[block, slot] = k.transpose(1, 2)  # (B, T, Hkv, D)
        self.v[block, slot] = v.transpose(1, 2)
        return _gathered(self.k, tables), _gathered(self.v, tables)


def _gathered(pool: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """pool (N, P, Hkv, D), tables (B, M) -> (B, Hkv, M * P, D), a transposed view of one gather."""
    B, M = tables.shape
    N, P, Hkv, D = pool.shape
    return pool[tables].view(B, M * P, Hkv, D).transpose(1, 2)


class PageTable:
    """The block tables of the batch a forward runs, (B, M) on the model's device."""

    def __init__(self):
        self.tables = torch.zeros(1, 1, dtype=torch.long)


def stream_window(model: nn.Module) -> int | None:
    """The largest window of a decoder whose every layer attends within a sliding window and never reads
    a key outside it (`rolling_window`): keys further back than it from a forward's first query are never
    read again. None when some layer reads further (a global layer, another pattern)."""
    windows = [rolling_window(model.config, i, getattr(layer, "attn", None)) for i, layer in enumerate(model.layers)]
    return None if not windows or None in windows else max(windows)


def chain_hash(previous: bytes, tokens) -> bytes:
    """The identity of a full block: its tokens and (through `previous`) all tokens before it."""
    return hashlib.blake2b(previous + b"|" + ",".join(map(str, tokens)).encode(), digest_size=16).digest()


class BlockPool:
    """Block bookkeeping: reference counts, free blocks, the prefix cache. Block 0 is reserved."""

    def __init__(self, n_blocks: int, block_size: int, prefix_caching: bool = True):
        if n_blocks < 2:
            raise ValueError(f"a paged KV cache needs at least 2 blocks, got {n_blocks}")
        self.n_blocks, self.block_size, self.prefix_caching = n_blocks, block_size, prefix_caching
        self.refs = [0] * n_blocks
        self.free = list(range(n_blocks - 1, 0, -1))  # never cached, or evicted; pop() takes the lowest
        self.cached: OrderedDict[bytes, int] = OrderedDict()  # hash -> block, least recently used first
        self.hash_of: dict[int, bytes] = {}
        self.hit_tokens = self.queried_tokens = 0

    @property
    def used(self) -> int:
        """Blocks some request holds."""
        return sum(1 for r in self.refs[1:] if r > 0)

    def available(self) -> int:
        """Blocks a request could take now: free ones and cached ones no request holds."""
        return self.n_blocks - 1 - self.used

    def allocate(self) -> int:
        """A block for new tokens: a free one, else the least recently used cached block nobody holds."""
        if self.free:
            block = self.free.pop()
        else:
            block = next((b for b in self.cached.values() if self.refs[b] == 0), None)
            if block is None:
                raise MemoryError("no KV block is free")
            del self.cached[self.hash_of.pop(block)]
        self.refs[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        """A request is done with `blocks`; cached ones stay cached, the others become free. Block 0 (the
        entry of a block given back early) is skipped."""
        for block in blocks:
            if block == 0:
                continue
            self.refs[block] -= 1
            if self.refs[block] == 0 and block not in self.hash_of:
                self.free.append(block)

    def lookup(self, prompt: list[int], limit: int) -> tuple[list[int], list[bytes]]:
        """The cached blocks that hold the prompt's first full blocks (at most `limit` of them), each now
        held once more, and the chain hashes of all its full blocks."""
        hashes, previous = [], b""
        for i in range(len(prompt) // self.block_size):
            previous = chain_hash(previous, prompt[i * self.block_size: (i + 1) * self.block_size])
            hashes.append(previous)
        hits = []
        if self.prefix_caching:
            for h in hashes[:limit]:
                block = self.cached.get(h)
                if block is None:
                    break
                self.cached.move_to_end(h)
                self.refs[block] += 1
                hits.append(block)
        return hits, hashes

    def count_admission(self, n_prompt: int, n_hits: int) -> None:
        """A prompt of n_prompt tokens ran with n_hits cached blocks: the prefix-cache counters."""
        self.hit_tokens += n_hits * self.block_size
        self.queried_tokens += n_prompt

    def register(self, block: int, block_hash: bytes) -> None:
        """A block now full of prompt tokens joins the prefix cache (a block with this hash already
        cached keeps its place: the new one stays private)."""
        if self.prefix_caching and block_hash not in self.cached and block not in self.hash_of:
            self.cached[block_hash] = block
            self.hash_of[block] = block_hash
