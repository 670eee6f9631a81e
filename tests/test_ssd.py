"""Mamba-2 SSD mixers (tformer.nn.ssd) and hybrid decoders: the chunked form against a token-by-token
reference written here, cached decoding against the full forward, padding and packing, the engine,
training, checkpoints, accounting and config errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tformer.config import ConfigError, ModelConfig
from tformer.models.blocks import Block, SSDBlock
from tformer.models.build import build_model
from tformer.nn.ssd import SSD, ssd_chunked

SSD_FIELDS = dict(state_dim=8, head_dim=8, expand=2, n_groups=2, conv_width=4, chunk=4)


def hybrid(layers=(1, 3), **changes) -> ModelConfig:
    fields = dict(vocab_size=61, dim=32, n_layers=4, n_heads=4, max_seq_len=64, norm="rmsnorm",
                  activation="swiglu", positions="rope", tie_embeddings=False,
                  ssd=dict(SSD_FIELDS, layers=None if layers is None else list(layers)))
    return ModelConfig(**{**fields, **changes})


def model_of(config: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(config).eval()


# -- the reference: the recurrence one token at a time, independent of the chunked code ----------------

def recurrence(x, dt, A, b, c, h0=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t b_t^T, y_t = h_t c_t; x (B,T,H,P), dt (B,T,H), b/c (B,T,H,N)."""
    Bsz, T, H, P = x.shape
    h = torch.zeros(Bsz, H, P, b.shape[-1], dtype=torch.float64) if h0 is None else h0.double()
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t].double() * A.double())  # (B, H)
        h = decay[..., None, None] * h + (dt[:, t, :, None].double() * x[:, t].double())[..., None] \
            * b[:, t, :, None, :].double()
        ys.append(torch.einsum("bhpn,bhn->bhp", h, c[:, t].double()))
    return torch.stack(ys, 1), h


