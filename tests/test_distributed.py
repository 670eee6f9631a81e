"""DDP and FSDP2 on CPU (gloo, 2 processes): the loss curve of one process with the same global batch,
sharded checkpoints that resume on 2 ranks and on 1 (and a one-process checkpoint on 2), conversion to one
checkpoint, a rank killed mid-run, and the errors of a misused --parallel."""

import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.train.test_finetune import chat_records, write_jsonl
from tests.train.test_loop import TEXT
from tformer.checkpoint import load
from tformer.cli import main
from tformer.config import ConfigError
from tformer.train.config import TrainConfig
from tformer.train.loop import train
from tformer.train.state import checkpoint_dirs, latest_intact

STEPS = 4  # checkpoints at steps 2 and 4


def run_config(tmp: Path, name: str, **overrides) -> TrainConfig:
    base = dict(
        preset="tiny-llama", data=[str(tmp / "corpus.txt")], tokenizer="char", batch_size=4, seq_len=32,
        max_steps=STEPS, warmup=1, lr=1e-2, min_lr=1e-3, eval_every=2, eval_batches=2, log_every=1,
        out_dir=str(tmp / name), cache_dir=str(tmp / "cache"), tensorboard=False, sample_tokens=0, keep_last=0,
        seed=3, threads=1,
    )
    base.update(overrides)
    return TrainConfig(**base)


def sft_config(tmp: Path, name: str, **overrides) -> TrainConfig:
    """Full fine-tuning of run "one"'s checkpoint on chats, one a row: rows and ranks differ in trained targets."""
    return run_config(tmp, name, preset=str(tmp / "one" / "best"), data=[str(tmp / "chat.jsonl")], tokenizer="bpe",
                      seq_len=64, packing=False, eval_batches=0, val_fraction=0.2, **overrides)


def losses(out_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}
    return [by_step[s] for s in sorted(by_step)]


