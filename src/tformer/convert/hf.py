"""HF transformers checkpoints (gpt2, llama, mistral, qwen2, mixtral, qwen2_moe, deepseek_v3) <-> tformer models.

The HF parameter names live only here, as key maps: one rule per parameter kind, used in
both directions. Tensors change in these ways only:

    gpt2 Conv1D weights are stored (in, out)          -> transposed to our Linear (out, in)
    llama-family q_proj | k_proj | v_proj (and biases) -> concatenated rows of our wqkv
    MoE experts, one tensor per expert                 -> stacked (E, ...) (`hf_moe`: the fused 5.x layout too)
    deepseek_v3 q / kv_a RoPE rows, interleaved pairs  -> rotate-half order (`hf_moe.rope_rows`)

Otherwise RoPE needs no permutation: tformer uses HF's rotate-half layout.

An export with a tokenizer names its special tokens the way transformers reads them: bos/eos/pad
ids in config.json and generation_config.json, names in tokenizer_config.json and
special_tokens_map.json. tformer encodes a prompt's text with no BOS (training data separates
documents by EOS only), and nothing in the export asks transformers to add one, so `tok(prompt)`
gives the same ids; a foreign tokenizer.json whose own template adds a BOS keeps it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tformer.checkpoint import model_from_tensors, tokenizer_for, warn_no_tokenizer
from tformer.config import ConfigError, ModelConfig
from tformer.convert.hf_config import SUPPORTED_MODEL_TYPES, config_from_hf, config_to_hf, hf_model_type
from tformer.convert.hf_moe import drop_mtp_layers, rope_rows, unfuse_experts
from tformer.convert.hf_dir import write_hf_dir
from tformer.io import CheckpointError, read_json, read_safetensors_dir
from tformer.models.build import build_model
from tformer.models.decoder import Decoder

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "config_from_hf",
    "config_to_hf",
    "load_hf",
    "save_hf",
    "state_dict_from_hf",
    "state_dict_to_hf",
]

COPY, CONV1D, QKV = "copy", "conv1d", "qkv"
EXPERTS = "experts"  # ours (E, ...) <-> E tensors, HF name with {e} = 0 .. E-1
ROPE_Q, ROPE_KV = "rope_q", "rope_kv"  # MLA projections with DeepSeek's interleaved RoPE rows

# (our name, HF name or (q, k, v) names, how the tensor changes); `\1`, `\2` are our name's groups
_LLAMA_KEYS = [
    (r"tok_emb\.weight", "model.embed_tokens.weight", COPY),
    (r"layers\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight", COPY),
    (r"layers\.(\d+)\.attn\.wqkv\.(weight|bias)",
     tuple(rf"model.layers.\1.self_attn.{p}_proj.\2" for p in "qkv"), QKV),  # fmt: skip
    (r"layers\.(\d+)\.attn\.wo\.(weight|bias)", r"model.layers.\1.self_attn.o_proj.\2", COPY),
    (r"layers\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight", COPY),
    (r"layers\.(\d+)\.ffn\.w1\.(weight|bias)", r"model.layers.\1.mlp.gate_proj.\2", COPY),
    (r"layers\.(\d+)\.ffn\.w3\.(weight|bias)", r"model.layers.\1.mlp.up_proj.\2", COPY),
    (r"layers\.(\d+)\.ffn\.w2\.(weight|bias)", r"model.layers.\1.mlp.down_proj.\2", COPY),
    (r"norm\.weight", "model.norm.weight", COPY),
    (r"output\.weight", "lm_head.weight", COPY),
]
_GPT2_KEYS = [
    (r"tok_emb\.weight", "transformer.wte.weight", COPY),
    (r"pos_emb\.weight", "transformer.wpe.weight", COPY),
    (r"layers\.(\d+)\.attn_norm\.(weight|bias)", r"transformer.h.\1.ln_1.\2", COPY),
    (r"layers\.(\d+)\.attn\.wqkv\.(weight|bias)", r"transformer.h.\1.attn.c_attn.\2", CONV1D),  # fused q|k|v
    (r"layers\.(\d+)\.attn\.wo\.(weight|bias)", r"transformer.h.\1.attn.c_proj.\2", CONV1D),
    (r"layers\.(\d+)\.ffn_norm\.(weight|bias)", r"transformer.h.\1.ln_2.\2", COPY),
    (r"layers\.(\d+)\.ffn\.w1\.(weight|bias)", r"transformer.h.\1.mlp.c_fc.\2", CONV1D),
    (r"layers\.(\d+)\.ffn\.w2\.(weight|bias)", r"transformer.h.\1.mlp.c_proj.\2", CONV1D),
    (r"norm\.(weight|bias)", r"transformer.ln_f.\1", COPY),
    (r"output\.weight", "lm_head.weight", COPY),
]


def _expert_keys(block: str, gate: str, up: str, down: str) -> list:
    return [
        (r"layers\.(\d+)\.ffn\.router\.gate\.weight", rf"model.layers.\1.{block}.gate.weight", COPY),
        *((rf"layers\.(\d+)\.ffn\.experts\.{ours}", rf"model.layers.\1.{block}.experts.{{e}}.{theirs}.weight", EXPERTS)
          for ours, theirs in (("w1", gate), ("w3", up), ("w2", down))),
    ]  # fmt: skip


def _shared_keys(module: str) -> list:
    return [(rf"layers\.(\d+)\.ffn\.shared\.{ours}\.weight", rf"model.layers.\1.mlp.{module}.{theirs}.weight", COPY)
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))]  # fmt: skip


_MLA_KEYS = [
    (r"layers\.(\d+)\.attn\.wq\.weight", r"model.layers.\1.self_attn.q_proj.weight", ROPE_Q),
    (r"layers\.(\d+)\.attn\.wq_a\.(weight|bias)", r"model.layers.\1.self_attn.q_a_proj.\2", COPY),
    (r"layers\.(\d+)\.attn\.q_norm\.weight", r"model.layers.\1.self_attn.q_a_layernorm.weight", COPY),
    (r"layers\.(\d+)\.attn\.wq_b\.weight", r"model.layers.\1.self_attn.q_b_proj.weight", ROPE_Q),
    (r"layers\.(\d+)\.attn\.wkv_a\.(weight|bias)", r"model.layers.\1.self_attn.kv_a_proj_with_mqa.\2", ROPE_KV),
    (r"layers\.(\d+)\.attn\.kv_norm\.weight", r"model.layers.\1.self_attn.kv_a_layernorm.weight", COPY),
    (r"layers\.(\d+)\.attn\.wkv_b\.weight", r"model.layers.\1.self_attn.kv_b_proj.weight", COPY),
]
_MOE_KEYS = {
    "mixtral": _expert_keys("block_sparse_moe", "w1", "w3", "w2"),
    "qwen2_moe": [
        *_expert_keys("mlp", "gate_proj", "up_proj", "down_proj"),
        *_shared_keys("shared_expert"),
        (r"layers\.(\d+)\.ffn\.shared_gate\.weight", r"model.layers.\1.mlp.shared_expert_gate.weight", COPY),
    ],
    "deepseek_v3": [
        *_expert_keys("mlp", "gate_proj", "up_proj", "down_proj"),
        (r"layers\.(\d+)\.ffn\.router\.expert_bias", r"model.layers.\1.mlp.gate.e_score_correction_bias", COPY),
        *_shared_keys("shared_experts"),
        *_MLA_KEYS,
    ],
}
# model type -> (rules, the prefix of the base model's names)
_KEYS = {
    "gpt2": (_GPT2_KEYS, "transformer."),
    **{t: (_LLAMA_KEYS, "model.") for t in ("llama", "mistral", "qwen2")},
    **{t: (rules + _LLAMA_KEYS, "model.") for t, rules in _MOE_KEYS.items()},
}
# HF buffers saved by some versions: GPT-2's causal-mask tables, RoPE frequencies
_BUFFERS = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq|rotary_emb\.original_inv_freq)$")


def _key_plan(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], str, tuple[int, ...]]]:
    """our name -> (HF names, op, our shape) for every parameter a checkpoint must hold."""
    model_type = hf_model_type(cfg)
    rules, _ = _KEYS[model_type]
    plan = {}
    for name, value in build_model(cfg, device="meta").state_dict().items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue  # stored once, as the embedding
        for pattern, template, op in rules:
            if m := re.fullmatch(pattern, name):
                names = tuple(m.expand(t) for t in (template if isinstance(template, tuple) else (template,)))
                if op == EXPERTS:
                    names = tuple(names[0].replace("{e}", str(e)) for e in range(value.shape[0]))
                plan[name] = (names, op, tuple(value.shape))
                break
        else:
            raise RuntimeError(f"no HF name for parameter {name!r} of a {model_type} model: extend the key map")
    return plan


def _qkv_sizes(cfg: ModelConfig) -> list[int]:
    return [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]


def _hf_shapes(op: str, shape: tuple[int, ...], cfg: ModelConfig) -> list[tuple[int, ...]]:
    if op == QKV:
        return [(n, *shape[1:]) for n in _qkv_sizes(cfg)]
    if op == CONV1D and len(shape) == 2:
        return [shape[::-1]]
    if op == EXPERTS:
        return [shape[1:]] * shape[0]
    return [shape]


def _with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Base-model checkpoints (GPT2Model, LlamaModel) name weights without the `transformer.`/`model.` prefix."""
    if any(k.startswith(prefix) for k in tensors):
        return tensors
    return {k if k == "lm_head.weight" else prefix + k: v for k, v in tensors.items()}


