"""`tformer params NAME_OR_PATH`: parameter counts by component (total and active per token),
training FLOPs and KV cache per token, and training memory, without allocating weights."""

from __future__ import annotations

import argparse
import json

from tformer.cli import DTYPES, UserError
from tformer.sources import resolve_config

EPILOG = """\
examples:
  tformer params llama-3-8b             a preset (see --list)
  tformer params mixtral-8x7b --seq-len 4096 --dtype bfloat16
  tformer params out/my-run             a tformer checkpoint directory (tformer.json)
  tformer params ~/models/Qwen2.5-0.5B  an HF model directory (config.json)
  tformer params my-config.json         a JSON file of ModelConfig fields
  tformer params gpt2 --json            machine-readable: {"embeddings": ..., "total": ..., "active": {...}, ...}

The model is built on the meta device: no weights are allocated or read, so any size is instant.
Tied output weights are the token embedding and count once (output = 0).

MoE models get an active/token column: routed experts count top_k/n_experts, the rest in full,
embeddings included (Mixtral's 12.9B of 46.7B). N = active minus the embedding lookup (DeepSeek's
"active", V3's 37B of 671B).
  training FLOPs/token = 6N + 12·L·H·Q·T (PaLM, appendix B); MLA: 6N + 6·L·H·T·(d_qk + d_v)
  KV cache/token       = 2·L·Hkv·head_dim·bytes; MLA: L·(kv_rank + rope_dim)·bytes
  training memory      = weights + gradients at --dtype, an fp32 master copy below fp32, and
                         AdamW's two fp32 moments: 16 B/param (ZeRO §3.1); activations not counted"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "params",
        help="count a model's parameters (total, active), FLOPs, KV cache and memory",
        description="Count the parameters of a preset, checkpoint or config by component "
        "(embeddings, attention, dense ffn, routed/shared experts, router, norms, output) with their "
        "share of the total and, for MoE models, the parameters active per token; then training "
        "FLOPs and KV cache bytes per token and the memory to train with AdamW.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", metavar="NAME_OR_PATH",
                   help="preset name, tformer checkpoint dir, HF model dir, or ModelConfig JSON file")
    p.add_argument("--seq-len", type=int, metavar="T",
                   help="context length T of the attention FLOPs (default: the model's max_seq_len)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                   help="dtype of weights, gradients and KV cache (default: bfloat16)")
    p.add_argument("--json", action="store_true", help="print everything as one JSON object")
    p.add_argument("--list", action="store_true", help="list the preset names and their sources, then exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tformer.accounting import accounting, format_accounting

    if args.list:
        _print_presets()
        return 0
    if not args.model:
        raise UserError("give a preset name or a path (`tformer params --list` lists the presets)")
    if args.seq_len is not None and args.seq_len <= 0:
        raise UserError(f"--seq-len must be a positive number of tokens, got {args.seq_len}")
    config, source = resolve_config(args.model)
    acc = accounting(config, seq_len=args.seq_len, dtype=args.dtype)
    if args.json:
        print(json.dumps(acc))
        return 0
    tied = "; output tied to the token embedding" if config.tie_embeddings else ""
    print(format_accounting(config, acc, title=f"{args.model} ({source}{tied})"))
    return 0


def _print_presets() -> None:
    from tformer.presets import list_presets, preset_source

    names = list_presets()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {preset_source(name)}")
