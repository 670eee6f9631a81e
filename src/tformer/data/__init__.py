"""Corpora -> token shards -> (x, y) batches.

    docs = load_corpus(paths)                        # or [shakespeare_text()]
    shards = build_shards(docs, tokenizer)           # cached np.memmap train/val token files
    x, y = Batcher(shards.train, B, T, device=dev, seed=0).get(step)
    for x, y in eval_batches(shards.val, B, T, device=dev): ...
    bpc = shards.val.bits_per_char(mean_val_loss)
"""

from tformer.data.batches import Batcher, eval_batches
from tformer.data.corpus import load_corpus, read_jsonl, read_texts, shakespeare_text
from tformer.data.shards import Shards, Split, build_shards, default_cache_dir, load_shards, token_dtype

__all__ = [
    "Batcher", "eval_batches",
    "load_corpus", "read_jsonl", "read_texts", "shakespeare_text",
    "Shards", "Split", "build_shards", "default_cache_dir", "load_shards", "token_dtype",
]
