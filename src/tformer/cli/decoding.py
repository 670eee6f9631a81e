"""Options of the commands that decode (generate, chat): sampling, device and dtype, an adapter;
and the model they describe, loaded (with the adapter merged in) where they say."""

from __future__ import annotations

import argparse

from tformer.cli import DTYPES, UserError, torch_dtype


def add_sampling_options(p: argparse.ArgumentParser, max_new_tokens: int | None,
                         max_new_tokens_help: str = "the most tokens generated for each completion") -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N", help=max_new_tokens_help)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * p_max (0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL penalty (1: off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (None: a fresh draw each run)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", metavar="DIR",
                   help="a LoRA/QLoRA adapter directory (tformer.adapters.save_adapter) trained on this model: "
                        "merged into its weights before decoding")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on GPU, float32 on CPU")


def sampling_config(args: argparse.Namespace):
    """The SamplingConfig of the sampling options, checked (one-line errors)."""
    from tformer.inference import SamplingConfig

    if args.max_new_tokens is not None and args.max_new_tokens <= 0:
        raise UserError("--max-new-tokens must be > 0")
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)
    sampling.validate()
    return sampling


def load_model(args: argparse.Namespace, path: str | None = None):
    """The model at args.path with --adapter merged into its weights (decoding then runs at the base
    model's speed), or the model at `path` (a draft) alone; on --device, in --dtype."""
    import torch

    from tformer.checkpoint import load
    from tformer.train.loop import resolve_device

    device = resolve_device(args.device)
    dtype = torch_dtype(args.dtype) or (torch.bfloat16 if device.type == "cuda" else None)
    adapter = getattr(args, "adapter", None) if path is None else None
    if adapter is None:
        return load(path or args.path, device=device, dtype=dtype)
    from tformer.adapters import load_merged

    return load_merged(args.path, adapter, device=device, dtype=dtype)[0]
