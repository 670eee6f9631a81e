"""LoRA fine-tuning speed and memory on one GPU: tformer vs HF transformers + PEFT, timed in one process.

    python bench/finetune.py [--batch 4] [--seq 2048] [--steps 10] [--variants ...] [--json out.json]
    python bench/finetune.py --tiny --device cpu     # every variant on a toy shape: a smoke test

Shape: Llama-3.2-1B (tied embeddings, as published), random weights, the base in bf16 (no fp32 copy),
batch 4 x 2048 random tokens. Both sides: LoRA r 16, alpha 32, dropout 0 on every Linear of attention
and MLP (q, k, v, o, gate, up, down; tformer's fused wqkv takes one rank-r adapter where PEFT has three,
so tformer trains 9% fewer adapter weights), adapters in fp32 (both libraries' default), AdamW
(fused on CUDA, lr 1e-4) over the adapters alone, no activation checkpointing, the loss over the
next tokens of each row (T - 1 targets).

    tformer-lora          Decoder.hidden with each block compiled (torch.compile, one graph shared by
                          the 16 blocks), then the final norm and linear_cross_entropy compiled: the
                          head's logits in chunks of 1,024 rows, never all in fp32
    tformer-lora-graph    the same in one compiled graph (model and loss)
    tformer-lora-eager    the same, not compiled
    tformer-qlora[-...]   tformer-lora[-...] with the base's Linears in NF4 (torchao; embedding and head bf16)
    hf-peft               LlamaForCausalLM (SDPA attention) in peft.get_peft_model, eager, its own loss:
                          model(input_ids, labels=input_ids).loss (all (B, T, V) logits, upcast to fp32)
    hf-peft-qlora         the same on a bitsandbytes NF4 base; skipped where bitsandbytes is missing

Each variant is built after the last one is freed, warmed up (--warmup steps, compilation included:
their time is the warm-up column), then --steps steps (forward, backward, optimiser step) are timed
one by one with torch.cuda.synchronize; tokens/s = batch x seq / the median step. Peak memory is
torch.cuda.max_memory_allocated from the end of the build (base weights included, the build's own
transient peak not) to the last step; "weights" is what was allocated right after the build.

On the lent GPU machine (peft, transformers and torch there; torchao travels as a wheel in .whl):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:src TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1 PYTHONUNBUFFERED=1 \
        || exit; python3 bench/finetune.py --json $OUT/finetune.json 2>&1 | tee $OUT/finetune.log
(NF4 is pure PyTorch: torchao's compiled extensions are not needed, and are not loaded.)
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from tformer.adapters import LoRAConfig, apply_lora, lora_parameters
from tformer.models import build_model
from tformer.presets import get_preset
from tformer.train.linear_ce import linear_cross_entropy

VARIANTS = ("tformer-lora", "tformer-lora-eager", "hf-peft", "tformer-qlora", "hf-peft-qlora")
KNOWN = (*VARIANTS, "tformer-lora-graph", "tformer-qlora-eager", "tformer-qlora-graph")
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASELINE = "hf-peft"


def tformer_runner(name: str, config, args):
    """(model, trainable parameters, loss(tokens, targets)) for "tformer-[q]lora[-eager|-graph]"."""
    model = build_model(config, device=args.device, dtype=torch.bfloat16)
    quantize = "nf4" if "qlora" in name else None
    apply_lora(model, LoRAConfig(r=args.rank, alpha=args.alpha, targets=["all-linear"], quantize=quantize))
    model.train()

    def head_loss(h, targets):  # h (B, T, C), the last block's output
        return linear_cross_entropy(model.norm(h), model.output.weight, targets)

    def forward_loss(tokens, targets):
        return head_loss(model.hidden(tokens), targets)

    if name.endswith("-graph"):
        forward_loss = torch.compile(forward_loss)
    elif not name.endswith("-eager"):  # per block (torchtitan's way): the blocks share one compiled graph
        for layer in model.layers:
            layer.compile()
        head_loss = torch.compile(head_loss)
    return model, lora_parameters(model), forward_loss


def hf_llama_config(config):
    """The HF LlamaConfig of `config`'s sizes (RoPE at HF's default base: the frequencies cost nothing)."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim,
        intermediate_size=config.ffn_dim, rms_norm_eps=config.norm_eps, max_position_embeddings=config.max_seq_len,
        tie_word_embeddings=config.tie_embeddings, attention_dropout=0.0, use_cache=False,
    )


def hf_runner(name: str, config, args):
    """(model, trainable parameters, loss(tokens, targets)) for "hf-peft" and "hf-peft-qlora"."""
    import peft
    import transformers

    hf_cfg = hf_llama_config(config)
    if name == "hf-peft-qlora":
        model = bnb_nf4_model(hf_cfg, args.device)
    else:
        with torch.device(args.device):
            model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16,
                                                                  attn_implementation="sdpa")
    lora = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=HF_TARGETS, lora_dropout=0.0,
                           bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    model.train()

    def forward_loss(tokens, targets):  # HF shifts the labels itself
        return model(input_ids=tokens, labels=tokens).loss

    return model, [p for p in model.parameters() if p.requires_grad], forward_loss


