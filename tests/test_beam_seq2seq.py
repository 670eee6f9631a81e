"""Beam search for encoder-decoders (tformer.inference.seq2seq.EncoderDecoderStepper driving
tformer.inference.beam): equal to HF T5 `generate(num_beams=4)` on a tiny random T5 converted by the
production converter (hypotheses, n-best order and scores), early stopping off (HF default) and on; a batch of
sources gives each the hypotheses it has alone."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from tests.reference.test_hf_t5 import TINY  # noqa: E402
from tformer.convert.hf_t5 import load_hf_t5  # noqa: E402
from tformer.inference.beam import beam_search  # noqa: E402
from tformer.inference.seq2seq import EncoderDecoderStepper  # noqa: E402
from tformer.models import build_model  # noqa: E402
from tformer.presets import get_preset  # noqa: E402

SOURCES = [[5, 9, 14, 3, 22, 7], [31, 2, 8], [7, 40, 41, 42, 43, 44, 45, 46, 47]]
EOS = [24, 17]  # tokens the search meets at several lengths on this model


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """(HF T5 v1.0, the same converted by load_hf_t5). Equal stack depths: transformers' generate
    sizes its cache by num_layers."""
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**{**TINY, "num_decoder_layers": 2})).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        hf.shared.weight.mul_(0.3)  # flatter distributions: beams part ways and end ids get chosen
    path = tmp_path_factory.mktemp("t5")
    hf.save_pretrained(path)
    return hf, load_hf_t5(path)


@pytest.mark.parametrize("early_stopping", [False, True])
def test_beam_search_equals_hf_t5_generate(t5, early_stopping):
    hf, ours = t5
    result = beam_search(EncoderDecoderStepper(ours, start_id=0), SOURCES, 10, beams=4, n_best=2, eos_ids=EOS,
                         length_penalty=1.0, early_stopping=early_stopping)
    ended = 0
    for source, sequences, scores in zip(SOURCES, result.sequences, result.scores):
        out = hf.generate(input_ids=torch.tensor([source]), attention_mask=torch.ones(1, len(source), dtype=torch.long),
                          decoder_start_token_id=0, max_new_tokens=10, do_sample=False, num_beams=4,
                          num_return_sequences=2, length_penalty=1.0, early_stopping=early_stopping,
                          eos_token_id=EOS, pad_token_id=0, no_repeat_ngram_size=0,
                          return_dict_in_generate=True, output_scores=True)  # fmt: skip
        for ours_seq, hf_seq in zip(sequences, out.sequences[:, 1:].tolist()):  # HF's start token dropped
            assert hf_seq[: len(ours_seq)] == ours_seq
            assert set(hf_seq[len(ours_seq):]) <= set(EOS) | {0}  # HF pads a finished hypothesis
            ended += ours_seq[-1] in EOS
        torch.testing.assert_close(torch.tensor(scores), out.sequences_scores, atol=1e-5, rtol=0)
    assert ended  # the comparison covers hypotheses that end before max_new_tokens


@torch.no_grad()
def test_batched_beam_search_equals_one_source_at_a_time():
    torch.manual_seed(0)
    cfg = get_preset("transformer-base").replace(vocab_size=60, dim=32, n_layers=2, n_heads=4, ffn_dim=48,
                                                 max_seq_len=32, emb_dropout=0.0, resid_dropout=0.0)
    model = build_model(cfg).eval()
    stepper = EncoderDecoderStepper(model, start_id=1)
    batched = beam_search(stepper, SOURCES, 8, beams=3, n_best=3, eos_ids=[2])
    for i, source in enumerate(SOURCES):
        alone = beam_search(stepper, [source], 8, beams=3, n_best=3, eos_ids=[2])
        assert alone.sequences[0] == batched.sequences[i]
        torch.testing.assert_close(torch.tensor(alone.scores[0]), torch.tensor(batched.scores[i]), atol=1e-5, rtol=0)
    assert model.cache_slots == 0  # the search closes the stepper


def test_stepper_refuses_a_decoder_and_bad_ids(t5):
    with pytest.raises(TypeError, match="not an encoder-decoder"):
        EncoderDecoderStepper(build_model(get_preset("tiny-gpt2")), start_id=0)
    with pytest.raises(ValueError, match="start_id"):
        EncoderDecoderStepper(t5[1], start_id=1000)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        beam_search(EncoderDecoderStepper(t5[1], start_id=0), [[5, 500]], 4, beams=2)


def test_the_decode_engine_refuses_an_encoder_decoder(t5):
    from tformer.inference.engine import DecodeEngine

    with pytest.raises(ValueError, match="decoder-only models"):
        DecodeEngine(t5[1])
