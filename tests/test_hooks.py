"""tformer.viz.hooks: recording changes nothing, patching changes exactly what it replaces."""

import pytest
import torch

from tests.conftest import tiny_config
from tformer.models.build import build_model
from tformer.viz.hooks import patch, record


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(tiny_config(n_layers=3)).eval()


def test_hooks_that_change_nothing_give_bit_identical_logits(model):
    tokens = torch.randint(0, 97, (2, 10))
    expected = model(tokens)
    with record(model, ["layers.0", "layers.1.attn", 2, "norm"]) as rec:
        recorded = model(tokens)
    with patch(model, outputs={i: lambda y: y for i in range(3)}, inputs={"layers.1.ffn": lambda x: x}):
        patched = model(tokens)
    assert torch.equal(recorded, expected) and torch.equal(patched, expected)
    assert torch.equal(model(tokens), expected)  # the hooks are gone after the context
    assert set(rec.outputs) == {"layers.0", "layers.1.attn", "layers.2", "norm"}
    assert torch.equal(model.output(rec.outputs["norm"]), expected)


def test_residual_stream_is_the_blocks_inputs_and_outputs(model):
    tokens = torch.randint(0, 97, (1, 7))
    with record(model) as rec:
        logits = model(tokens)
    stream = rec.residual
    assert len(stream) == 4 and all(x.shape == (1, 7, 48) for x in stream)
    assert torch.equal(stream[0], model.tok_emb(tokens))  # RoPE model: no absolute positions
    for i in range(3):
        assert torch.equal(rec.inputs[f"layers.{i}"], stream[i])
    assert torch.equal(model.output(model.norm(stream[-1])), logits)


def test_replacing_a_blocks_output_changes_the_logits_as_expected(model):
    a, b = torch.randint(0, 97, (1, 8)), torch.randint(0, 97, (1, 8))
    with record(model) as rec_b:
        logits_b = model(b)
    # the last block's output taken from input b: the head then gives b's logits exactly
    with patch(model, outputs={2: lambda y: rec_b.outputs["layers.2"]}):
        assert torch.equal(model(a), logits_b)
    # a zeroed residual stream reaches the head as the final norm of zeros
    with patch(model, outputs={"layers.2": torch.zeros_like}):
        zeroed = model(a)
    torch.testing.assert_close(zeroed, model.output(model.norm(torch.zeros(1, 8, 48))))
    assert not torch.allclose(zeroed, model(a))
    # replacing block 0's input by b's embeddings gives b's logits
    with patch(model, inputs={0: lambda x: rec_b.inputs["layers.0"]}):
        assert torch.equal(model(a), logits_b)


def test_attention_weights_are_recorded_with_the_blocks(model):
    tokens = torch.randint(0, 97, (1, 6))
    with record(model, attention=True) as rec:
        logits = model(tokens)
    assert len(rec.attention) == 3 and rec.attention[0].shape == (1, 6, 6, 6)
    torch.testing.assert_close(rec.attention[1].sum(-1), torch.ones(1, 6, 6))
    torch.testing.assert_close(logits, model(tokens), atol=1e-5, rtol=1e-5)


def test_an_unknown_module_name_is_refused(model):
    with pytest.raises(KeyError, match="no module named 'layers.9'"):
        with record(model, [9]):
            pass


def test_patching_attention_weights(model):
    tokens = torch.randint(0, 97, (2, 9))
    with record(model, attention=True) as rec:
        reference = model(tokens)  # every layer through the textbook formula
    # unchanged weights: the reference path's logits, bit for bit
    with patch(model, attention={0: lambda w: w, 1: lambda w: w, "layers.2.attn": lambda w: w}):
        assert torch.equal(model(tokens), reference)
    # zero weights: the attention adds nothing (no out_bias), as if its output were replaced by zeros
    with patch(model, attention={1: torch.zeros_like}):
        zero_weights = model(tokens)
    with patch(model, outputs={"layers.1.attn": torch.zeros_like}):
        zero_output = model(tokens)
    torch.testing.assert_close(zero_weights, zero_output, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(zero_weights, reference, atol=1e-3)
    assert len(rec.attention) == 3


def test_attention_patches_do_not_nest(model):
    with patch(model, attention={0: lambda w: w}):
        with pytest.raises(ValueError, match="do not nest"):
            with record(model, attention=True):
                pass
    with pytest.raises(ValueError, match="do not nest"):
        with record(model, attention=True), patch(model, attention={1: lambda w: w}):
            pass
    assert all("core" not in layer.attn.__dict__ for layer in model.layers)  # every context cleaned up


def test_latent_attention_weights_cannot_be_patched():
    from tformer.presets import get_preset

    mla = build_model(get_preset("tiny-mla-moe"), device="meta")
    with pytest.raises(ValueError, match="latent attention"):
        with patch(mla, attention={0: lambda w: w}):
            pass


def test_encoder_decoder_stacks_are_recorded_and_patched():
    """Both stacks' blocks by default, a residual stream per stack, and an identity patch of T5's cross-
    attention weights (softmax scale 1, relative bias) giving the model's own logits."""
    from tformer.presets import get_preset

    torch.manual_seed(0)
    config = get_preset("t5-small").replace(vocab_size=50, dim=32, n_layers=2, n_decoder_layers=3, n_heads=4,
                                            head_dim=8, ffn_dim=48, rel_buckets=8, rel_max_distance=16)
    model = build_model(config).eval()
    src, tgt = torch.randint(0, 50, (2, 9)), torch.randint(0, 50, (2, 6))
    expected = model(src, tgt)
    with record(model) as rec:
        assert torch.equal(model(src, tgt), expected)
    assert len(rec.residual_of("enc_layers")) == 3 and len(rec.residual_of("dec_layers")) == 4
    assert rec.residual_of("dec_layers")[0].shape == (2, 6, 32)
    with pytest.raises(ValueError, match="residual_of"):
        rec.residual
    with patch(model, attention={"dec_layers.1.cross": lambda w: w, "enc_layers.0": lambda w: w}):
        torch.testing.assert_close(model(src, tgt), expected, rtol=1e-5, atol=1e-5)
    with patch(model, attention={"dec_layers.1.cross": lambda w: torch.zeros_like(w)}):
        assert not torch.allclose(model(src, tgt), expected)
