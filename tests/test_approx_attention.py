"""Linformer and Performer attention (tformer.nn.approx): error against exact softmax attention as
rank and features grow, linear FLOPs in the sequence length, decode state = full forward, and a
tiny decoder of each trained, decoded through the engine, saved, loaded and counted."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tformer import load, save
from tformer.cli import main
from tformer.config import ConfigError, ModelConfig
from tformer.inference import DecodeEngine, EngineOptions, beam_search, generate
from tformer.inference.fused import fusable
from tformer.inference.sampling import SamplingConfig
from tformer.models import build_model
from tformer.nn.approx import LinformerAttention, PerformerAttention
from tformer.nn.attention import Attention, reference_attention

APPROX = ("performer", "linformer")


def tiny(approx: str, architecture: str = "decoder", **fields) -> ModelConfig:
    attention = {"approx": approx, "features": 32, "rank": 16, **fields.pop("attention", {})}
    base = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=160, positions="rope")
    return ModelConfig(**{**base, **fields}, architecture=architecture, attention=attention)


def qkv_of(q, k, v):
    """q (B,H,T,D), k/v (B,Hkv,T,D) -> the fused projection layout (B,T,(H+2Hkv)D) `attend` reads."""
    return torch.cat([t.transpose(1, 2).flatten(2) for t in (q, k, v)], dim=-1)


def relative_error(layer: Attention, q, k, v, causal: bool) -> float:
    B, H, T, D = q.shape
    everything = torch.ones(1, 1, 1, T, dtype=torch.bool)
    with torch.no_grad():
        exact = reference_attention(q, k, v, None if causal else everything)[0]
        y = layer.attend(qkv_of(q, k, v), None, None if causal else everything).view(B, T, H, D).transpose(1, 2)
    return float((y - exact).norm() / exact.norm())


@pytest.mark.parametrize("architecture", ["decoder", "encoder"])
def test_performer_error_shrinks_as_features_grow(architecture):
    T, D, seeds = 64, 16, range(4)
    errors = {}
    for m in (16, 64, 256, 1024):
        config = tiny("performer", architecture, n_heads=2, n_kv_heads=2, attention={"features": m})
        total = 0.0
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            q, k, v = (0.7 * torch.randn(2, 2, T, D, generator=g) for _ in range(3))
            layer = PerformerAttention(config, layer=seed)
            total += relative_error(layer, q, k, v, causal=architecture == "decoder")
        errors[m] = total / len(seeds)
    e = list(errors.values())
    assert all(a > b for a, b in zip(e, e[1:])) and e[-1] < 0.5 * e[0], f"relative error by features m: {errors}"


def test_linformer_error_shrinks_as_rank_grows_and_is_exact_at_identity():
    """E = F = `rank` rows of the identity (a sampling projection): attention over a random subset of
    the keys, exact at rank = T. (A Gaussian E, F is not a JL approximation of softmax attention:
    softmax(q (E K)^T) F V differs from softmax(q K^T) V even at rank T.)"""
    T, D, seeds = 128, 16, range(4)
    errors = {}
    for rank in (8, 32, 64, 128):
        layer = LinformerAttention(tiny("linformer", "encoder", max_seq_len=T, n_heads=2, n_kv_heads=2,
                                        attention={"rank": rank}))
        total = 0.0
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            q, k, v = (torch.randn(2, 2, T, D, generator=g) for _ in range(3))
            rows = torch.randperm(T, generator=g)[:rank].sort().values
            with torch.no_grad():
                layer.proj_k.weight.copy_(torch.eye(T)[rows])
                layer.proj_v.weight.copy_(torch.eye(T)[rows])
            total += relative_error(layer, q, k, v, causal=False)
        errors[rank] = total / len(seeds)
    e = list(errors.values())
    assert all(a > b for a, b in zip(e, e[1:])) and e[-1] < 1e-5, f"relative error by rank: {errors}"


@pytest.mark.parametrize("architecture", ["decoder", "encoder"])
def test_performer_computes_favor_plus(architecture):
    """The stabilised, chunked layer (GQA: 4 query heads on 2 key/value heads) against the formula:
    phi(x) = exp(w x - |x|^2 / 2) / sqrt(m) on x * scale^(1/2), y = (phi(q) phi(k)^T [tril]) v / row sums."""
    torch.manual_seed(0)
    layer = PerformerAttention(tiny("performer", architecture, attention={"features": 48}))
    (B, T, D), causal = (2, 100, 8), architecture == "decoder"
    q, k, v = torch.randn(B, 4, T, D), torch.randn(B, 2, T, D), torch.randn(B, 2, T, D)
    mask = None if causal else torch.ones(1, 1, 1, T, dtype=torch.bool)
    y = layer.attend(qkv_of(q, k, v), None, mask).view(B, T, 4, D).transpose(1, 2)
    omega = layer.features.omega

    def phi(x):
        x = x * D**-0.25
        return torch.exp(x @ omega.T - (x * x).sum(-1, keepdim=True) / 2) / omega.shape[0] ** 0.5

    a = phi(q) @ phi(k.repeat_interleave(2, 1)).transpose(-1, -2)  # (B, H, T, T)
    a = a.tril() if causal else a
    torch.testing.assert_close(y, a @ v.repeat_interleave(2, 1) / a.sum(-1, keepdim=True), rtol=1e-4, atol=1e-5)


def test_causal_linformer_computes_the_cumulative_projection():
    """y_t = softmax(q_t (E[:, :t+1] K[:t+1])^T * scale) F[:, :t+1] V[:t+1], one query at a time."""
    torch.manual_seed(0)
    layer = LinformerAttention(tiny("linformer", attention={"rank": 12}))
    B, T, D = 2, 100, 8
    q, k, v = torch.randn(B, 4, T, D), torch.randn(B, 2, T, D), torch.randn(B, 2, T, D)
    with torch.no_grad():
        y = layer.attend(qkv_of(q, k, v)).view(B, T, 4, D).transpose(1, 2)
    e, f = layer.proj_k.weight.detach(), layer.proj_v.weight.detach()
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    for t in range(T):
        kt, vt = e[:, : t + 1] @ k[:, :, : t + 1], f[:, : t + 1] @ v[:, :, : t + 1]  # (B, H, r, D)
        expected = ((q[:, :, t : t + 1] @ kt.transpose(-1, -2)) * D**-0.5).softmax(-1) @ vt
        torch.testing.assert_close(y[:, :, t], expected[:, :, 0], rtol=1e-4, atol=1e-5)


def flops(layer: torch.nn.Module, T: int) -> int:
    x = torch.randn(1, T, layer.wo.out_features)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("approx, architecture", [("performer", "decoder"), ("performer", "encoder"),
                                                  ("linformer", "decoder"), ("linformer", "encoder")])
def test_flops_grow_linearly_with_sequence_length(approx, architecture):
    config = tiny(approx, architecture, max_seq_len=1024)
    exact = Attention(config)
    exact.core = lambda q, k, v, mask=None, dropout_p=0.0: reference_attention(q, k, v, mask)[0]  # counted matmuls
    layer = PerformerAttention(config) if approx == "performer" else LinformerAttention(config)
    exact_ratio = flops(exact, 1024) / flops(exact, 512)
    ratio = flops(layer, 1024) / flops(layer, 512)
    assert abs(ratio - 2) < 0.02, f"{approx}: FLOPs(2T) / FLOPs(T) = {ratio:.3f}, expected 2 (linear)"
    assert exact_ratio > 3.5, f"exact attention: FLOPs(2T) / FLOPs(T) = {exact_ratio:.3f}, expected ~4"


@pytest.mark.parametrize("approx", APPROX)
def test_decoding_with_the_state_equals_the_full_forward(approx):
    torch.manual_seed(0)
    model = build_model(tiny(approx)).eval()
    tokens = torch.randint(0, 64, (2, 84))  # the prompt over two chunks of the causal scan
    full = model(tokens)
    model.setup_caches(3, 88)  # more rows than the batch: forwards use the first ones
    steps = [model(tokens[:, :70], input_pos=torch.arange(70))]
    steps += [model(tokens[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(70, 84)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    again = model(tokens[:, :5], input_pos=torch.arange(5))  # slot 0 starts a new sequence: the state resets
    torch.testing.assert_close(again, full[:, :5], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("approx", APPROX)
def test_outputs_are_causal_and_left_padding_changes_nothing(approx):
    torch.manual_seed(0)
    model = build_model(tiny(approx)).eval()
    tokens = torch.randint(0, 64, (1, 40))
    full = model(tokens)
    changed = tokens.clone()
    changed[:, 30:] = (changed[:, 30:] + 1) % 64
    torch.testing.assert_close(model(changed)[:, :30], full[:, :30])
    padded = torch.cat([torch.zeros(1, 7, dtype=torch.long), tokens], 1)
    mask = torch.cat([torch.zeros(1, 7, dtype=torch.long), torch.ones(1, 40, dtype=torch.long)], 1)
    torch.testing.assert_close(model(padded, attention_mask=mask)[:, 7:], full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("approx", APPROX)
def test_encoder_ignores_padding_keys_and_refuses_packed_rows(approx):
    torch.manual_seed(0)
    model = build_model(tiny(approx, "encoder")).eval()
    tokens = torch.randint(0, 64, (1, 30))
    alone = model(tokens)
    padded = torch.cat([tokens, torch.zeros(1, 6, dtype=torch.long)], 1)
    mask = (torch.arange(36) < 30).long()[None]
    torch.testing.assert_close(model(padded, attention_mask=mask)[:, :30], alone, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="key padding"):
        model(tokens, segments=(torch.arange(30) >= 15).long()[None])


@pytest.mark.filterwarnings("ignore:.*tokenizer.json")
@pytest.mark.parametrize("approx", APPROX)
def test_tiny_decoder_trains_generates_and_round_trips(approx, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny(approx))
    data = torch.arange(64).repeat(2)[None, :73].repeat(2, 1)  # (2, 73): a cycle to learn, over two chunks
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(12):
        logits = model(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.8 * losses[0], losses
    model.eval()
    prompts = [[1, 2, 3], [10, 11, 12, 13, 14, 15]]
    rows = generate(model, prompts, 6, SamplingConfig(temperature=0))
    for prompt, row in zip(prompts, rows):  # batched and left-padded = alone, cache-free, greedy
        seq = torch.tensor([prompt])
        for _ in range(6):
            seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], 1)
        assert row == seq[0, len(prompt):].tolist()
    beams = beam_search(model, prompts, 5, beams=3, length_penalty=0.0)  # reorders the states' rows
    for prompt, (best, *_), (score, *_) in zip(prompts, beams.sequences, beams.scores):
        seq = torch.tensor([prompt + best])
        logp = model(seq)[0, len(prompt) - 1 : -1].log_softmax(-1).gather(1, seq[0, len(prompt):, None]).sum()
        assert abs(float(logp) - score) < 1e-3
    if approx == "performer":
        model.layers[0].attn.redraw_features()  # a redraw is part of the model: it survives the checkpoint
    save(model, tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt")
    torch.testing.assert_close(loaded(data[:, :40]), model(data[:, :40]))


@pytest.mark.parametrize("approx", APPROX)
def test_decode_steps_compile_as_one_graph(approx):
    """fullgraph=True: a graph break (a host sync, data-dependent Python) would raise."""
    torch.manual_seed(0)
    model = build_model(tiny(approx)).eval()
    prompts, greedy = [[1, 2, 3], [4, 5, 6, 7]], SamplingConfig(temperature=0)
    compiled = DecodeEngine(model, EngineOptions(max_batch_size=2, compile=True, compile_backend="eager"))
    assert compiled.generate(prompts, 4, greedy) == generate(model, prompts, 4, greedy)


def test_performer_features_are_seeded_per_layer_and_redrawable():
    a, b = build_model(tiny("performer")), build_model(tiny("performer"))
    omega = [layer.attn.features.omega.clone() for layer in a.layers]
    assert all(torch.equal(x, layer.attn.features.omega) for x, layer in zip(omega, b.layers))
    assert not torch.equal(omega[0], omega[1])
    a.layers[0].attn.redraw_features()
    assert not torch.equal(a.layers[0].attn.features.omega, omega[0])
    m, D = omega[0].shape  # orthogonal within a block of D rows
    rows = torch.nn.functional.normalize(omega[0][:D], dim=1)
    torch.testing.assert_close(rows @ rows.T, torch.eye(D), atol=1e-5, rtol=0)


@pytest.mark.parametrize("approx", APPROX)
def test_params_cli_counts_an_approx_config(approx, tmp_path, capsys):
    config = tiny(approx)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 160,
                                "attention": {"approx": approx, "rank": 16, "features": 32}}))
    assert main(["params", str(path), "--json"]) == 0
    counted = json.loads(capsys.readouterr().out)
    built = sum(p.numel() for p in build_model(config.replace(n_kv_heads=4, positions="learned")).parameters())
    assert counted["total"] == built
    extra = 2 * 2 * 16 * 160 if approx == "linformer" else 0  # E and F (rank x max_seq_len) a layer
    exact = sum(p.numel() for p in build_model(tiny("none", n_kv_heads=4, positions="learned")).parameters())
    assert built == exact + extra


def test_fused_decode_kernels_do_not_claim_approx_blocks():
    for approx in APPROX:
        assert not any(fusable(block) for block in build_model(tiny(approx), device="meta").layers)
    assert all(fusable(block) for block in build_model(tiny("none"), device="meta").layers)


@pytest.mark.parametrize("fields, match", [
    ({"mla": {"kv_rank": 16, "nope_dim": 8, "rope_dim": 8, "v_dim": 8}}, "mla=None"),
    ({"sliding_window": 16}, "sliding_window"),
    ({"attention": {"pattern": "prefix", "prefix": 4}}, "pattern"),
    ({"attention": {"softcap": 30.0}}, "softcap"),
    ({"positions": "alibi"}, "ALiBi"),
    ({"architecture": "encoder_decoder", "positions": "t5"}, "encoder-decoder"),
    ({"max_seq_len": 8}, "attention.rank"),
    ({"attn_dropout": 0.1, "attention": {"approx": "performer"}}, "attn_dropout"),
])
def test_config_refuses_what_the_approximations_do_not_compute(fields, match):
    with pytest.raises(ConfigError, match=match):
        tiny("linformer", **fields)


def test_packed_rows_and_speculative_decoding_are_refused():
    model = build_model(tiny("performer")).eval()
    with pytest.raises(ValueError, match="segments"):
        model(torch.zeros(1, 8, dtype=torch.long), segments=torch.zeros(1, 8, dtype=torch.long))
    from tformer.inference.speculative import speculative_generate

    with pytest.raises(ValueError, match="running state"):
        speculative_generate(model, model, [1, 2, 3], 4, k=2)


@pytest.mark.parametrize("approx", APPROX)
def test_accounting_counts_the_approximation_not_softmax_attention(approx):
    """`tformer.accounting`'s attention term for a causal approximation: the layer's counted matmul
    FLOPs (projections aside) to within 3%, the same per token at every length; no KV cache."""
    from tformer.accounting import accounting, attention_flops_per_token

    config = tiny(approx, n_layers=1, max_seq_len=2048)
    layer = PerformerAttention(config) if approx == "performer" else LinformerAttention(config)
    projections = sum(p.numel() for n, p in layer.named_parameters() if n.startswith(("wqkv", "wo")))
    for T in (512, 2048):
        counted = (flops(layer, T) - 2 * T * projections) / T
        assert counted == pytest.approx(attention_flops_per_token(config, T) / 3, rel=0.03)
    acc = accounting(config)
    assert acc["kv_cache_bytes_per_token"] == 0 and acc["approx_state_bytes"] > 0
