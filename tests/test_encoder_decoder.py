"""EncoderDecoder (T5-shaped and original-Transformer-shaped tiny configs): shapes, source padding,
target causality, incremental decoding with a cross-attention cache filled once, config errors,
initialisation, a tformer checkpoint round trip, and teacher-forced training through the loop's
`train_step` with the Seq2Seq objective."""

import pytest
import torch

import tformer
from tformer.config import ConfigError, ModelConfig
from tformer.data.sft import IGNORE
from tformer.models import build_model
from tformer.models.encoder_decoder import EncoderDecoder
from tformer.nn.position import RelativePositionBias
from tformer.presets import get_preset
from tformer.train.loop import train_step
from tformer.train.objectives import Seq2Seq
from tformer.train.optim import make_optimizer

SMALL = dict(vocab_size=50, dim=32, n_layers=2, n_decoder_layers=3, n_heads=4, head_dim=8, ffn_dim=48,
             max_seq_len=32, emb_dropout=0.0, resid_dropout=0.0)  # fmt: skip
CONFIGS = {
    "t5-v1.0": lambda: get_preset("t5-small").replace(**SMALL, rel_buckets=8, rel_max_distance=16),
    "t5-v1.1": lambda: get_preset("t5-v1_1-small").replace(**SMALL, rel_buckets=8, rel_max_distance=16),
    "transformer": lambda: get_preset("transformer-base").replace(**{**SMALL, "head_dim": None}),
}


def model_of(name: str) -> EncoderDecoder:
    torch.manual_seed(0)
    return build_model(CONFIGS[name]()).eval()


def batch(B: int = 3, S: int = 9, T: int = 6):
    torch.manual_seed(1)
    return torch.randint(0, 50, (B, S)), torch.randint(0, 50, (B, T))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.no_grad()
def test_shapes_padding_and_causality(name):
    model = model_of(name)
    src, tgt = batch()
    assert isinstance(model, EncoderDecoder)
    assert model(src, tgt).shape == (3, 6, 50)
    assert model.encode(src).shape == (3, 9, 32)
    # a padded source row gives the logits of the same row alone; its pad tokens are never read
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    padded = model(src, tgt, mask)
    alone = model(src[1:2, :5], tgt[1:2])
    torch.testing.assert_close(padded[1:2], alone, atol=1e-5, rtol=0)
    other = src.clone()
    other[1, 5:] = (other[1, 5:] + 7) % 50
    torch.testing.assert_close(model(other, tgt, mask), padded, atol=0, rtol=0)
    # the target is causal: changing token 3 leaves the logits of positions 0..2 as they were
    changed = tgt.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 50
    out = model(src, changed, mask)
    torch.testing.assert_close(out[:, :3], padded[:, :3], atol=0, rtol=0)
    assert not torch.allclose(out[:, 3:], padded[:, 3:])


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.no_grad()
def test_decode_steps_equal_the_full_forward_and_fill_the_cross_cache_once(name):
    model = model_of(name)
    src, tgt = batch()
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[2, 4:] = 0
    full = model(src, tgt, mask)
    calls = []
    for layer in model.dec_layers:
        layer.cross.wkv.register_forward_hook(lambda *_: calls.append(1))
    model.setup_caches(model.encode(src, mask), n_slots=8, src_mask=mask)
    assert len(calls) == len(model.dec_layers)  # the memory is projected once per layer ...
    steps = [model.decode_step(tgt[:, t : t + 1], torch.tensor([t])) for t in range(tgt.shape[1])]
    assert len(calls) == len(model.dec_layers)  # ... and never again while decoding
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    # beam search keeps rows: reordering the caches reorders what the next step reads
    model.setup_caches(model.encode(src, mask), n_slots=8, src_mask=mask)
    model.decode_step(tgt[:, :2], torch.arange(2))
    model.reorder_caches(torch.tensor([2, 2, 0]))
    step = model.decode_step(tgt[[2, 2, 0], 2:3], torch.tensor([2]))
    torch.testing.assert_close(step, full[[2, 2, 0], 2:3], atol=1e-5, rtol=0)


