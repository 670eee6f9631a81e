"""Parallelism applied from outside the model: DDP or FSDP2 under torchrun, tensor parallelism (1-D or
2-D with FSDP2), activation checkpointing.

    torchrun --nproc-per-node N -m tformer train --parallel ddp|fsdp ...
    torchrun --nproc-per-node N -m tformer train --tensor-parallel N ...               (tensor parallel alone)
    torchrun --nproc-per-node N -m tformer train --parallel fsdp --tensor-parallel K  (FSDP2 over N/K x TP K)

torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) starts the process group:
NCCL on CUDA (rank r on cuda:LOCAL_RANK), gloo on CPU. The model is built whole on every rank from
the same seed, then changed in torchtitan's order: tensor parallelism (train/tensor_parallel.py, over
the mesh's "tp" dimension) -> activation checkpointing -> FSDP2 (`fully_shard` on each block, then the
root, over the "dp" dimension) or DDP. The model code knows nothing of it.

Each data-parallel rank trains on its slice of the global batch (train/data.py: rank r takes rows
[r*B, (r+1)*B) of the batch one process with batch_size B*N would draw), so N ranks of batch_size B follow
the same loss curve as one process of batch_size B*N; the tp ranks of one replica share its slice. Gradients
are reduced once per optimiser step: DDP's `no_sync` / FSDP2's `set_requires_gradient_sync(False)` on the
micro-steps before the last.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from tformer.config import ConfigError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Parallel:
    """The run's place among the ranks; `mode` "none" is one process (rank 0 of 1), "tp" tensor
    parallelism alone. `rank` and `world` count data-parallel replicas (what share of each batch a
    rank takes); the `tp` ranks of a replica (`tp_rank` 0..tp-1) hold shards of one model."""
    mode: str = "none"
    rank: int = 0
    world: int = 1
    owns_group: bool = False  # the process group was started here, and is destroyed by `close`
    tp: int = 1
    tp_rank: int = 0
    mesh: object = None  # the ("dp", "tp") DeviceMesh under tensor parallelism

    @property
    def main(self) -> bool:
        return self.rank == 0 and self.tp_rank == 0

    @property
    def distributed(self) -> bool:
        return self.mode != "none"

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @contextmanager
    def main_first(self):
        """Run the body on rank 0, then on the others (caches, out_dir clean-up written once)."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def all_sum(self, values: list[float] | torch.Tensor) -> torch.Tensor:
        """The element-wise sum over data-parallel ranks (float64 on CPU; gloo reduces CPU tensors on any
        backend); the tp ranks of a replica hold the same values and count once."""
        t = torch.as_tensor(values, dtype=torch.float64).clone()
        if self.distributed:
            t = t.to(_collective_device())
            dist.all_reduce(t, group=self.mesh["dp"].get_group() if self.mesh is not None else None)
        return t.cpu()

    def all_max(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.distributed:
            t = t.to(_collective_device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.cpu().tolist()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def init_parallel(cfg) -> tuple[Parallel, torch.device]:
    """The run's Parallel and device; under --parallel or --tensor-parallel, the process group from
    torchrun's environment (and with tensor parallelism the ("dp", "tp") device mesh)."""
    from tformer.train.loop import resolve_device

    tp = cfg.tensor_parallel
    if cfg.parallel == "none" and tp == 1:
        return Parallel(), resolve_device(cfg.device)
    flag = f"--parallel {cfg.parallel}" if tp == 1 else f"--tensor-parallel {tp}"
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing and not dist.is_initialized():
        raise ConfigError(f"{flag} runs one process per device under torchrun, which sets "
                          f"{', '.join(missing)}: launch with `torchrun --nproc-per-node N -m tformer train "
                          f"{flag} ...`")
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ["WORLD_SIZE"])
    check_degrees(cfg.parallel, tp, world)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if tp == 1:
        return Parallel(cfg.parallel, dist.get_rank(), world, owns), device
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    mode = "tp" if cfg.parallel == "none" else cfg.parallel
    return Parallel(mode, mesh["dp"].get_local_rank(), world // tp, owns, tp, mesh["tp"].get_local_rank(), mesh), device


def check_degrees(parallel: str, tp: int, world: int) -> None:
    """Refuse a tensor-parallel degree that does not fit `world` ranks and the data parallelism."""
    if tp == 1:
        return
    if world % tp:
        raise ConfigError(f"--tensor-parallel {tp} must divide the number of ranks ({world}, torchrun's "
                          f"--nproc-per-node x nodes): each model replica spans {tp} ranks")
    if parallel == "ddp":
        raise ConfigError("--tensor-parallel combines with --parallel fsdp (2-D: FSDP2 across replicas, tensor "
                          "parallel within each), not ddp: pass --parallel fsdp")
    if parallel == "none" and world != tp:
        raise ConfigError(f"--tensor-parallel {tp} on {world} ranks leaves {world // tp} model replicas: pass "
                          f"--parallel fsdp to train them data-parallel, or launch {tp} ranks")


class _Entry(nn.Module):
    """What DDP wraps: forward(method, *args) calls the model's `method`, so the objective's
    `model.features(...)` runs through DDP's forward (which arms its gradient hooks)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, method: str, *args, **kwargs):
        return getattr(self.model, method)(*args, **kwargs)


class Replicated:
    """A DDP-wrapped model as the objective sees it: calls and `features` go through DDP; every
    other attribute (output, config, ...) is the model's."""

    def __init__(self, model: nn.Module, device: torch.device):
        from torch.nn.parallel import DistributedDataParallel

        from tformer.nn.moe import moe_layers

        self.module = model
        # an expert that no token of a rank's batch chose gets no gradient there
        self.ddp = DistributedDataParallel(_Entry(model), device_ids=[device] if device.type == "cuda" else None,
                                           find_unused_parameters=bool(moe_layers(model)))

    def __call__(self, *args, **kwargs):
        return self.ddp("forward", *args, **kwargs)

    def features(self, *args, **kwargs):
        return self.ddp("features", *args, **kwargs)

    def __getattr__(self, name: str):
        if name == "module":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.module, name)


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int) -> None:
    """Recompute blocks in backward instead of keeping their activations: all of them ("full") or
    every `every`-th ("selective"). The blocks are wrapped in place; state-dict keys do not change."""
    if mode == "none":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.layers):
        if mode == "full" or i % every == 0:
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=True)


