"""Parameter accounting: how many parameters a config has, and where they sit.

The model is built on the meta device (no memory is allocated, so a 70B config costs nothing)
and its named parameters are classified by our module names. A tied output matrix is the
token embedding: `named_parameters` yields it once, under `tok_emb`, so `output` counts 0.
"""

from __future__ import annotations

from torch import nn

from tformer.config import ModelConfig
from tformer.models.build import build_model

COMPONENTS = ("embeddings", "attention", "ffn", "norms", "output")

# First name segment -> component, for parameters outside the blocks.
_TOP_LEVEL = {"tok_emb": "embeddings", "pos_emb": "embeddings", "norm": "norms", "output": "output"}
# Module name inside a block (layers.{i}.<name>) -> component.
_IN_BLOCK = {"attn": "attention", "ffn": "ffn", "attn_norm": "norms", "ffn_norm": "norms"}


def parameter_breakdown(config: ModelConfig) -> dict[str, int]:
    """Parameter counts of a model of `config`: embeddings (token + learned positions),
    attention, ffn, norms, output (0 when tied to the embeddings) and total."""
    return model_breakdown(build_model(config, device="meta"))


def model_breakdown(model: nn.Module) -> dict[str, int]:
    """`parameter_breakdown` of a built Decoder (any device); shared parameters count once."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():  # deduplicates tied parameters
        counts[classify(name)] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def classify(name: str) -> str:
    """The component of a Decoder parameter name, e.g. "layers.3.attn.wqkv.weight" -> "attention"."""
    parts = name.split(".")
    if parts[0] == "layers" and len(parts) > 2 and parts[2] in _IN_BLOCK:
        return _IN_BLOCK[parts[2]]
    if parts[0] in _TOP_LEVEL:
        return _TOP_LEVEL[parts[0]]
    raise ValueError(
        f"parameter {name!r} belongs to no known component {COMPONENTS}: "
        "add its module name to tformer.params._TOP_LEVEL or _IN_BLOCK"
    )


def format_breakdown(breakdown: dict[str, int], title: str | None = None) -> str:
    """A table for humans: component, count with thousands separators, share of the total."""
    total = breakdown["total"]
    rows = [(k, breakdown[k]) for k in COMPONENTS if k in breakdown] + [("total", total)]
    header = ("component", "parameters", "share")
    cells = [(k, f"{n:,}", f"{100 * n / total:.1f}%" if total else "-") for k, n in rows]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(3)]

    def line(row: tuple[str, str, str]) -> str:
        return f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}"

    rule = "-" * len(line(header))
    lines = [line(header), rule, *(line(c) for c in cells[:-1]), rule, line(cells[-1])]
    return "\n".join(([title] if title else []) + lines)
