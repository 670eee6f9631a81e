"""Parameter accounting: how many parameters a config has, where they sit, and how many a token uses.

The model is built on the meta device (no memory is allocated, so a 671B config costs nothing)
and its named parameters are classified by our module names, so the counts are those of the
code. A tied output matrix is the token embedding: `named_parameters` yields it once, under
`tok_emb`, so `output` counts 0.

Components: embeddings (token + learned positions), attention (incl. MLA's latent norms),
ffn (the dense FFNs), routed_experts, shared_experts (incl. Qwen2-MoE's shared-expert gate),
router, norms (the blocks' and the final norm), output. Dense models have 0 in the three MoE rows.

Active parameters per token: a token runs top_k of n_experts routed experts in each MoE layer,
so routed_experts count top_k / n_experts of their total; everything else counts fully,
embeddings included. That is how Mistral (Mixtral 12.9B of 46.7B) and Qwen (Qwen1.5-MoE 2.7B of
14.3B) state "active"; DeepSeek leaves the embedding lookup out (V2-Lite 2.4B of 15.7B, V3 37B
of 671B): that figure is `active_matmul_params`, the N of the 6N training FLOPs (tformer.accounting).
"""

from __future__ import annotations

from torch import nn

from tformer.config import ModelConfig
from tformer.models.build import build_model

COMPONENTS = ("embeddings", "attention", "ffn", "routed_experts", "shared_experts", "router", "norms", "output")
MOE_COMPONENTS = ("routed_experts", "shared_experts", "router")

# First name segment -> component, for parameters outside the blocks.
_TOP_LEVEL = {"tok_emb": "embeddings", "pos_emb": "embeddings", "norm": "norms", "output": "output"}
# Module name inside a block (layers.{i}.<name>) -> component.
_IN_BLOCK = {"attn": "attention", "ffn": "ffn", "attn_norm": "norms", "ffn_norm": "norms"}
# Module name inside a MoE layer's ffn (layers.{i}.ffn.<name>) -> component; a dense FFN's
# w1/w2/w3 are not listed and stay "ffn".
_IN_MOE = {"experts": "routed_experts", "router": "router", "shared": "shared_experts", "shared_gate": "shared_experts"}


def parameter_breakdown(config: ModelConfig) -> dict[str, int]:
    """Parameter counts of a model of `config` by component (see the module docstring) and total."""
    return model_breakdown(build_model(config, device="meta"))


def model_breakdown(model: nn.Module) -> dict[str, int]:
    """`parameter_breakdown` of a built Decoder (any device); shared parameters count once."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():  # deduplicates tied parameters
        counts[classify(name)] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def active_breakdown(config: ModelConfig, breakdown: dict[str, int] | None = None) -> dict[str, int]:
    """Parameters one token uses, by component: `breakdown` (default: `parameter_breakdown(config)`)
    with the routed experts scaled by top_k / n_experts; embeddings count fully."""
    total = breakdown if breakdown is not None else parameter_breakdown(config)
    active = {k: total[k] for k in COMPONENTS}
    if config.moe is not None:
        routed, m = total["routed_experts"], config.moe
        if routed % m.n_experts:
            raise ValueError(
                f"routed_experts={routed:,} is not a multiple of moe.n_experts={m.n_experts}: "
                "a parameter outside the experts is classified as routed (see tformer.params._IN_MOE)"
            )
        active["routed_experts"] = routed // m.n_experts * m.top_k
    active["total"] = sum(active[k] for k in COMPONENTS)
    return active


def active_matmul_params(config: ModelConfig, active: dict[str, int]) -> int:
    """Active parameters without the embedding lookups (token and learned positions): those a
    token multiplies with, the N of 6N. A tied output matrix is kept: it is the head's matmul."""
    lookups = active["embeddings"] - (config.vocab_size * config.dim if config.tie_embeddings else 0)
    return active["total"] - lookups


def classify(name: str) -> str:
    """The component of a Decoder parameter name, e.g. "layers.3.attn.wqkv.weight" -> "attention",
    "layers.3.ffn.experts.w1" -> "routed_experts"."""
    parts = name.split(".")
    if parts[0] == "layers" and len(parts) > 2 and parts[2] in _IN_BLOCK:
        component = _IN_BLOCK[parts[2]]
        if component == "ffn" and len(parts) > 3 and parts[3] in _IN_MOE:
            return _IN_MOE[parts[3]]
        return component
    if parts[0] in _TOP_LEVEL:
        return _TOP_LEVEL[parts[0]]
    raise ValueError(
        f"parameter {name!r} belongs to no known component {COMPONENTS}: "
        "add its module name to tformer.params._TOP_LEVEL, _IN_BLOCK or _IN_MOE"
    )


_LABELS = {"ffn": "dense ffn", "routed_experts": "routed experts", "shared_experts": "shared experts"}


def format_breakdown(
    breakdown: dict[str, int], title: str | None = None, active: dict[str, int] | None = None
) -> str:
    """A table for humans: component, count with thousands separators, share of the total, and
    with `active`, the parameters a token uses. MoE rows are left out where they are all 0."""
    keys = [k for k in COMPONENTS if k in breakdown and (k not in MOE_COMPONENTS or breakdown[k])]
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
