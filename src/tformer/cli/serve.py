"""`tformer serve PATH`: the OpenAI-compatible server (tformer.serve does the work)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tformer.cli import DTYPES, UserError, torch_dtype

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description=(
            "Serve a tformer checkpoint or HF model directory (with its tokenizer.json) over HTTP: POST "
            "/v1/completions and /v1/chat/completions (streaming as server-sent events), GET /v1/models, "
            "/health and /metrics (Prometheus). Requests are batched continuously over a paged KV cache. "
            "Each --adapter is served as its own model name, a merged copy of the base with that adapter "
            "(memory: one model per adapter). An encoder (BERT, ModernBERT, all-MiniLM-L6-v2) is served on POST "
            "/v1/embeddings instead: embeddings by its sentence-transformers pipeline (default: mean-pooled, "
            "L2-normalised), batched across requests."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("path", help="checkpoint or HF model directory")
    p.add_argument("--model-name", help="the name clients ask for (None: the folder's name)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="also serve base + this LoRA adapter as model NAME (no NAME: the adapter folder's name); "
                        "repeatable")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; 0.0.0.0 makes the server reachable from other machines")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (None: $TFORMER_API_KEY "
                        "if set, else no key)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="None: bfloat16 on GPU, float32 on CPU")
    g = p.add_argument_group("engine")
    g.add_argument("--max-running", type=int, default=64, help="requests decoded together at most")
    g.add_argument("--max-waiting", type=int, default=256, help="requests queued at most; past that: 503")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    g.add_argument("--n-blocks", type=int, default=None,
                   help="KV cache blocks (None: 60%% of free GPU memory; on CPU, max-running full contexts)")
    g.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens prefilled per engine step")
    g.add_argument("--no-prefix-caching", action="store_true", help="do not reuse KV blocks of shared prefixes")
    g.add_argument("--enforce-eager", action="store_true",
                   help="run decode steps eagerly instead of replaying CUDA graphs (GPU only; for debugging)")
    g = p.add_argument_group("limits")
    g.add_argument("--max-streams", type=int, default=None,
                   help="generations in flight at once, each choice of each request one; past that: 429 "
                        "(None: max-running + max-waiting)")
    g.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="largest request body; past it: 413")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from tformer.serve.app import ServeSettings, build_app
    except ImportError as e:
        raise UserError(f"tformer serve needs the serve extra ({e.name} is missing): pip install 'tformer[serve]'")
    _check(args)
    models = load_models(args)
    settings = ServeSettings(api_key=args.api_key or os.environ.get("TFORMER_API_KEY") or None,
                             max_body_bytes=args.max_body_bytes, max_streams=args.max_streams or args.max_running + args.max_waiting)
    app = build_app(models, settings)
    names = ", ".join(m.name for m in models)
    key = "an API key" if settings.api_key else "no API key"
    print(f"tformer serve: {names} at http://{_url_host(args.host)}:{args.port}/v1 ({key})", file=sys.stderr)
    if args.host not in LOOPBACK and not settings.api_key:
        print(f"tformer serve: note: --host {args.host} is reachable from other machines and no --api-key is set",
              file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def _check(args: argparse.Namespace) -> None:
    for name in ("max_running", "max_waiting", "block_size", "prefill_chunk", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("n_blocks", "max_streams"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be in 0..65535, got {args.port}")


def adapter_names(args: argparse.Namespace, base: str) -> list[tuple[str, Path]]:
    """(model name, adapter folder) of each --adapter; names unique and not the base model's."""
    out, seen = [], {base}
    for spec in args.adapter:
        name, eq, folder = spec.partition("=")
        folder = Path(folder if eq else spec)
        name = name if eq else folder.name
        if not folder.is_dir():
            raise UserError(f"--adapter {spec}: {folder} is not a directory")
        if name in seen:
            raise UserError(f"--adapter {spec}: the model name {name!r} is taken; name it: --adapter NAME={folder}")
        seen.add(name)
        out.append((name, folder))
    return out


def load_models(args: argparse.Namespace) -> list:
    """A ServedModel for the base checkpoint and one for each adapter, each with its own engine."""
    import torch

    from tformer.adapters import load_merged
    from tformer.adapters.merge import chat_template_folder
    from tformer.chat import ChatTemplate
    from tformer.checkpoint import load
    from tformer.inference import load_tokenizer
    from tformer.serve.generation import ServedModel
    from tformer.sources import resolve_config
    from tformer.train.loop import resolve_device

    path = Path(args.path)
    base = args.model_name or path.resolve().name
    adapters = adapter_names(args, base)
    device = resolve_device(args.device)
    dtype = torch_dtype(args.dtype) or (torch.bfloat16 if device.type == "cuda" else None)
    tokenizer = load_tokenizer(path)
    if resolve_config(str(path))[0].architecture != "decoder":
        return [_embedding_model(args, path, base, tokenizer, load(path, device=device, dtype=dtype))]
    models = [(base, load(path, device=device, dtype=dtype), None, None)]
    models += [(name, load_merged(path, folder, device=device, dtype=dtype)[0], folder, base)
               for name, folder in adapters]
    return [ServedModel(name, _engine(args, model), tokenizer,
                        ChatTemplate.for_checkpoint(chat_template_folder(path, folder), tokenizer), parent)
            for name, model, folder, parent in models]


def _embedding_model(args: argparse.Namespace, path: Path, name: str, tokenizer, model):
    """An encoder (or a fine-tuned encoder's trunk) served on /v1/embeddings."""
    from tformer.models import Encoder
    from tformer.inference.embed import EmbedSpec
    from tformer.serve.embeddings import EmbeddingEngine, EmbeddingModel

    encoder = model if isinstance(model, Encoder) else getattr(model, "encoder", None)
    if not isinstance(encoder, Encoder):
        raise UserError(f"{path} is an encoder-decoder: tformer serve serves decoders (text generation) and "
                        "encoders (/v1/embeddings); decode it with `tformer generate`")
    if args.adapter:
        raise UserError("--adapter serves LoRA adapters of a decoder; an encoder is served alone")
    spec = EmbedSpec.read(path)
    engine = EmbeddingEngine(encoder, tokenizer.pad_id if tokenizer.pad_id is not None else 0, spec)
    print(f"{name}: an encoder, served on /v1/embeddings ({spec.pooling} pooling, "
          f"{'L2-normalised, ' if spec.normalize else ''}{engine.max_context} tokens at most)", file=sys.stderr)
    return EmbeddingModel(name, engine, tokenizer)


def _engine(args: argparse.Namespace, model):
    from tformer.serve.engine import ServeEngine

    prefix_caching, prefill_chunk = not args.no_prefix_caching, args.prefill_chunk
    a = model.config.attention
    if a.pattern == "prefix":  # the prefix's keys depend on all of it: no shared blocks, one prefill chunk
        prefix_caching, prefill_chunk = False, max(prefill_chunk, a.prefix)
        print(f"prefix-LM model (attention.prefix={a.prefix}): prefix caching off, prefill chunks of "
              f"{prefill_chunk} tokens", file=sys.stderr)
    try:
        return ServeEngine(model, block_size=args.block_size, n_blocks=args.n_blocks, max_running=args.max_running,
                           max_waiting=args.max_waiting, prefill_chunk=prefill_chunk, prefix_caching=prefix_caching,
                           cuda_graphs=False if args.enforce_eager else None)
    except ValueError as e:
        raise UserError(f"this model cannot be served: {e}") from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