def shard(model: nn.Module, device: torch.device, dtype: str, cpu_offload: bool, mesh=None) -> None:
    """FSDP2 over `mesh` (None: every rank): each block its own all-gather group, then the root
    (embeddings, final norm, head).
    On CUDA with bf16 (dtype auto or bfloat16) the blocks compute in bf16 and reduce in fp32;
    on CPU everything stays fp32."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    from torch.distributed.fsdp import register_fsdp_forward_method

    kwargs = {"mesh": mesh} if mesh is not None else {}
    if device.type == "cuda" and dtype in ("auto", "bfloat16"):
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    for i, block in enumerate(model.layers):
        # the last block's parameters are gathered again at once for backward: keep them
        fully_shard(block, reshard_after_forward=i < len(model.layers) - 1, **kwargs)
    fully_shard(model, **kwargs)
    register_fsdp_forward_method(model, "features")  # the objectives call features(), then the head


def parallelize(model: nn.Module, cfg, parallel: Parallel, device: torch.device):
    """Tensor parallelism, checkpointing and DDP/FSDP2 applied to `model`, in that order; returns what
    the objective calls (a `Replicated` under DDP, else the model itself, changed in place)."""
    from tformer.train.tensor_parallel import parallelize_tensor

    if parallel.tp > 1:
        parallelize_tensor(model, parallel.mesh["tp"])
    apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.ac_every)
    if parallel.mode == "ddp":
        return Replicated(model, device)
    if parallel.mode == "fsdp":
        shard(model, device, cfg.dtype, cfg.fsdp_cpu_offload, parallel.mesh["dp"] if parallel.tp > 1 else None)
        if parallel.tp > 1:  # features() ends in DTensor.to_local(), a view; nothing changes it in place
            warnings.filterwarnings("ignore", r"FSDP2-wrapped module .* returned a view tensor", UserWarning)
    return model


def uses_fsdp_precision(cfg, device: torch.device) -> bool:
    """FSDP2's bf16 policy casts the parameters itself, so no autocast runs around it."""
    return cfg.parallel == "fsdp" and device.type == "cuda" and cfg.dtype in ("auto", "bfloat16")


def gradient_sync(trained, sync: bool):
    """The context of one micro-step's forward and backward: gradients are reduced across ranks
    only when `sync` (the step's last micro-batch)."""
    if isinstance(trained, Replicated):
        return nullcontext() if sync else trained.ddp.no_sync()
    if hasattr(trained, "set_requires_gradient_sync"):  # an FSDP2 module
        trained.set_requires_gradient_sync(sync)
    return nullcontext()


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ over sharded (DTensor) gradients too: the gradients are grouped by device
    mesh (plain tensors, FSDP2's, tensor parallelism's, which no foreach kernel mixes), each group's norm
    is made whole, and the total clips every group. Returns the total norm before clipping."""
    from torch.distributed.tensor import DTensor

    groups: dict = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
    return norm