def test_cache_misuse_and_bad_masks_are_clear_errors():
    model = model_of("t5-v1.0")
    src, tgt = batch()
    with pytest.raises(ValueError, match="setup_caches"):
        model.decode_step(tgt[:, :1], torch.tensor([0]))
    with pytest.raises(ValueError, match="src_mask must have shape"):
        model(src, tgt, torch.ones(3, 4))
    model.setup_caches(model.encode(src), n_slots=8)
    with pytest.raises(ValueError, match="clear_caches"):
        model(src, tgt)
    with pytest.raises(ValueError, match="input_pos must have shape"):
        model.decode_step(tgt[:, :2], torch.tensor([0]))
    model.clear_caches()
    assert model(src, tgt).shape == (3, 6, 50)
    absolute = model_of("transformer")  # max_seq_len 32
    with pytest.raises(ValueError, match="source length 40 exceeds the model's max_seq_len 32"):
        absolute(torch.zeros(1, 40, dtype=torch.long), tgt[:1])
    with pytest.raises(ValueError, match="n_slots"):
        absolute.setup_caches(absolute.encode(src), n_slots=64)


@pytest.mark.parametrize("fields, match", [
    (dict(architecture="encoder", positions="t5"), "needs architecture='encoder_decoder'"),
    (dict(n_decoder_layers=2), "n_decoder_layers is an encoder-decoder field"),
    (dict(scale_output=True), "scale_output is an encoder-decoder field"),
    (dict(architecture="encoder_decoder", positions="rope"), "takes positions"),
    (dict(architecture="encoder_decoder", moe={}, activation="swiglu"), "dense, full attention"),
    (dict(architecture="encoder_decoder", n_decoder_layers=0), "n_decoder_layers must be a positive"),
    (dict(architecture="encoder_decoder", positions="t5", rel_buckets=7), "rel_buckets must be an even"),
    (dict(architecture="encoder_decoder", positions="t5", rel_buckets=32, rel_max_distance=16), "must exceed"),
    (dict(architecture="encoder_decoder", attn_scale=0.0), "attn_scale must be > 0"),
    (dict(attn_scale=1.0), "attn_scale is an encoder-decoder field"),
    (dict(architecture="encoder_decoder", positions="learned", sinusoid_split=True), "sinusoid_split needs"),
])  # fmt: skip
def test_config_errors_name_the_field(fields, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**fields)


def test_init_weights_and_checkpoint_round_trip(tmp_path):
    model = model_of("t5-v1.1")
    assert model.output.weight is not model.tok_emb.weight  # v1.1: untied head
    assert all(torch.isfinite(p).all() and p.std() > 0 for n, p in model.named_parameters() if "norm" not in n)
    assert isinstance(model.enc_bias, RelativePositionBias) and model.enc_bias.weight.std() < 0.05
    tied = model_of("t5-v1.0")
    assert tied.output.weight is tied.tok_emb.weight
    src, tgt = batch()
    tformer.save(model, tmp_path / "ckpt")
    loaded = tformer.load(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(src, tgt), model(src, tgt), atol=0, rtol=0)


def test_teacher_forced_training_through_train_step():
    """A copy task: the loss of the Seq2Seq objective (label smoothing 0.1) falls through the loop's train_step."""
    model = model_of("transformer").train()
    objective = Seq2Seq(model, label_smoothing=0.1)
    optimizer = make_optimizer(model, 1e-2, 0.0, (0.9, 0.98))
    torch.manual_seed(2)
    src = torch.randint(3, 50, (8, 7))
    tokens = torch.cat([torch.ones(8, 1, dtype=torch.long), src], 1)  # start token 1, then the target
    targets = torch.cat([src, torch.full((8, 1), IGNORE)], 1)  # the last position is not trained
    step = {"src": src, "src_mask": torch.ones_like(src), "tokens": tokens, "targets": targets, "n_targets": 56}
    losses = [train_step(model, objective, optimizer, [step], grad_clip=1.0)["loss"].item() for _ in range(20)]
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.slow  # about 15 s of compilation on the 2-core CPU
@torch.no_grad()
def test_decode_step_compiles_fullgraph_and_equals_eager():
    model = model_of("t5-v1.0")
    src, tgt = batch()
    memory = model.encode(src)
    model.setup_caches(memory, n_slots=8)
    step = torch.compile(model.decode_step, fullgraph=True)  # a graph break raises
    compiled = [step(tgt[:, t : t + 1], torch.tensor([t])) for t in range(3)]
    model.setup_caches(memory, n_slots=8)
    eager = [model.decode_step(tgt[:, t : t + 1], torch.tensor([t])) for t in range(3)]
    torch.testing.assert_close(torch.cat(compiled, 1), torch.cat(eager, 1), atol=1e-5, rtol=0)
