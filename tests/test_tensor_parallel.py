"""Tensor parallelism on CPU (gloo, 2 processes): the loss curve of one process with the same batch for a
Llama-style model (GQA, SwiGLU, tied embeddings) and a GPT-2-style one (MHA, biases everywhere), alone and
under FSDP2 (2-D; a 2 x 2 mesh of 4 processes in the slow test), sharded checkpoints in the model's own
layout (converted, gathered, resumed on one process and from one), and the errors of a degree that does
not fit."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import tiny_config
from tests.test_distributed import STEPS, free_port, losses, resumable_copy, run_config
from tests.train.test_loop import TEXT
from tformer.checkpoint import load
from tformer.cli import main
from tformer.config import ConfigError
from tformer.models import build_model
from tformer.train.loop import train
from tformer.train.parallel import check_degrees
from tformer.train.tensor_parallel import check_tensor_parallel, qkv_rows

PRESETS = ("tiny-llama", "tiny-gpt2")


def _worker(rank: int, world: int, tmp, port: int) -> None:
    """Each preset on one process (batch 4), then split 2 ways (both ranks see the whole batch), a resume of
    run "one-tiny-llama"'s step-2 checkpoint under tensor parallelism, and degrees that do not fit."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        if rank == 0:  # the one-process runs, here rather than in the parent: one process pays the imports
            for preset in PRESETS:
                train(run_config(tmp, f"one-{preset}", preset=preset), progress=False)
            resumable_copy(tmp, "one-tiny-llama", "one-on-tp")
        dist.barrier()
        for preset in PRESETS:
            train(run_config(tmp, f"tp-{preset}", preset=preset, tensor_parallel=2), progress=False)
        train(run_config(tmp, "one-on-tp", preset="tiny-llama", tensor_parallel=2, resume=True), progress=False)
        # 2-D over a mesh of 1 x 2: FSDP2 on the tensor-parallel DTensors (a 2 x 2 mesh: test_two_d_mesh)
        train(run_config(tmp, "fsdp-tp", preset="tiny-llama", parallel="fsdp", tensor_parallel=2), progress=False)
        agree = _replicas_agree_under_dropout(world)
        errors = []
        for overrides in (dict(tensor_parallel=4), dict(tensor_parallel=2, parallel="ddp")):
            try:
                train(run_config(tmp, "refused", **overrides), progress=False)
            except ConfigError as e:
                errors.append(str(e))
        if rank == 0:
            (tmp / "errors.json").write_text(json.dumps({"errors": errors, "replicas agree": agree}))
    finally:
        dist.destroy_process_group()


