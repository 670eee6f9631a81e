"""Tensor parallelism (Megatron-LM's split of attention and FFN) through DTensor, applied from outside the model.

    attention:  x (B,T,C) -> wqkv colwise -> this rank's H/tp query and Hkv/tp key/value heads
                -> attention over them -> (B,T,H/tp*D) -> wo rowwise -> all-reduce -> (B,T,C)
    FFN:        x -> w1 (and w3) colwise -> act (* up) -> (B,T,F/tp) -> w2 rowwise -> all-reduce -> (B,T,C)

Each block costs two all-reduces forward (after wo, after w2) and two backward (the gradients of the inputs
of wqkv and w1/w3). The tp ranks of a replica see the same batch. Every other parameter (embeddings,
norms, output head) becomes a replicated DTensor, whole on every rank, and its module computes on the
replicated activations (plain tensors in, plain tensors out), so all parameters are DTensors of one mesh,
as the optimiser's multi-tensor kernels and the gradient-norm clipping need; replicated gradients agree
without communication. The vocabulary is not sharded: that would need a vocabulary-parallel loss. The
next-token loss reads the output weight's local (whole) tensor into the chunked cross-entropy, so the
logits never exist whole there either.

The fused wqkv holds its rows as [q | k | v]; a contiguous shard of them would give rank 0 the first half
of q's rows. So its rows are first permuted to [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], where block r holds
query heads [r H/tp, (r+1) H/tp) and the key/value heads [r Hkv/tp, (r+1) Hkv/tp) they read (GQA groups
consecutive query heads), and each attention module gets its local head counts (instance attributes, as
torchtitan sets n_heads // tp). The permutation never leaves the process: `to_model_layout` and
`to_shard_layout` turn the model's and the optimiser's state dicts into the model's own layout and back,
so checkpoints load on one process, under DDP/FSDP2, or under another tensor-parallel degree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tformer.config import ConfigError


@dataclass
class TensorParallel:
    """What `parallelize_tensor` did to a model: its mesh and the row permutation of each fused wqkv
    parameter, by the parameter's state-dict name (permuted = natural[perm])."""
    mesh: object  # the DeviceMesh of the tp ranks
    rows: dict[str, tuple[nn.Module, str, torch.Tensor]] = field(default_factory=dict)  # name: (module, attr, perm)


def check_tensor_parallel(model: nn.Module, tp: int) -> None:
    """Refuse, naming the reason, a model that `parallelize_tensor` cannot split `tp` ways."""
    from tformer.nn.attention import Attention, CrossAttention
    from tformer.nn.mlp import FeedForward, GatedFeedForward

    c = model.config
    if not hasattr(model, "layers"):
        raise ConfigError(f"--tensor-parallel splits decoder blocks; {type(model).__name__} has none")
    if getattr(model, "alibi", None) is not None or getattr(model, "rel_bias", None) is not None:
        raise ConfigError("--tensor-parallel does not split ALiBi's or T5's per-head biases: train this model "
                          "with --parallel ddp|fsdp alone")
    if c.attention.approx != "none":
        raise ConfigError(f"--tensor-parallel does not split attention.approx={c.attention.approx!r}: train "
                          "this model with --parallel ddp|fsdp alone")
    for name, size in (("n_heads", c.n_heads), ("n_kv_heads", c.n_kv_heads), ("ffn_dim", c.ffn_dim)):
        if size % tp:
            raise ConfigError(f"--tensor-parallel {tp} must divide the model's {name}={size}: each rank takes "
                              f"{name}/{tp} of them; pick a degree that divides n_heads, n_kv_heads and ffn_dim")
    for i, block in enumerate(model.layers):
        attn, ffn = getattr(block, "attn", block), getattr(block, "ffn", block)
        if type(attn) is CrossAttention or not isinstance(attn, Attention) or not hasattr(attn, "wqkv"):
            raise ConfigError(f"--tensor-parallel splits multi-head attention with a fused wqkv; layer {i} has "
                              f"{type(attn).__name__}: train this model with --parallel ddp|fsdp alone")
        if type(ffn) not in (FeedForward, GatedFeedForward):
            raise ConfigError(f"--tensor-parallel splits dense feed-forward layers; layer {i} has "
                              f"{type(ffn).__name__}: train this model with --parallel ddp|fsdp alone")


def qkv_rows(n_heads: int, n_kv_heads: int, head_dim: int, tp: int) -> torch.Tensor:
    """The row order of a wqkv whose contiguous tp-way shards each hold one rank's heads:
    [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] as indices into [q | k | v] (rows = ((H + 2 Hkv) D,))."""
    q, kv = n_heads * head_dim, n_kv_heads * head_dim
    qs, kvs = q // tp, kv // tp
    ranges = []
    for r in range(tp):
        ranges += [torch.arange(r * qs, (r + 1) * qs), torch.arange(q + r * kvs, q + (r + 1) * kvs),
                   torch.arange(q + kv + r * kvs, q + kv + (r + 1) * kvs)]
    return torch.cat(ranges)