def bnb_nf4_model(hf_cfg, device: str):
    """A random bf16 Llama saved and read back with bitsandbytes' NF4 (double quantization, bf16 compute)."""
    import transformers

    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16)
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        del model
        free_memory()
        return transformers.AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=quant, dtype=torch.bfloat16, device_map={"": torch.device(device)},
            attn_implementation="sdpa")


def time_steps(forward_loss, params, tokens, targets, warmup: int, steps: int) -> dict:
    """Warm-up steps (their total time), then `steps` steps timed one by one."""
    opt = torch.optim.AdamW(params, lr=1e-4, fused=tokens.is_cuda)

    def step():
        loss = forward_loss(tokens, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    sync()
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times), "warmup_s": warm_s, "loss": loss.item()}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    torch._dynamo.reset()  # compiled code of the last variant may hold its model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_variant(name: str, config, args, tokens, targets) -> dict:
    if name == "hf-peft-qlora" and importlib.util.find_spec("bitsandbytes") is None:
        return {"variant": name, "skipped": "bitsandbytes is not installed"}
    torch.manual_seed(0)
    cuda = args.device.startswith("cuda")
    runner = tformer_runner if name.startswith("tformer") else hf_runner
    model, params, forward_loss = runner(name, config, args)
    free_memory()
    weights = torch.cuda.memory_allocated() if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    r = time_steps(forward_loss, params, tokens, targets, args.warmup, args.steps)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return {"variant": name, "tokens_per_s": round(tokens.numel() / r["step_s"]),
            "step_ms": round(r["step_s"] * 1e3, 1), "peak_mem_gb": gb(peak), "weights_gb": gb(weights),
            "trainable_params": sum(p.numel() for p in params), "warmup_s": round(r["warmup_s"], 1),
            "loss": round(r["loss"], 4)}


def gb(n: int | None) -> float | None:
    return None if n is None else round(n / 1e9, 2)


def add_ratios(rows: list[dict]) -> None:
    """Each row's tokens/s and peak memory over hf-peft's, where both were measured."""
    base = next((r for r in rows if r["variant"] == BASELINE and "tokens_per_s" in r), None)
    if base is None:
        return
    for r in rows:
        if "tokens_per_s" in r:
            r["speed_vs_hf"] = round(r["tokens_per_s"] / base["tokens_per_s"], 2)
            if r["peak_mem_gb"] and base["peak_mem_gb"]:
                r["memory_vs_hf"] = round(r["peak_mem_gb"] / base["peak_mem_gb"], 2)


def markdown(rows: list[dict]) -> str:
    head = ("| variant | tokens/s | x hf-peft | peak GB | x hf-peft | weights GB | trainable | step ms "
            "| warm-up s | loss |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['variant']} | {r.get('skipped') or 'failed: ' + r.get('error', '')} |"
                         + " |" * 8)
            continue
        cells = [r["variant"], f"{r['tokens_per_s']:,}", r.get("speed_vs_hf", "-"), r["peak_mem_gb"],
                 r.get("memory_vs_hf", "-"), r["weights_gb"], f"{r['trainable_params']:,}", r["step_ms"],
                 r["warmup_s"], r["loss"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def bench_config(tiny: bool):
    config = get_preset("llama-3.2-1b")
    if tiny:  # every size a multiple of 64: the NF4 blocks divide each weight
        return config.replace(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=256,
                              vocab_size=1024, max_seq_len=256)
    return config.replace(max_seq_len=2048)


def versions() -> str:
    import transformers

    out = [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    for name in ("peft", "torchao", "bitsandbytes"):
        if importlib.util.find_spec(name) is not None:
            out.append(f"{name} {__import__(name).__version__}")
    return ", ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(KNOWN)}")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true",
                    help="a toy shape (dim 128, 2 layers, vocabulary 1024), batch 2 x 128, 1 warm-up and 2 steps")
    ap.add_argument("--json", type=Path, help="write the rows here too")
    args = ap.parse_args()
    if args.tiny:
        args.batch, args.seq, args.steps, args.warmup = 2, 128, 2, 1
    names = args.variants.split(",")
    if unknown := [n for n in names if n not in KNOWN]:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(KNOWN)}")
    config = bench_config(args.tiny)
    torch.manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=args.device)
    targets = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -100)], dim=1)  # as HF's shifted labels
    rows = []
    for name in names:
        try:
            row = run_variant(name, config, args, tokens, targets)
        except Exception as e:  # one failing variant leaves the others' rows
            traceback.print_exc()
            row = {"variant": name, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        free_memory()
    add_ratios(rows)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"\n{device}; {versions()}; batch {args.batch} x {args.seq}, LoRA r {args.rank} alpha {args.alpha:g}, "
          f"{args.warmup} warm-up + {args.steps} timed steps\n")
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"device": device, "versions": versions(), "rows": rows}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
