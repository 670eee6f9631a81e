"""Tokenise a corpus once into train/val token files (np.memmap), cached by content hash.

Cache layout (root: $TFORMER_CACHE/shards, else ~/.cache/tformer/shards)::

    <root>/<key>/train.bin   token ids, uint16 when every id fits (vocab_size <= 65536) else uint32
    <root>/<key>/val.bin
    <root>/<key>/meta.json   dtype, vocab size, token/char/byte counts per split, how it was made

`key` hashes the documents, the tokenizer.json text, the eos id and `val_fraction`, so a changed
corpus or tokenizer gets a fresh folder and an unchanged one is reused without tokenising. A folder
is written through `tformer.io.atomic_path`, so an interrupted run leaves no bad cache.

The split is deterministic, not random: the last `val_fraction` of the corpus's characters is val,
cut at the first line start after that point (see `tokenizer.split_into_chunks`). Documents are
ended with the tokenizer's eos token when it has one (not where the split cuts a document).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tformer.io import atomic_path
from tformer.tokenizer import Tokenizer, split_into_chunks

FORMAT_VERSION = 1
SPLITS = ("train", "val")
_ENCODE_BATCH = 16384  # chunks per encode_batch call: enough to keep all cores busy, bounded memory

# A run of a document's chunks, and whether the document ends with it (then eos follows).
Piece = tuple[list[str], bool]


def default_cache_dir() -> Path:
    base = os.environ.get("TFORMER_CACHE")
    if base:
        return Path(base) / "shards"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "tformer" / "shards"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding ids 0..vocab_size-1 (uint16 halves the file size)."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


@dataclass(frozen=True)
class Split:
    """One split's tokens (a read-only memmap) and the amount of text they came from."""

    name: str
    tokens: np.ndarray
    n_chars: int  # Python str characters (Unicode code points)
    n_bytes: int  # UTF-8 bytes

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def chars_per_token(self) -> float:
        return self.n_chars / max(self.n_tokens, 1)

    def bits_per_char(self, loss_nats: float) -> float:
        """Mean loss per token (nats) -> bits per character, comparable across tokenizers."""
        return loss_nats / math.log(2) / self.chars_per_token if self.n_chars else float("nan")


@dataclass(frozen=True)
class Shards:
    path: Path
    vocab_size: int
    train: Split
    val: Split

    def __getitem__(self, split: str) -> Split:
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}: use one of {SPLITS}")
        return getattr(self, split)

    def chars_per_token(self, split: str) -> float:
        return self[split].chars_per_token


def cache_key(docs: Sequence[str], tokenizer: Tokenizer, val_fraction: float) -> str:
    h = hashlib.sha256(f"tformer-shards-v{FORMAT_VERSION}|{val_fraction!r}|{tokenizer.eos_id}|".encode())
    h.update(tokenizer.to_str().encode())
    for doc in docs:  # length-prefixed, so ["ab", "c"] and ["a", "bc"] differ
        data = doc.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:20]


def _first_line_start_after(doc_chunks: list[list[str]], target: int) -> tuple[int, int] | None:
    """(document, chunk) index of the first chunk starting at or after character `target`."""
    pos = 0
    for i, chunks in enumerate(doc_chunks):
        for j, chunk in enumerate(chunks):
            if pos >= target:
                return i, j
            pos += len(chunk)
    return None