def _replicas_agree_under_dropout(world: int) -> bool:
    """Whether the replicated weights stay equal on the tp ranks after 3 steps with every dropout on: their
    gradients are never reduced, so the ranks' dropout draws (same seed, same local shapes) must agree."""
    from torch.distributed.device_mesh import init_device_mesh

    from tformer.train.objectives import NextToken
    from tformer.train.tensor_parallel import parallelize_tensor

    torch.manual_seed(0)  # as the loop seeds each data-parallel replica: one seed for its tp ranks
    model = build_model(tiny_config(attn_dropout=0.3, resid_dropout=0.3, emb_dropout=0.3)).train()
    parallelize_tensor(model, init_device_mesh("cpu", (world,)))
    optimizer, objective = torch.optim.AdamW(model.parameters(), lr=1e-2), NextToken(model)
    assert objective.chunked_head  # the replicated output weight goes to the chunked cross-entropy
    for _ in range(3):
        tokens = torch.randint(0, 97, (2, 16))
        objective({"tokens": tokens, "targets": tokens})["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    local = torch.cat([model.tok_emb.weight.to_local().flatten(), model.norm.weight.to_local()])
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    return all(torch.equal(g, gathered[0]) for g in gathered)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    (tmp / "corpus.txt").write_text(TEXT * 40)
    mp.spawn(_worker, args=(2, tmp, free_port()), nprocs=2)
    return tmp


@pytest.mark.parametrize("preset", PRESETS)
def test_tensor_parallel_follows_the_one_process_curve(runs, preset):
    one = losses(runs / f"one-{preset}")
    assert len(one) == STEPS
    torch.testing.assert_close(losses(runs / f"tp-{preset}"), one, rtol=1e-4, atol=0)
    if preset == "tiny-llama":
        torch.testing.assert_close(losses(runs / "fsdp-tp"), one, rtol=1e-4, atol=0)


def _two_d_worker(rank: int, world: int, tmp, port: int) -> None:
    """4 ranks: 2 FSDP2 replicas (batch 2 each) x tensor parallel 2, then resumed from its step-2 checkpoint."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        if rank == 0:
            train(run_config(tmp, "one", preset="tiny-llama"), progress=False)
        dist.barrier()
        two_d = dict(preset="tiny-llama", parallel="fsdp", tensor_parallel=2, batch_size=2)
        train(run_config(tmp, "2d", **two_d), progress=False)
        if rank == 0:
            resumable_copy(tmp, "2d", "2d-resumed")
        dist.barrier()
        train(run_config(tmp, "2d-resumed", resume=True, **two_d), progress=False)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_d_mesh(tmp_path):
    """FSDP2 x tensor parallel on a 2 x 2 mesh: the curve of one process with the global batch of 4 rows."""
    (tmp_path / "corpus.txt").write_text(TEXT * 40)
    mp.spawn(_two_d_worker, args=(4, tmp_path, free_port()), nprocs=4)
    one = losses(tmp_path / "one")
    torch.testing.assert_close(losses(tmp_path / "2d"), one, rtol=1e-4, atol=0)
    torch.testing.assert_close(losses(tmp_path / "2d-resumed")[2:], one[2:], rtol=1e-4, atol=0)
    out, step = tmp_path / "whole", f"step-{STEPS:06d}"
    assert main(["convert", str(tmp_path / "2d" / "checkpoints" / step), str(out), "--to", "tformer"]) == 0
    tokens = torch.randint(0, 60, (2, 16))
    with torch.no_grad():
        single = load(tmp_path / "one" / "checkpoints" / step)(tokens)
        torch.testing.assert_close(load(out)(tokens), single, rtol=1e-4, atol=1e-4)


def test_replicated_weights_stay_equal_on_the_tp_ranks(runs):
    assert json.loads((runs / "errors.json").read_text())["replicas agree"]


def test_tensor_parallel_checkpoints_hold_the_model_layout(runs, tmp_path):
    step = f"step-{STEPS:06d}"
    tokens = torch.randint(0, 60, (2, 16))
    for preset in PRESETS:
        out = tmp_path / preset
        assert main(["convert", str(runs / f"tp-{preset}" / "checkpoints" / step), str(out), "--to", "tformer"]) == 0
        with torch.no_grad():
            single = load(runs / f"one-{preset}" / "checkpoints" / step)(tokens)
            torch.testing.assert_close(load(out)(tokens), single, rtol=1e-4, atol=1e-4)
            # best/: gathered whole from the two ranks by the run itself
            best = runs / f"tp-{preset}" / "best"
            reference = load(runs / f"one-{preset}" / "checkpoints" / best.resolve().name)(tokens)
            torch.testing.assert_close(load(best)(tokens), reference, rtol=1e-4, atol=1e-4)


def test_tensor_parallel_checkpoints_resume_on_one_process_and_from_one(runs):
    one = losses(runs / "one-tiny-llama")
    # a one-process checkpoint (weights and whole optimiser state) resumed split over 2 ranks
    torch.testing.assert_close(losses(runs / "one-on-tp")[2:], one[2:], rtol=1e-4, atol=0)
    resumable_copy(runs, "tp-tiny-llama", "tp-on-one")  # a sharded tensor-parallel checkpoint on one process
    train(run_config(runs, "tp-on-one", preset="tiny-llama", resume=True), progress=False)
    torch.testing.assert_close(losses(runs / "tp-on-one")[2:], one[2:], rtol=1e-4, atol=0)


def test_degrees_that_do_not_fit_are_refused(runs, tmp_path, capsys):
    errors = json.loads((runs / "errors.json").read_text())["errors"]
    assert "--tensor-parallel 4 must divide the number of ranks (2" in errors[0]
    assert "pass --parallel fsdp" in errors[1]
    with pytest.raises(ConfigError, match=r"leaves 2 model replicas: pass --parallel fsdp"):
        check_degrees("none", 2, 4)
    model = build_model(tiny_config(n_heads=6, n_kv_heads=2, ffn_dim=96))
    with pytest.raises(ConfigError, match=r"--tensor-parallel 4 must divide the model's n_heads=6"):
        check_tensor_parallel(model, 4)
    with pytest.raises(ConfigError, match=r"--tensor-parallel 3 must divide the model's n_kv_heads=2"):
        check_tensor_parallel(model, 3)
    with pytest.raises(ConfigError, match=r"layer 0 has MoE"):
        check_tensor_parallel(build_model(tiny_config(n_heads=4, moe={"n_experts": 2, "top_k": 1})), 2)
    with pytest.raises(ConfigError, match=r"tensor_parallel must be >= 1"):
        run_config(tmp_path, "x", tensor_parallel=0).validate()
    with pytest.raises(ConfigError, match=r"LoRA adapters .* drop --tensor-parallel 2"):
        run_config(tmp_path, "x", tensor_parallel=2, method="lora").validate()
    (tmp_path / "corpus.txt").write_text(TEXT)
    code = main(["train", "--tensor-parallel", "2", "--data", str(tmp_path / "corpus.txt"), "--out-dir",
                 str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "torchrun --nproc-per-node N -m tformer train --tensor-parallel 2" in err
    assert len(err.strip().splitlines()) == 1


def test_qkv_rows_give_each_rank_its_heads_q_k_and_v():
    # H=4, Hkv=2, D=1: rows q0 q1 q2 q3 | k0 k1 | v0 v1; rank 0 holds q0 q1 k0 v0, rank 1 q2 q3 k1 v1
    assert qkv_rows(4, 2, 1, 2).tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    assert sorted(qkv_rows(8, 2, 3, 2).tolist()) == list(range((8 + 2 * 2) * 3))