def state_dict_from_hf(
    tensors: dict[str, torch.Tensor], cfg: ModelConfig, source: str = "HF checkpoint", rope_interleave: bool = True
) -> dict:
    """HF-named tensors -> our names; CheckpointError naming any missing, unexpected or misshapen tensor.

    rope_interleave: the deepseek_v3 config's flag (true unless the config says false): its q and
    kv_a RoPE rows are interleaved pairs, reordered here to rotate-half.
    """
    plan = _key_plan(cfg)
    model_type = hf_model_type(cfg)
    tensors = unfuse_experts(_with_prefix(tensors, _KEYS[model_type][1]), model_type)
    missing = [n for names, _, _ in plan.values() for n in names if n not in tensors]
    used = {n for names, _, _ in plan.values() for n in names}
    if cfg.tie_embeddings:
        used.add("lm_head.weight")  # some exports store the tied matrix twice; the embedding wins
    unexpected = sorted(k for k in tensors if k not in used and not _BUFFERS.search(k))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match its config: missing tensors {missing[:8]}{' ...' * (len(missing) > 8)}, "
            f"unexpected tensors {unexpected[:8]}{' ...' * (len(unexpected) > 8)}"
        )
    out = {}
    for ours, (names, op, shape) in plan.items():
        parts = [tensors[n] for n in names]
        for name, part, expected in zip(names, parts, _hf_shapes(op, shape, cfg)):
            if tuple(part.shape) != expected:
                raise CheckpointError(
                    f"{source}: tensor {name!r} has shape {tuple(part.shape)}, the config expects {expected}"
                )
        if op == QKV:
            out[ours] = torch.cat(parts, dim=0)
        elif op == EXPERTS:
            out[ours] = torch.stack(parts)
        elif op in (ROPE_Q, ROPE_KV) and rope_interleave:
            out[ours] = rope_rows(parts[0], cfg, query=op == ROPE_Q)
        else:
            out[ours] = parts[0].t() if op == CONV1D and parts[0].ndim == 2 else parts[0]
    return out


