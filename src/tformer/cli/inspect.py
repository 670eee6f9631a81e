"""`tformer inspect CKPT|PRESET`: the module tree with shapes, `tformer params`' accounting, and an SVG
diagram of one layer."""

from __future__ import annotations

import argparse
import json

from tformer.cli import DTYPES, UserError

EPILOG = """\
examples:
  tformer inspect llama-3-8b                    a preset (tformer params --list names them)
  tformer inspect out/my-run --svg layer.svg    a checkpoint, and a diagram of one layer
  tformer inspect mixtral-8x7b --json           {"tree": [...], "accounting": {... as tformer params --json}}

The model is built on the meta device: no weights are allocated or read. The numbers are
`tformer params`' (the same code): parameters by component, active per token for MoE,
training FLOPs per token at --seq-len and KV-cache bytes per token at --dtype."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="a model's module tree, parameter counts, FLOPs and KV cache per token, and a layer diagram",
        description="Show a preset's or checkpoint's module tree with parameter shapes (identical layers "
        "folded), its parameters by component (and active per token for MoE), FLOPs and KV-cache bytes per "
        "token; with --svg, write a block diagram of one layer (attention kind, norm placement, FFN or MoE, "
        "positions).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="CKPT|PRESET", help="preset name, tformer checkpoint dir, HF model dir, "
                   "or ModelConfig JSON file")
    p.add_argument("--svg", metavar="FILE", help="write an SVG diagram of one layer to FILE")
    p.add_argument("--seq-len", type=int, metavar="T",
                   help="context length T of the attention FLOPs (default: the model's max_seq_len)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of weights and KV cache "
                   "(default: bfloat16)")
    p.add_argument("--json", action="store_true", help="print the tree and the accounting as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tformer.accounting import accounting
    from tformer.cli.params import format_accounting
    from tformer.io import atomic_write_text
    from tformer.models.build import build_model
    from tformer.sources import resolve_config
    from tformer.viz.diagram import attention_kind, layer_diagram
    from tformer.viz.tree import module_tree

    if args.seq_len is not None and args.seq_len <= 0:
        raise UserError(f"--seq-len must be a positive number of tokens, got {args.seq_len}")
    config, source = resolve_config(args.model)
    acc = accounting(config, seq_len=args.seq_len, dtype=args.dtype)
    tree = module_tree(build_model(config, device="meta"))
    if args.svg:
        atomic_write_text(args.svg, layer_diagram(config))
    if args.json:
        print(json.dumps({"tree": tree, "accounting": acc, "attention": attention_kind(config)}))
        return 0
    layer = (f"{config.n_layers} layers, {attention_kind(config)} attention, {config.norm_placement}-norm "
             f"{config.norm}, positions {config.positions}, {'MoE' if config.moe else 'dense'} {config.activation}")
    tied = "; output tied to the token embedding" if config.tie_embeddings else ""
    print(f"{args.model} ({source}): {layer}\n")
    print("\n".join(tree))
    print()
    print(format_accounting(config, acc, title=f"parameters{tied}"))
    if args.svg:
        print(f"\nlayer diagram: {args.svg}")
    return 0
