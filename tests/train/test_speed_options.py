"""Single-device speed options: AdamW with bf16 moments, regional compilation's objective, recipes."""

import pytest
import torch

from tests.train.test_loop import corpus, small_run, train_losses  # noqa: F401 (fixture)
from tformer.fields import ConfigError
from tformer.train.loop import train
from tformer.train.optim import AdamWLowPrecisionStates
from tformer.train.recipes import RECIPES, recipe_config


def _steps(optimizer, param, grads):
    for g in grads:
        param.grad = g.clone()
        optimizer.step()


def test_low_precision_adamw_is_torch_adamw_with_fp32_states_and_close_with_bf16():
    torch.manual_seed(0)
    start = torch.randn(64, 32)
    grads = [torch.randn(64, 32) for _ in range(25)]
    params = [torch.nn.Parameter(start.clone()) for _ in range(3)]
    kwargs = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    _steps(torch.optim.AdamW([params[0]], **kwargs), params[0], grads)
    _steps(AdamWLowPrecisionStates([params[1]], state_dtype=torch.float32, **kwargs), params[1], grads)
    bf16 = AdamWLowPrecisionStates([params[2]], **kwargs)
    _steps(bf16, params[2], grads)
    assert torch.equal(params[0], params[1])
    assert bf16.state[params[2]]["exp_avg"].dtype == torch.bfloat16
    moved = (params[0] - start).abs().mean()
    assert (params[0] - params[2]).abs().mean() < 0.02 * moved
    torch.optim.AdamW([params[0]], **kwargs).load_state_dict(bf16.state_dict())  # torch's layout


def test_training_with_bf16_optimizer_states_learns(corpus, tmp_path):  # noqa: F811
    train(small_run(corpus, tmp_path, optimizer_states="bfloat16", max_steps=12, eval_every=12), progress=False)
    losses = train_losses(tmp_path / "run")
    assert losses[12] < losses[1]


def test_recipe_values_are_defaults_that_flags_override(tmp_path):
    from tformer.cli import build_parser
    from tformer.cli.train import make_config

    args = build_parser().parse_args(["train", "--recipe", "shakespeare-gpu", "--lr", "1e-3"])
    cfg = make_config(args)
    recipe = RECIPES["shakespeare-gpu"][1]
    assert cfg.lr == 1e-3 and cfg.batch_size == recipe["batch_size"] and cfg.preset == "shakespeare-gpu"
    assert recipe_config("shakespeare-gpu", max_time=5.0).max_time == 5.0
    with pytest.raises(ConfigError, match="unknown recipe"):
        recipe_config("shakespeare-tpu")


def test_low_precision_adamw_in_chunks_equals_one_update():
    torch.manual_seed(1)
    shapes = [(40, 30), (7,), (100, 3), (5, 5)]
    starts = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(5)]
    results = []
    for chunk in (1 << 26, 100):  # every tensor together; runs of <= 100 elements (a larger tensor alone)
        params = [torch.nn.Parameter(x.clone()) for x in starts]
        opt = AdamWLowPrecisionStates(params, lr=1e-2, weight_decay=0.1)
        opt.chunk_numel = chunk
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        results.append(params)
    assert len(AdamWLowPrecisionStates(results[1], lr=1e-2)._chunks(results[1])) == 1
    opt.chunk_numel = 100
    assert [len(c) for c in opt._chunks(results[1])] == [1, 1, 1, 1]
    assert all(torch.equal(a, b) for a, b in zip(*results))