def state_dict_to_hf(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our names -> the names (and layouts) of the HF architecture `config_to_hf(cfg)` picks."""
    out = {}
    for ours, (names, op, _) in _key_plan(cfg).items():
        if ours not in tensors:
            raise CheckpointError(f"state dict has no {ours!r}; it does not come from a model with this config")
        t = tensors[ours]
        if op == QKV:
            parts = t.split(_qkv_sizes(cfg), dim=0)
        elif op == EXPERTS:
            parts = t.unbind(0)
        elif op in (ROPE_Q, ROPE_KV):  # config_to_hf writes rope_interleave=true
            parts = (rope_rows(t, cfg, query=op == ROPE_Q, inverse=True),)
        else:
            parts = (t.t() if op == CONV1D and t.ndim == 2 else t,)
        out.update(zip(names, parts))
    return out


def _load_t5(path, device="cpu", dtype=None):
    from tformer.convert.hf_t5 import load_hf_t5

    return load_hf_t5(path, device, dtype)


def _load_marian(path, device="cpu", dtype=None):
    from tformer.convert.hf_marian import load_hf_marian

    return load_hf_marian(path, device, dtype)


ENCODER_DECODER_LOADERS = {"t5": _load_t5, "marian": _load_marian}


def load_hf(path: str | Path, device="cpu", dtype: torch.dtype | None = None) -> Decoder:
    """A Decoder from an HF model directory (config.json + model.safetensors or shards + index);
    an Encoder from a BERT one (`tformer.convert.hf_bert`); an EncoderDecoder from a T5 or Marian
    one (`tformer.convert.hf_t5`, `hf_marian`)."""
    path = Path(path)
    hf = read_json(path / "config.json")
    if hf.get("model_type") == "bert":  # an Encoder (BertModel weights)
        from tformer.convert.hf_bert import load_hf_bert

        return load_hf_bert(path, device=device, dtype=dtype)
    if hf.get("model_type") == "modernbert":  # an Encoder (ModernBertModel weights; an MLM head is ignored)
        from tformer.convert.hf_modernbert import load_hf_modernbert

        return load_hf_modernbert(path, device=device, dtype=dtype)
    if hf.get("model_type") in ENCODER_DECODER_LOADERS:  # an EncoderDecoder (T5, Marian)
        return ENCODER_DECODER_LOADERS[hf["model_type"]](path, device=device, dtype=dtype)
    try:
        cfg = config_from_hf(hf)
    except ConfigError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from e
    tensors = read_safetensors_dir(path)
    if cfg.mla is not None:  # deepseek_v3
        tensors = drop_mtp_layers(tensors, hf, cfg.n_layers, str(path))
    tensors = state_dict_from_hf(tensors, cfg, str(path), rope_interleave=bool(hf.get("rope_interleave", True)))
    return model_from_tensors(cfg, tensors, str(path), device, dtype)


def save_hf(model: Decoder, path: str | Path, tokenizer=None, max_shard_bytes: int | None = None,
            labels: list[str] | None = None) -> Path:
    """Write `model` as an HF model directory that `AutoModelForCausalLM.from_pretrained` loads,
    and with `tokenizer` one that `AutoTokenizer` loads and `generate` stops at its EOS.

    `tokenizer`: a Tokenizer or a path, as for `tformer.save`; without one, config.json's token ids
    are null (not transformers' defaults) and a warning says the export has no tokenizer. `labels`:
    a BERT classifier's or tagger's label names (id2label; default LABEL_0, LABEL_1, ...).
    Weights go to model.safetensors, or to shards plus model.safetensors.index.json when they
    exceed `max_shard_bytes`. The directory is written through `tformer.io.atomic_path`.
    """
    from tformer.quantize import is_quantized

    if model.config.architecture == "encoder_decoder":  # T5ForConditionalGeneration or MarianMTModel
        from tformer.convert.hf_marian import save_hf_encoder_decoder

        return save_hf_encoder_decoder(model, path, tokenizer, max_shard_bytes)
    if is_quantized(model):
        raise ValueError(
            "this model is quantized (tformer.quantize); HF export needs full-precision weights: "
            "convert the checkpoint it was quantized from"
        )
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be a positive number of bytes or None, got {max_shard_bytes}")
    if model.config.architecture == "encoder":  # the BERT family (hf_bert); RoPE or local layers: hf_modernbert
        from tformer.convert.hf_bert import save_hf_bert
        from tformer.convert.hf_modernbert import is_modernbert_shaped, save_hf_modernbert

        if is_modernbert_shaped(model.config):
            return save_hf_modernbert(model, path, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)
        return save_hf_bert(model, path, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes, labels=labels)
    dtype = str(model.tok_emb.weight.dtype).removeprefix("torch.")
    hf_config = config_to_hf(model.config, dtype=dtype)  # fails before anything is written
    tokenizer = tokenizer_for(model, tokenizer)
    token_ids = _token_ids(tokenizer)
    tensors = state_dict_to_hf(model.state_dict(), model.config)
    extra = {}
    if tokenizer is None:
        warn_no_tokenizer(path, "save_hf", needs="`AutoTokenizer` (and `tformer generate`)")
    else:  # greedy by default, as transformers' own default; pad falls back to EOS as generate does
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        extra["generation_config.json"] = {**token_ids, "pad_token_id": pad}
    return write_hf_dir(path, tensors, {**hf_config, **token_ids}, tokenizer, max_shard_bytes, extra)


def _token_ids(tokenizer) -> dict[str, int | None]:
    """config.json's special-token ids; null without a tokenizer, where transformers would
    otherwise fill in its architecture's defaults (Llama's 1 and 2, GPT-2's 50256)."""
    ids = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if tokenizer is not None else (None,) * 3
    return dict(zip(("bos_token_id", "eos_token_id", "pad_token_id"), ids))