def reference_mixer(m: SSD, x: torch.Tensor) -> torch.Tensor:
    """The whole mixer for one sequence a row, token by token (fp64): conv, gates, recurrence, norm."""
    H, P, G, N, W = m.n_heads, m.head_dim, m.n_groups, m.state_dim, m.conv_width
    x = x.double()
    z, xbc, dt = (x @ m.w_in.weight.double().T).split([m.inner, m.conv_dim, H], dim=-1)
    w, bias = m.conv.weight.double()[:, 0], m.conv.bias.double()  # (K, W)
    conv = torch.stack([sum(w[:, k] * xbc[:, t - (W - 1) + k] for k in range(W) if t - (W - 1) + k >= 0) + bias
                        for t in range(x.shape[1])], 1)
    xs, b, c = F.silu(conv).split([m.inner, G * N, G * N], dim=-1)
    xs = xs.unflatten(-1, (H, P))
    b, c = (t.unflatten(-1, (G, N)).repeat_interleave(H // G, dim=2) for t in (b, c))
    dt = F.softplus(dt + m.dt_bias.double())
    y, _ = recurrence(xs, dt, -torch.exp(m.A_log.double()), b, c)
    y = (y + xs * m.D.double()[:, None]).flatten(-2) * F.silu(z)
    g = y.unflatten(-1, (G, -1))
    y = (g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + m.norm.eps)).flatten(-2) * m.norm.weight.double()
    return y @ m.wo.weight.double().T


def random_scan_inputs(Bsz=2, T=11, H=4, G=2, P=3, N=5, seed=0):
    """x, dt, A, and b, c in G groups (B, T, G, N)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(Bsz, T, H, P, generator=g)
    b, c = (torch.randn(Bsz, T, G, N, generator=g) for _ in range(2))
    dt = F.softplus(torch.randn(Bsz, T, H, generator=g))
    A = -torch.rand(H, generator=g) * 2 - 0.1
    return x, dt, A, b, c


def per_head(t, H=4):
    return t.repeat_interleave(H // t.shape[2], dim=2)  # (B, T, G, N) -> (B, T, H, N)


@pytest.mark.parametrize("chunk", [1, 3, 4, 16])
def test_chunked_equals_the_recurrence(chunk):
    """T = 11 is no multiple of 3 or 4; chunk 16 > T is one chunk; an initial state carries in."""
    x, dt, A, b, c = random_scan_inputs()
    h0 = torch.randn(2, 4, 3, 5)
    y, h = ssd_chunked(x, dt, A, b, c, chunk, h0)
    y_ref, h_ref = recurrence(x, dt, A, per_head(b), per_head(c), h0)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h.double(), h_ref, atol=1e-4, rtol=1e-4)


def test_chunked_restarts_at_sequence_starts():
    """A start at token 5 of row 0: its tokens from 5 on equal the recurrence from a zero state."""
    x, dt, A, b, c = random_scan_inputs()
    starts = torch.zeros(2, 11, dtype=torch.bool)
    starts[0, 5] = True
    y, h = ssd_chunked(x, dt, A, b, c, 4, starts=starts)
    b, c = per_head(b), per_head(c)
    y_ref, h_ref = recurrence(x[:1, 5:], dt[:1, 5:], A, b[:1, 5:], c[:1, 5:])
    torch.testing.assert_close(y[:1, 5:].double(), y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h[:1].double(), h_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y[1:].double(), recurrence(x[1:], dt[1:], A, b[1:], c[1:])[0], atol=1e-4, rtol=1e-4)


def test_mixer_equals_the_token_by_token_reference():
    model = model_of(hybrid(layers=None, ssd=dict(SSD_FIELDS, chunk=3)))
    mixer = model.layers[0].mixer
    x = torch.randn(2, 10, 32)
    torch.testing.assert_close(mixer(x).double(), reference_mixer(mixer, x), atol=1e-4, rtol=1e-4)


def test_gradients_are_finite_through_starts():
    """Starts enter as -inf log-decays: no NaN in the forward or backward."""
    model = model_of(hybrid()).train()
    tokens = torch.randint(0, 61, (2, 12))
    segments = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    model(tokens, segments=segments).float().pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_the_scan_runs_without_autocast():
    """Under bf16 autocast the scan still runs in fp32 (its decays are exps of summed log-decays)."""
    mixer = model_of(hybrid(layers=None)).layers[0].mixer
    seen = []

    def scan(*args):  # an instance override, the seam a fused scan would use
        seen.append(torch.is_autocast_enabled("cpu"))
        y, h = SSD.scan(mixer, *args)
        seen.append(y.dtype)
        return y, h

    mixer.scan = scan
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixer(torch.randn(1, 9, 32))
    assert seen == [False, torch.float32]


# -- hybrid decoders ------------------------------------------------------------------------------

def test_blocks_follow_the_schedule():
    model = model_of(hybrid(layers=(1, 3)))
    assert [type(layer) for layer in model.layers] == [Block, SSDBlock, Block, SSDBlock]


def test_cached_decoding_equals_the_full_forward():
    """Prefill 6 tokens, then 3 more at once (a cache carried into a chunked forward), then one by one."""
    model = model_of(hybrid())
    tokens = torch.randint(0, 61, (2, 16))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(2, 32)
        parts = [model(tokens[:, :6], input_pos=torch.arange(6)),
                 model(tokens[:, 6:9], input_pos=torch.arange(6, 9))]
        parts += [model(tokens[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(9, 16)]
        model.clear_caches()
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)


def test_left_padding_and_packing_give_each_sequence_its_own_logits():
    model = model_of(hybrid())
    a, b = torch.randint(0, 61, (1, 5)), torch.randint(0, 61, (1, 8))
    with torch.no_grad():
        alone_a, alone_b = model(a), model(b)
        padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), a), 1)
        mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
        torch.testing.assert_close(model(padded, attention_mask=mask)[:, 3:], alone_a, atol=1e-4, rtol=1e-4)
        packed = model(torch.cat((a, b), 1), segments=torch.tensor([[0] * 5 + [1] * 8]))
    torch.testing.assert_close(packed[:, :5], alone_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed[:, 5:], alone_b, atol=1e-4, rtol=1e-4)


def argmax_loop(model, prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


def test_engine_generate_equals_a_cache_free_argmax_loop():
    """Prompts of different lengths (left padded), and a second request on the engine's reused caches."""
    from tformer.inference.engine import DecodeEngine
    from tformer.inference.sampling import SamplingConfig

    model, greedy = model_of(hybrid()), SamplingConfig(temperature=0.0)
    prompts = [[3, 14, 15, 9, 2, 6], [5, 35]]
    others = [[8, 9, 7, 9, 3, 2], [38, 4]]
    with DecodeEngine(model, max_batch_size=2, kernels=False) as engine:
        first = engine.generate(prompts, max_new_tokens=5, sampling=greedy)
        second = engine.generate(others, max_new_tokens=5, sampling=greedy)
    assert first == [argmax_loop(model, p, 5) for p in prompts]
    assert second == [argmax_loop(model, p, 5) for p in others]


def test_decode_step_compiles_without_graph_breaks():
    from tformer.inference.sampling import SamplingConfig
    from tformer.inference.steps import decode_step

    model = model_of(hybrid())
    step = torch.compile(decode_step, backend="eager", fullgraph=True)
    model.setup_caches(1, 16)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), input_pos=torch.arange(3), attention_mask=torch.ones(1, 16, dtype=torch.long))
        step(model, torch.tensor([[4]]), torch.tensor([3]), torch.ones(1, 16, dtype=torch.long), SamplingConfig())
    model.clear_caches()


def test_beam_search_with_one_beam_is_greedy():
    from tformer.inference.beam import beam_search

    model = model_of(hybrid())
    prompts = [[3, 14, 15, 9], [5, 35]]
    result = beam_search(model, prompts, max_new_tokens=5, beams=1, eos_ids=set())
    assert [r[0] for r in result.sequences] == [argmax_loop(model, p, 5) for p in prompts]


