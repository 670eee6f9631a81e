"""FlexAttention compiled on CUDA: every variant's forward and gradients equal SDPA with the dense
mask; changing lengths reuse block masks and compiled graphs; training with each block compiled
apart runs through flex. CUDA only (the CPU paths are in test_attention_variants.py)."""

import pytest
import torch

from tests.conftest import tiny_config
from tests.test_attention_variants import VARIANTS
from tformer.inference.flex import use_attention_backend, use_flex_attention
from tformer.models import build_model

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.filterwarnings("ignore:.*has no tokenizer.json")]


def _pair(name: str):
    """The same weights twice on CUDA (fp32): one through SDPA, one through compiled FlexAttention."""
    torch.manual_seed(0)
    config = tiny_config(**{**VARIANTS[name], "max_seq_len": 512, "dim": 96})  # head_dim 16: the CUDA kernels' least
    dense = build_model(config, device="cuda")
    flex = build_model(config, device="cuda")
    flex.load_state_dict(dense.state_dict())
    return dense, flex, use_flex_attention(flex, compile=True)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_compiled_flex_forward_and_backward_equal_sdpa(name):
    dense, flex, _ = _pair(name)
    tokens = torch.randint(0, 97, (2, 300), device="cuda")  # not a multiple of the 128-token block
    outs, grads = [], []
    for model in (dense, flex):
        logits = model(tokens)
        logits.float().square().mean().backward()
        outs.append(logits.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-3, atol=2e-3)
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=2e-2, atol=2e-4, msg=lambda m: f"{n}: {m}")


def test_changing_lengths_reuse_block_masks_and_graphs():
    _, flex, state = _pair("window")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    with torch.no_grad():
        for T in (200, 230, 250, 300, 330, 370, 500):
            flex(torch.randint(0, 97, (2, T), device="cuda"))
    assert state.builds <= 3, state.builds  # one per 128-token bucket: 256, 384, 512
    # lengths between buckets run at the bucket's (a block mask's lengths are guarded as constants): one graph
    # per bucket, and one more where torch first marks the length dynamic (H100, torch 2.11: 4)
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_training_compiled_through_flex(scope, tmp_path):
    from tformer.train.config import TrainConfig
    from tformer.train.loop import train

    attention = {**VARIANTS["local_global"]["attention"], "backend": "flex"}
    cfg = TrainConfig(model={"n_layers": 2, "dim": 64, "n_heads": 4, "attention": attention},
                      batch_size=4, seq_len=256, max_steps=30, warmup=5, lr=3e-3, device="cuda", compile=True,
                      compile_scope=scope, eval_every=30, eval_batches=2, log_every=10, out_dir=str(tmp_path / "run"),
                      cache_dir=str(tmp_path / "cache"), tensorboard=False, sample_tokens=0)
    result = train(cfg, progress=False)
    assert result.step == 30 and result.val_bpc < 8


def test_auto_backend_picks_flex_on_cuda_for_windows():
    model = build_model(tiny_config(**VARIANTS["window"], dim=96), device="cuda")
    assert use_attention_backend(model, "cuda") is not None
    small_heads = build_model(tiny_config(**VARIANTS["window"]), device="cuda")  # head_dim 8: SDPA
    assert use_attention_backend(small_heads, "cuda") is None
