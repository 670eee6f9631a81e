"""`tformer params NAME_OR_PATH`: parameter counts by component (total and active per token),
training FLOPs and KV cache per token, and training memory, without allocating weights."""

from __future__ import annotations

import argparse
import json

from tformer.accounting import COMPONENTS, DTYPE_BYTES, MOE_COMPONENTS
from tformer.cli import DTYPES, UserError
from tformer.config import ModelConfig
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
    from tformer.accounting import accounting

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


def format_accounting(config: ModelConfig, acc: dict, title: str | None = None) -> str:
    """The component table (total and active columns), then FLOPs, KV cache and memory rows."""
    T, dtype, b = acc["seq_len"], acc["dtype"], DTYPE_BYTES[acc["dtype"]]
    lines = [format_breakdown(acc, title=title, active=acc["active"] if config.moe is not None else None)]
    if config.moe is not None:
        lines.append("active/token: routed experts at top_k/n_experts, the rest in full, embeddings included")
        lines.append("(Mistral's and Qwen's 'active'); N below leaves the embedding lookup out (DeepSeek's).")
    lines.append("")
    attn = "6·L·H·T·(d_qk+d_v)" if config.mla is not None else "12·L·H·Q·T"
    if config.attention.approx != "none":
        attn = f"6·L·({config.attention.approx}, linear in T: tformer.accounting)"
    if config.ssd is not None:  # L: attention layers; the SSD layers' chunked form (tformer.accounting)
        attn += " + 6·L_ssd·(H·Q·P + G·Q·N + 2·H·P·N)"
    if config.attention.approx != "none":  # a constant state in place of the KV cache
        state = "m·(Q+1)+1" if config.attention.approx == "performer" else "2·r·Q (+1 count)"
        cache = ["attention state/sequence", f"{acc['approx_state_bytes']:,} B",
                 f"L·Hkv·({state})·4 B (fp32), any length: no KV cache"]
    else:
        kv = "L·(kv_rank+rope_dim)" if config.mla is not None else "2·L·Hkv·head_dim"
        cache = ["KV cache/token", f"{acc['kv_cache_bytes_per_token']:,} B", f"{kv}·{b} B ({dtype})"]
    mem = acc["training_memory_bytes"]
    rows = [
        ["active matmul params N", f"{acc['active_matmul']:,}", "active minus embedding lookups (DeepSeek's 'active')"],
        ["training FLOPs/token", f"{acc['training_flops_per_token']:.4g}", f"6N + {attn}, T={T:,} (PaLM app. B)"],
        cache,
        ["weights", _gib(mem["weights"]), f"total params · {b} B ({dtype})"],
        ["gradients", _gib(mem["gradients"]), f"total params · {b} B ({dtype})"],
        ["fp32 master weights", _gib(mem["master_weights"]), "total params · 4 B, where dtype < fp32"],
        ["AdamW m, v", _gib(mem["adamw_states"]), "total params · 2 · 4 B (fp32)"],
        ["training memory", _gib(mem["total"]), "no activations (ZeRO §3.1: 16 B/param)"],
    ]
    if config.ssd is not None:
        rows.insert(3, ["SSD state/sequence", f"{acc['ssd_state_bytes']:,} B",
                        f"L_ssd·(H·P·N·4 + (W-1)·(E+2·G·N)·{b}) B, any length"])
    rules = [4, 8] if config.ssd is not None else [3, 7]
    lines += table(["per token / memory", "value", "formula"], rows, rules_before=rules, align="lrl")
    return "\n".join(lines)


_LABELS = {"ffn": "dense ffn", "routed_experts": "routed experts", "shared_experts": "shared experts"}


def format_breakdown(
    breakdown: dict[str, int], title: str | None = None, active: dict[str, int] | None = None
) -> str:
    """A table for humans: component, count with thousands separators, share of the total, and
    with `active`, the parameters a token uses. MoE rows are left out where they are all 0."""
    keys = [k for k in COMPONENTS if k in breakdown and (k not in (*MOE_COMPONENTS, "ssd") or breakdown[k])]
    header = ["component", "parameters", "share"] + (["active/token"] if active else [])
    total = breakdown["total"]
    cells = []
    for k in [*keys, "total"]:
        n = breakdown[k]
        row = [_LABELS.get(k, k), f"{n:,}", f"{100 * n / total:.1f}%" if total else "-"]
        cells.append(row + ([f"{active[k]:,}"] if active else []))
    return "\n".join(([title] if title else []) + table(header, cells, rules_before=[len(cells) - 1]))


def table(header: list[str], rows: list[list[str]], rules_before=(), align: str | None = None) -> list[str]:
    """Lines of a table, a rule under the header and before each row index in `rules_before`.
    align: one "l" or "r" per column (default: the first left, the others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = (c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align))
        return "  ".join(cells).rstrip()

    rule = "-" * max(len(line(row)) for row in [header, *rows])
    lines = [line(header), rule]
    for i, row in enumerate(rows):
        lines += [rule] if i in rules_before else []
        lines.append(line(row))
    return lines


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 10 * 2**30 else f"{n / 2**30:.2f} GiB"
