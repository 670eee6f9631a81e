"""A training step queues its GPU work without waiting for it: no host synchronisation from the batch
to the optimiser step (so the next batch is built on the host while the GPU runs this one). CUDA only."""

import pytest
import torch

from tests.conftest import tiny_config
from tformer.data import Batcher
from tformer.models import build_model
from tformer.train.loop import train_step
from tformer.train.objectives import NextToken
from tformer.train.optim import make_optimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("states", ["float32", "bfloat16"])
def test_train_step_has_no_host_sync(states):
    device = torch.device("cuda")
    model = build_model(tiny_config(), device=device)
    objective = NextToken(model)
    optimizer = make_optimizer(model, 1e-3, 0.1, state_dtype=getattr(torch, states))
    batcher = Batcher(torch.randint(0, 64, (10_000,)).numpy(), 4, 32, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)

    def step(i):
        x, y = batcher.get(i)
        return train_step(model, objective, optimizer, [{"tokens": x, "targets": y, "n_targets": y.numel()}],
                          grad_clip=1.0, autocast=autocast)

    step(0)  # first step: optimiser states and the caching allocators are set up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = [step(i) for i in range(1, 4)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(stats[-1]["loss"])