def test_decode_kernels_leave_ssd_layers_to_their_modules():
    """The class swap fuses the attention blocks only; an SSD block and its mixer keep their classes
    (its Linear layers become matvec Linears, which fall back to nn.Linear off the GPU)."""
    from tformer.inference.fused import with_decode_kernels, without_decode_kernels
    from tformer.inference.workspace import Workspace

    model = model_of(hybrid())
    tokens = torch.randint(0, 61, (1, 7))
    with torch.no_grad():
        plain = model(tokens)
        with_decode_kernels(model, Workspace(torch.device("cpu"), 1, 4, False))
        assert [type(layer).__name__ for layer in model.layers] == ["FusedBlock", "SSDBlock"] * 2
        assert type(model.layers[1].mixer) is SSD
        torch.testing.assert_close(model(tokens), plain)
        without_decode_kernels(model)


def test_serving_and_speculative_decoding_refuse_ssd_models():
    from tformer.inference.speculative import speculative_generate
    from tformer.serve.engine import ServeEngine

    model = model_of(hybrid())
    with pytest.raises(ValueError, match="SSD"):
        ServeEngine(model)
    with pytest.raises(ValueError, match="SSD"):
        speculative_generate(model, model_of(hybrid(), seed=1), [1, 2, 3], max_new_tokens=4)


@pytest.mark.filterwarnings("ignore:.*tokenizer")
def test_checkpoint_round_trip(tmp_path):
    from tformer.checkpoint import load, save

    model = model_of(hybrid())
    save(model, tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt")
    assert loaded.config == model.config
    tokens = torch.randint(0, 61, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens))


def test_params_counts_every_ssd_parameter(tmp_path, capsys):
    from tformer.accounting import accounting, parameter_breakdown
    from tformer.cli import main

    config = hybrid()
    counts = parameter_breakdown(config)
    model = build_model(config, device="meta")
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    ssd = sum(p.numel() for n, p in model.named_parameters() if ".mixer." in n)
    assert counts["ssd"] == ssd > 0
    acc = accounting(config)
    assert acc["kv_cache_bytes_per_token"] == 2 * 2 * config.n_kv_heads * config.head_dim * 2  # two attention layers
    path = tmp_path / "hybrid.json"
    path.write_text(config.to_json())
    assert main(["params", str(path)]) == 0
    assert "ssd" in capsys.readouterr().out


@pytest.mark.parametrize("ssd, match", [
    (dict(layers=[4]), "past n_layers"),
    (dict(head_dim=7), "does not divide"),
    (dict(n_groups=3), "n_groups"),
    (dict(chunk=0), "ssd.chunk"),
    (dict(dt_min=0.5, dt_max=0.1), "dt_min"),
])
def test_bad_ssd_configs_are_refused(ssd, match):
    with pytest.raises(ConfigError, match=match):
        hybrid(ssd=dict(SSD_FIELDS, **ssd))


def test_ssd_needs_a_pre_norm_decoder():
    with pytest.raises(ConfigError, match="pre-norm decoder"):
        hybrid(norm_placement="post")


def test_attention_maps_refuse_ssd_models():
    from tformer.viz.maps import attention_weights

    with pytest.raises(ValueError, match="SSD layers"):
        attention_weights(model_of(hybrid()), [1, 2, 3])


def test_lora_groups_name_what_they_adapt():
    """"attention" adapts the attention layers only; "all-linear" the SSD projections too."""
    from tformer.adapters.lora import LoRALinear, apply_lora

    tokens = torch.randint(0, 61, (1, 7))
    attention_only = apply_lora(model_of(hybrid()), targets="attention")
    assert not isinstance(attention_only.layers[1].mixer.w_in, LoRALinear)
    model = model_of(hybrid())
    with torch.no_grad():
        base = model(tokens)
        apply_lora(model, targets="all-linear")
        assert isinstance(model.layers[1].mixer.w_in, LoRALinear) and isinstance(model.layers[1].mixer.wo, LoRALinear)
        torch.testing.assert_close(model(tokens), base)  # B = 0: an adapted model starts equal to its base


def test_hf_export_refuses_ssd_models(tmp_path):
    from tformer.convert.hf import save_hf

    with pytest.raises(ConfigError, match="ssd"):
        save_hf(model_of(hybrid()), tmp_path / "hf")


def test_the_training_loop_trains_and_samples_a_hybrid(tmp_path):
    import json

    from tformer.train.config import TrainConfig
    from tformer.train.loop import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 200)
    cfg = TrainConfig(
        preset="tiny-llama", model={"ssd": dict(SSD_FIELDS, layers=[1])}, data=[str(corpus)], tokenizer="char",
        batch_size=4, seq_len=16, max_steps=6, lr=3e-3, warmup=1, eval_every=100, eval_batches=1, log_every=1,
        out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), tensorboard=False, sample_tokens=4,
    )
    train(cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 6 and all(map(math.isfinite, losses)) and losses[-1] < losses[0] - 0.5
    from tformer.checkpoint import load

    assert isinstance(load(tmp_path / "run" / "best").layers[1], SSDBlock)