def resumable_copy(tmp: Path, source: str, name: str) -> None:
    """A copy of run `source` as if it had stopped after its step-2 checkpoint."""
    shutil.copytree(tmp / source, tmp / name, symlinks=True)
    shutil.rmtree(tmp / name / "checkpoints" / f"step-{STEPS:06d}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, tmp: Path, port: int) -> None:
    """Every 2-rank run of the tests, in one process group (each rank's batch is half the global 4 rows)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        train(run_config(tmp, "ddp", parallel="ddp", batch_size=2), progress=False)
        train(run_config(tmp, "fsdp", parallel="fsdp", batch_size=2), progress=False)
        if rank == 0:
            resumable_copy(tmp, "fsdp", "fsdp-resumed")
            resumable_copy(tmp, "one", "one-on-two")
        dist.barrier()
        train(run_config(tmp, "fsdp-resumed", parallel="fsdp", batch_size=2, resume=True), progress=False)
        train(run_config(tmp, "one-on-two", parallel="fsdp", batch_size=2, resume=True), progress=False)
        train(sft_config(tmp, "sft-ddp", parallel="ddp", batch_size=2), progress=False)
        train(run_config(tmp, "accum", parallel="fsdp", batch_size=1, grad_accum=2,
                         activation_checkpointing="selective", ac_every=2, fsdp_cpu_offload=True), progress=False)
        counts = {f"{mode} x{n}": _reductions(mode, rank, world, n) for mode in ("ddp", "fsdp") for n in (1, 3)}
        if rank == 0:
            (tmp / "reductions.json").write_text(json.dumps(counts))
        gc.collect()  # the DDP reducers and FSDP hooks of the runs above go before their process group
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _reductions(mode: str, rank: int, world: int, n_micro: int) -> int:
    """Gradient reductions (DDP bucket all-reduces, FSDP2 reduce-scatters) in one step of `n_micro` micro-batches."""
    from tests.conftest import tiny_config
    from tformer.models import build_model
    from tformer.train.loop import train_step
    from tformer.train.objectives import NextToken
    from tformer.train.parallel import Parallel, parallelize

    torch.manual_seed(0)
    model = build_model(tiny_config())
    parallel = Parallel(mode, rank, world)
    trained = parallelize(model, TrainConfig(parallel=mode), parallel, torch.device("cpu"))
    count = [0]
    if mode == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            count[0] += 1
            return allreduce_hook(state, bucket)

        trained.ddp.register_comm_hook(None, hook)
    reduce_scatter = dist.reduce_scatter_single

    def counted(*args, **kwargs):
        count[0] += 1
        return reduce_scatter(*args, **kwargs)

    dist.reduce_scatter_single = counted
    try:
        batches = [{"tokens": torch.randint(0, 97, (2, 16)), "targets": torch.randint(0, 97, (2, 16)),
                    "n_targets": 32} for _ in range(n_micro)]
        train_step(model, NextToken(trained), torch.optim.AdamW(model.parameters()), batches, 1.0, None, parallel,
                   trained)
    finally:
        dist.reduce_scatter_single = reduce_scatter
    return count[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One process (batch 4; batch 2 x 2 micro-batches), then the 2-rank runs of `_worker`."""
    tmp = tmp_path_factory.mktemp("dist")
    (tmp / "corpus.txt").write_text(TEXT * 40)
    train(run_config(tmp, "one"), progress=False)
    train(run_config(tmp, "one-accum", batch_size=2, grad_accum=2), progress=False)
    write_jsonl(tmp / "chat.jsonl", chat_records(30))
    train(sft_config(tmp, "sft-one"), progress=False)
    mp.spawn(_worker, args=(2, tmp, free_port()), nprocs=2)
    return tmp


def test_ddp_and_fsdp_follow_the_one_process_curve(runs):
    one = losses(runs / "one")
    assert len(one) == STEPS
    torch.testing.assert_close(losses(runs / "ddp"), one, rtol=1e-4, atol=0)
    torch.testing.assert_close(losses(runs / "fsdp"), one, rtol=1e-4, atol=0)
    # accumulation (gradients reduced on the last micro-batch), activation checkpointing of block 0, CPU offload
    torch.testing.assert_close(losses(runs / "accum"), losses(runs / "one-accum"), rtol=1e-4, atol=0)
    # fine-tuning: the mean over every trained target of the global batch, however the ranks' shares differ
    torch.testing.assert_close(losses(runs / "sft-ddp"), losses(runs / "sft-one"), rtol=1e-4, atol=0)


def test_gradients_are_reduced_once_a_step(runs):
    counts = json.loads((runs / "reductions.json").read_text())
    assert counts["ddp x1"] > 0 and counts["fsdp x1"] > 0
    assert counts["ddp x3"] == counts["ddp x1"] and counts["fsdp x3"] == counts["fsdp x1"], counts


def test_sharded_checkpoints_resume_on_two_ranks_and_on_one(runs):
    ckpt = runs / "fsdp" / "checkpoints" / "step-000002"
    assert (ckpt / ".metadata").is_file() and (ckpt / "sharded.json").is_file()
    assert not list((runs / "fsdp" / "checkpoints").glob(".*"))  # no temporary folders left
    fsdp = losses(runs / "fsdp")
    torch.testing.assert_close(losses(runs / "fsdp-resumed")[2:], fsdp[2:], rtol=1e-5, atol=0)
    resumable_copy(runs, "fsdp", "two-on-one")  # 2 ranks -> 1 process (batch 4)
    train(run_config(runs, "two-on-one", resume=True), progress=False)
    torch.testing.assert_close(losses(runs / "two-on-one")[2:], fsdp[2:], rtol=1e-4, atol=0)
    # 1 process -> 2 ranks: a one-process checkpoint resumed under FSDP2
    torch.testing.assert_close(losses(runs / "one-on-two")[2:], losses(runs / "one")[2:], rtol=1e-4, atol=0)


def test_sharded_checkpoint_converts_to_one_checkpoint(runs, tmp_path):
    out = tmp_path / "whole"
    assert main(["convert", str(runs / "fsdp" / "checkpoints" / f"step-{STEPS:06d}"), str(out), "--to", "tformer"]) == 0
    tokens = torch.randint(0, 60, (2, 16))
    with torch.no_grad():
        whole = load(out)(tokens)
        single = load(runs / "one" / "checkpoints" / f"step-{STEPS:06d}")(tokens)  # trained on one process
        gathered = load(runs / "fsdp" / "best")(tokens)  # gathered from the shards by the run itself
    torch.testing.assert_close(whole, single, rtol=1e-4, atol=1e-4)
    ddp = tmp_path / "ddp"  # DDP's checkpoints are DCP too, each tensor written once
    assert main(["convert", str(runs / "ddp" / "checkpoints" / f"step-{STEPS:06d}"), str(ddp), "--to", "tformer"]) == 0
    with torch.no_grad():
        torch.testing.assert_close(load(ddp)(tokens), single, rtol=1e-4, atol=1e-4)
    if (runs / "fsdp" / "best").resolve().name == f"step-{STEPS:06d}":
        torch.testing.assert_close(whole, gathered, rtol=0, atol=0)
    assert (out / "tokenizer.json").is_file()


def test_killed_rank_leaves_the_last_checkpoint_loadable(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT * 40)
    cfg = run_config(tmp_path, "run", max_steps=400, eval_every=1, eval_batches=1, keep_last=2)
    (tmp_path / "run.json").write_text(json.dumps({k: v for k, v in vars(cfg).items() if k != "model"}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    log = tmp_path / "torchrun.log"
    with log.open("w") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
             "-m", "tformer", "train", "--config", str(tmp_path / "run.json"), "--parallel", "fsdp",
             "--batch-size", "2"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while len(checkpoint_dirs(cfg.out_dir)) < 2 and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert launcher.poll() is None and len(checkpoint_dirs(cfg.out_dir)) >= 2, log.read_text()[-3000:]
        ranks = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
        os.kill(int(ranks[-1]), signal.SIGKILL)  # one rank dies, mid-step or mid-save
        assert launcher.wait(timeout=90) != 0, log.read_text()[-3000:]
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    point, skipped = latest_intact(cfg.out_dir)
    assert point is not None and point.sharded and not skipped, (skipped, log.read_text()[-3000:])
    assert main(["convert", str(point.path), str(tmp_path / "whole"), "--to", "tformer"]) == 0
    assert load(tmp_path / "whole").config.n_layers == 2


def test_parallel_needs_torchrun_and_valid_options(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text(TEXT)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        assert var not in os.environ
    code = main(["train", "--parallel", "ddp", "--data", str(tmp_path / "corpus.txt"), "--out-dir",
                 str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "torchrun --nproc-per-node" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="--parallel fsdp"):
        run_config(tmp_path, "x", fsdp_cpu_offload=True).validate()
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        run_config(tmp_path, "x", activation_checkpointing="some").validate()
    with pytest.raises(ConfigError, match="LoRA"):
        run_config(tmp_path, "x", parallel="ddp", method="lora").validate()


def test_activation_checkpointing_on_one_process_changes_nothing(runs):
    train(run_config(runs, "one-ac", activation_checkpointing="full"), progress=False)
    assert losses(runs / "one-ac") == losses(runs / "one")
    ckpt = load(runs / "one-ac" / "checkpoints" / f"step-{STEPS:06d}")  # the model's own keys
    assert not any("checkpoint" in name for name, _ in ckpt.named_parameters())


def test_a_truncated_shard_is_skipped_on_resume(runs, tmp_path):
    shutil.copytree(runs / "fsdp", tmp_path / "run", symlinks=True)
    shard = tmp_path / "run" / "checkpoints" / f"step-{STEPS:06d}" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    point, skipped = latest_intact(tmp_path / "run")
    assert point.path.name == "step-000002" and point.sharded
    why = "shard __1_0.distcp is missing or truncated"
    assert [(p.name, reason) for p, reason in skipped] == [(f"step-{STEPS:06d}", why)]
