"""Serving: an OpenAI-compatible HTTP app (app.py, FastAPI) over a continuous-batching engine
(engine.py) with a paged KV cache (blocks.py) and batch-invariant sampling (sampling.py).

    from tformer.serve import ServedModel, ServeSettings, build_app
    app = build_app([ServedModel("my-model", ServeEngine(model), tokenizer, template)], ServeSettings())

The HTTP names load on first use, so the engine imports without the `serve` extra (fastapi, uvicorn,
prometheus-client).
"""

_LAZY = {"build_app": "tformer.serve.app", "ServeSettings": "tformer.serve.app",
         "ServedModel": "tformer.serve.generation"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tformer.serve' has no attribute {name!r}")