def parallelize_tensor(model: nn.Module, mesh) -> TensorParallel:
    """Split every block's attention and FFN over `mesh` (1-D, the tp ranks) and replicate the other
    parameters, in place; sets and returns `model.tensor_parallel`. Apply before activation
    checkpointing and FSDP2 (torchtitan's order)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = mesh.size()
    check_tensor_parallel(model, tp)
    layout = TensorParallel(mesh)
    for i, block in enumerate(model.layers):
        attn = block.attn
        perm = qkv_rows(attn.n_heads, attn.n_kv_heads, attn.head_dim, tp).to(attn.wqkv.weight.device)
        with torch.no_grad():
            for attr in ("weight", "bias"):
                param = getattr(attn.wqkv, attr)
                if param is not None:
                    param.copy_(param[perm])
                    layout.rows[f"layers.{i}.attn.wqkv.{attr}"] = (attn.wqkv, attr, perm)
        plan = {"attn.wqkv": ColwiseParallel(), "attn.wo": RowwiseParallel(),
                "ffn.w1": ColwiseParallel(), "ffn.w2": RowwiseParallel()}
        if hasattr(block.ffn, "w3"):
            plan["ffn.w3"] = ColwiseParallel()
        parallelize_module(block, mesh, plan)
        attn.n_heads, attn.n_kv_heads = attn.n_heads // tp, attn.n_kv_heads // tp
        attn.split_sizes = [size // tp for size in attn.split_sizes]
    replicas: dict[int, nn.Parameter] = {}  # one replicated DTensor per parameter: tied weights stay tied
    for module in model.modules():
        _replicate(module, mesh, replicas)
    model.tensor_parallel = layout
    return layout


def _replicate(module: nn.Module, mesh, replicas: dict) -> None:
    """Make `module`'s own plain parameters replicated DTensors; its forward then takes and gives plain tensors."""
    from torch.distributed.tensor import DTensor, Replicate

    plain = [(n, p) for n, p in module.named_parameters(recurse=False) if not isinstance(p, DTensor)]
    if not plain:
        return
    for name, p in plain:
        if id(p) not in replicas:
            local = DTensor.from_local(p.data, mesh, [Replicate()], run_check=False)
            replicas[id(p)] = nn.Parameter(local, requires_grad=p.requires_grad)
        module.register_parameter(name, replicas[id(p)])

    def inputs(_, args):
        return tuple(DTensor.from_local(a, mesh, [Replicate()], run_check=False)
                     if isinstance(a, torch.Tensor) and not isinstance(a, DTensor) else a for a in args)

    module.register_forward_pre_hook(inputs)
    module.register_forward_hook(lambda _, args, out: out.to_local() if isinstance(out, DTensor) else out)


def _layout(model) -> TensorParallel | None:
    return getattr(model, "tensor_parallel", None)


def to_model_layout(model, model_sd: dict, optim_sd: dict | None = None) -> None:
    """Replace, in place, each permuted wqkv tensor of `model_sd` and `optim_sd` (DTensor shards, or whole
    tensors of a full state dict) with the whole tensor in the model's own row order, a plain tensor.
    Collective for DTensors; a no-op for a model without tensor parallelism."""
    from torch.distributed.tensor import DTensor

    layout = _layout(model)
    if layout is None:
        return
    for name, (_, _, perm) in layout.rows.items():
        for holder, key in _entries(model_sd, optim_sd, name):
            t = holder[key]
            whole = t.full_tensor() if isinstance(t, DTensor) else t
            natural = torch.empty_like(whole)
            natural[perm.to(whole.device)] = whole
            holder[key] = natural


def to_shard_layout(model, model_sd: dict, optim_sd: dict | None = None, whole: bool = False) -> None:
    """The inverse of `to_model_layout`: each wqkv tensor of `model_sd` / `optim_sd`, whole in the model's
    row order, becomes this rank's shard of the permuted tensor, a DTensor placed as the parameter is
    (or with `whole`, the whole permuted tensor, for state-dict loaders that shard it themselves)."""
    from torch.distributed.tensor import distribute_tensor

    layout = _layout(model)
    if layout is None:
        return
    for name, (module, attr, perm) in layout.rows.items():
        param = getattr(module, attr)
        for holder, key in _entries(model_sd, optim_sd, name):
            permuted = holder[key][perm.to(holder[key].device)]
            holder[key] = permuted if whole else distribute_tensor(
                permuted.to(param.device_mesh.device_type), param.device_mesh, param.placements, src_data_rank=None)


def _entries(model_sd: dict, optim_sd: dict | None, name: str) -> list[tuple[dict, str]]:
    """(dict, key) of every tensor that parameter `name` has in the model and optimiser state dicts.
    The optimiser's per-parameter dict is replaced by a copy: an optimiser's state_dict() shares them
    with its live state, which must keep its DTensors."""
    out = [(model_sd, name)] if name in model_sd else []
    states = (optim_sd or {}).get("state", {})
    if name not in states:
        return out
    state = states[name] = dict(states[name])
    return out + [(state, k) for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0]