def split_documents(docs: Sequence[str], val_fraction: float) -> tuple[list[Piece], list[Piece]]:
    """Cut the documents at the first chunk boundary after (1 - val_fraction) of all characters."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1), e.g. 0.1 for 10% validation")
    docs = [d for d in docs if d]
    doc_chunks = [split_into_chunks(d) for d in docs]
    total = sum(map(len, docs))
    target = round((1.0 - val_fraction) * total)
    if target >= total:
        return [(c, True) for c in doc_chunks], []
    cut = _first_line_start_after(doc_chunks, target)
    if cut is None:  # no line start after the target: cut the last document at the exact character
        i, keep = len(docs) - 1, target - (total - len(docs[-1]))
        head, tail = [docs[i][:keep]], [docs[i][keep:]]
    else:
        i, j = cut
        head, tail = doc_chunks[i][:j], doc_chunks[i][j:]
    train = [(c, True) for c in doc_chunks[:i]] + ([(head, False)] if head else [])
    val = [(tail, True)] + [(c, True) for c in doc_chunks[i + 1:]]
    return train, val


def _chunking_is_exact(tokenizer: Tokenizer, chunks: list[str]) -> bool:
    """Does encoding chunk by chunk give the ids of encoding their concatenation?"""
    whole = tokenizer.encode("".join(chunks))
    return whole == [i for ids in tokenizer.encode_batch(chunks) for i in ids]


def _chunk_stream(pieces: list[Piece]) -> Iterator[tuple[str, bool]]:
    """(chunk, eos follows it) in corpus order."""
    for chunks, ends_doc in pieces:
        for k, chunk in enumerate(chunks):
            yield chunk, ends_doc and k == len(chunks) - 1


def _write_split(pieces: list[Piece], tokenizer: Tokenizer, path: Path, dtype: np.dtype,
                 exact: bool) -> dict:
    """Encode `pieces` in parallel batches and append their ids to `path`; returns its counts."""
    if not exact:  # this tokenizer merges across line starts: encode each piece whole
        pieces = [(["".join(chunks)], ends) for chunks, ends in pieces]
    eos = tokenizer.eos_id
    stream = _chunk_stream(pieces)
    n_tokens = n_chars = n_bytes = 0
    with open(path, "wb") as f:
        while batch := list(itertools.islice(stream, _ENCODE_BATCH)):
            texts = [chunk for chunk, _ in batch]
            ids: list[int] = []
            for chunk_ids, (_, eos_after) in zip(tokenizer.encode_batch(texts), batch):
                ids.extend(chunk_ids)
                if eos_after and eos is not None:
                    ids.append(eos)
            np.asarray(ids, dtype=dtype).tofile(f)
            n_tokens += len(ids)
            n_chars += sum(map(len, texts))
            n_bytes += sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    return {"file": path.name, "n_tokens": n_tokens, "n_chars": n_chars, "n_bytes": n_bytes}


def _tokenise_into(folder: Path, docs: Sequence[str], tokenizer: Tokenizer, val_fraction: float,
                   key: str) -> None:
    train, val = split_documents(docs, val_fraction)
    dtype = token_dtype(tokenizer.vocab_size)
    sample = [c for chunks, _ in train[:64] for c in chunks][:256]
    exact = _chunking_is_exact(tokenizer, sample)
    if not exact:
        warnings.warn("this tokenizer merges across line starts: tokenising whole documents (slower)")
    splits = {name: _write_split(pieces, tokenizer, folder / f"{name}.bin", dtype, exact)
              for name, pieces in zip(SPLITS, (train, val))}
    meta = {
        "format": FORMAT_VERSION, "key": key, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id, "val_fraction": val_fraction, "n_docs": len(docs),
        "splits": splits,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_shards(path: str | Path) -> Shards:
    """Open a shard folder written by `build_shards` (memory-mapped, read-only)."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FileNotFoundError(f"{path} is not a complete shard folder ({e}); rebuild it") from None
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has shard format {meta.get('format')}, expected {FORMAT_VERSION}; rebuild it")
    dtype = np.dtype(meta["dtype"])
    splits = {}
    for name in SPLITS:
        info = meta["splits"][name]
        file = path / info["file"]
        size, expected = (file.stat().st_size if file.exists() else -1), info["n_tokens"] * dtype.itemsize
        if size != expected:
            raise ValueError(f"{file} has {size} bytes, expected {expected}; rebuild it")
        tokens = np.memmap(file, dtype=dtype, mode="r") if info["n_tokens"] else np.zeros(0, dtype)
        splits[name] = Split(name, tokens, info["n_chars"], info["n_bytes"])
    return Shards(path, meta["vocab_size"], **splits)


def build_shards(docs: Sequence[str] | str, tokenizer: Tokenizer, *, val_fraction: float = 0.1,
                 cache_dir: str | Path | None = None) -> Shards:
    """Tokenise `docs` into train/val shards, or reuse the cached ones for the same inputs."""
    docs = [docs] if isinstance(docs, str) else list(docs)
    if not any(docs):
        raise ValueError("the corpus is empty: pass at least one non-empty document")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = cache_key(docs, tokenizer, val_fraction)
    final = root / key
    if final.exists():
        try:
            return load_shards(final)
        except (FileNotFoundError, ValueError) as e:
            warnings.warn(f"rebuilding broken shard cache: {e}")
            shutil.rmtree(final)
    # replace=False: another process (e.g. another rank) that finished first wrote the same folder
    with atomic_path(final, directory=True, replace=False) as tmp:
        _tokenise_into(tmp, docs, tokenizer, val_fraction, key)
    return load_shards(final)
