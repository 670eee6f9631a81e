"""Read or replace what flows through a model's modules during a forward, from outside the model.

    with record(model) as rec:                  # every block, by default
        logits = model(tokens)
    rec.inputs["layers.0"], rec.outputs["layers.0"]   # (B, T, C) each
    rec.residual                                # [block 0's input, block 0's output, ..., last block's output]

    with record(model, attention=True) as rec:  # also each layer's softmax weights (B, H, T, S)
        model(tokens)
    rec.attention[0]

    with patch(model, outputs={3: lambda y: y * 0}):   # replace block 3's output
        logits = model(tokens)

    with patch(model, attention={0: lambda w: w * keep}):  # change block 0's weights (B, H, T, S)
        logits = model(tokens)

Modules are named as in `model.named_modules()` ("layers.3", "layers.3.attn", "layers.3.ffn", "norm");
an int i stands for block "layers.i". An encoder-decoder has two stacks, "enc_layers.i" and "dec_layers.i"
(whose cross-attention is "dec_layers.i.cross"): its blocks are both stacks', named, and
`rec.residual_of("enc_layers")` / `rec.residual_of("dec_layers")` give each stack's stream. Recording and patching use PyTorch forward hooks and change
nothing else: a `record` without attention, or a `patch` whose functions return their argument,
gives bit-identical logits. With `attention=True` every attention layer computes the textbook
formula instead of SDPA (`capture_attention`), which equals it to rounding, not bit for bit; so does
a block whose attention weights are patched (multi-head attention only, not MLA). Both shadow
`Attention.core` on the instance, so the two do not nest: a second one is refused.
The residual stream is read at block boundaries (the blocks' inputs and outputs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from tformer.nn.attention import Attention, reference_attention
from tformer.viz.attention import capture_attention

Transform = Callable[[torch.Tensor], torch.Tensor]


class Recording:
    """What `record` saw: `inputs` and `outputs` by module name (the last forward's, detached), the
    `residual` stream at block boundaries and, with attention=True, `attention` weights in call order."""

    def __init__(self, block_names: list[str]):
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.attention: list[torch.Tensor] = []
        self._stacks: dict[str, list[str]] = {}
        for name in block_names:
            self._stacks.setdefault(name.rsplit(".", 1)[0], []).append(name)

    @property
    def residual(self) -> list[torch.Tensor]:
        """n_layers + 1 tensors (B, T, C): the first block's input, then every block's output."""
        if len(self._stacks) != 1:
            raise ValueError(f"this model has the stacks {sorted(self._stacks)}: read rec.residual_of(stack)")
        return self.residual_of(next(iter(self._stacks)))

    def residual_of(self, stack: str) -> list[torch.Tensor]:
        """The residual stream of one stack of blocks ("layers", "enc_layers", "dec_layers")."""
        if stack not in self._stacks:
            raise KeyError(f"no stack {stack!r}: this model has {sorted(self._stacks)}")
        blocks = self._stacks[stack]
        missing = [n for n in blocks if n not in self.outputs]
        if missing:
            raise KeyError(f"blocks {missing} were not recorded: record(model) with the default modules does")
        return [self.inputs[blocks[0]], *(self.outputs[n] for n in blocks)]


@contextmanager
def record(model: nn.Module, modules: Iterable[str | int] | None = None, attention: bool = False):
    """Context manager yielding a `Recording` of `modules` (default: every block) for each forward inside."""
    blocks = block_names(model)
    names = blocks if modules is None else [_name(m) for m in modules]
    found = _modules(model, names)
    rec = Recording(blocks)
    with ExitStack() as stack:
        for name, module in found.items():
            stack.callback(module.register_forward_hook(_recorder(rec, name), with_kwargs=True).remove)
        if attention:
            _check_unpatched([m for m in model.modules() if isinstance(m, Attention)])
            rec.attention = stack.enter_context(capture_attention(model))
        yield rec


@contextmanager
def patch(model: nn.Module, outputs: dict[str | int, Transform] | None = None,
          inputs: dict[str | int, Transform] | None = None, attention: dict[str | int, Transform] | None = None):
    """Context manager: inside it, module `name`'s output y becomes `outputs[name](y)` and its first
    input x becomes `inputs[name](x)` (the other arguments pass unchanged); the softmax weights w
    (B, H, T, S) of block `name`'s attention become `attention[name](w)` before they weigh the values."""
    outputs = {_name(k): f for k, f in (outputs or {}).items()}
    inputs = {_name(k): f for k, f in (inputs or {}).items()}
    found = _modules(model, [*outputs, *inputs])
    with ExitStack() as stack:
        for name, fn in outputs.items():
            hook = found[name].register_forward_hook(lambda m, args, y, fn=fn: fn(y))
            stack.callback(hook.remove)
        for name, fn in inputs.items():
            hook = found[name].register_forward_pre_hook(lambda m, args, fn=fn: (fn(args[0]), *args[1:]))
            stack.callback(hook.remove)
        for name, fn in (attention or {}).items():
            stack.enter_context(_patched_weights(_attention_of(model, _name(name)), fn))
        yield


def block_names(model: nn.Module) -> list[str]:
    """The names of a model's blocks: "layers.0", "layers.1", ... (an encoder-decoder: "enc_layers.0", ...,
    then "dec_layers.0", ...)."""
    stacks = [s for s in ("layers", "enc_layers", "dec_layers") if isinstance(getattr(model, s, None), nn.ModuleList)]
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no `layers` (a ModuleList of blocks): name the modules")
    return [f"{s}.{i}" for s in stacks for i in range(len(getattr(model, s)))]


def _attention_of(model: nn.Module, name: str) -> Attention:
    """The multi-head attention of block `name` (or the module `name` itself)."""
    module = _modules(model, [name])[name]
    attn = module if isinstance(module, Attention) else getattr(module, "attn", None)
    if not isinstance(attn, Attention):
        raise ValueError(f"{name!r} has no multi-head attention (tformer.nn.attention.Attention) whose weights "
                         "can be patched; latent attention (MLA) is not supported")
    return attn


def _check_unpatched(layers: list[Attention]) -> None:
    if any("core" in layer.__dict__ for layer in layers):
        raise ValueError("attention weights are already being recorded or patched: record(attention=True) and "
                         "patch(attention=...) do not nest")


@contextmanager
def _patched_weights(attn: Attention, fn: Transform):
    """`attn` computes softmax weights w by the reference formula and attends with fn(w)."""
    _check_unpatched([attn])

    def core(q, k, v, mask=None, dropout_p: float = 0.0):  # q (B,H,T,D), k/v (B,Hkv,S,D)
        _, weights = reference_attention(q, k, v, mask, 0.0, attn.scale)  # the layer's own scale (T5: 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)  # (B, H, S, D)
        return torch.nn.functional.dropout(fn(weights), dropout_p, training=dropout_p > 0).to(v.dtype) @ v

    attn.core = core
    try:
        yield
    finally:
        del attn.core


def _recorder(rec: Recording, name: str):
    def hook(module, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
        rec.inputs[name] = x.detach()
        rec.outputs[name] = output.detach()

    return hook


def _name(key: str | int) -> str:
    return f"layers.{key}" if isinstance(key, int) else key


def _modules(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """The modules of `names`; an unknown name raises with the blocks' names as a hint."""
    known = dict(model.named_modules())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"no module named {unknown[0]!r} in {type(model).__name__}; modules are named as in "
                       f"model.named_modules(), e.g. 'layers.0', 'layers.0.attn', 'layers.0.ffn', 'norm'")
    return {n: known[n] for n in names}
