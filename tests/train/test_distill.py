"""Distillation: the loss is Hinton's mix, a distilled student moves toward its teacher, bad teachers fail clearly."""

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import tformer
from tests.train.test_loop import corpus, small_run  # noqa: F401 - the corpus fixture
from tformer.data import eval_batches
from tformer.tokenizer import Tokenizer
from tformer.train.data import prepare_data
from tformer.train.distill import distill_loss
from tformer.train.evaluate import lm_loss
from tformer.train.loop import train


def test_alpha_zero_is_cross_entropy():
    s, t, y = torch.randn(2, 5, 11), torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    torch.testing.assert_close(distill_loss(s, t, y, alpha=0.0), lm_loss(s, y))
    torch.testing.assert_close(distill_loss(s, t, y, alpha=0.0, label_smoothing=0.1), lm_loss(s, y, 0.1))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_soft_term_is_scaled_kl_from_the_teacher(temperature):
    s, t, y = torch.randn(2, 5, 11), torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    p_t, log_p_s = (t / temperature).softmax(-1), (s / temperature).log_softmax(-1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(-1).mean()
    torch.testing.assert_close(distill_loss(s, t, y, alpha=1.0, temperature=temperature), temperature**2 * kl)
    mixed = 0.3 * lm_loss(s, y) + 0.7 * temperature**2 * kl
    torch.testing.assert_close(distill_loss(s, t, y, alpha=0.7, temperature=temperature), mixed)
    assert distill_loss(t + 3.0, t, y, alpha=1.0, temperature=temperature).abs() < 1e-5  # same distribution


def test_padding_rows_past_the_vocabulary_are_left_out():
    s, t, y = torch.randn(2, 5, 11), torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    padded_t = F.pad(t, (0, 5), value=7.0)  # a teacher padded to 16 entries
    torch.testing.assert_close(distill_loss(s, padded_t, y, alpha=0.5), distill_loss(s, t, y, alpha=0.5))
    torch.testing.assert_close(distill_loss(F.pad(s, (0, 5)), padded_t, y, alpha=0.5, vocab_size=11),
                               distill_loss(s, t, y, alpha=0.5))


def _val_kl(student, teacher, cfg) -> float:
    """KL(teacher || student) per token over the run's validation batches (the tokenizer's entries)."""
    data = prepare_data(cfg)
    V = data.tokenizer.vocab_size
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in eval_batches(data.shards.val.tokens, cfg.batch_size, cfg.seq_len):
            total += distill_loss(student(x), teacher(x), y, alpha=1.0, vocab_size=V).item() * y.numel()
            n += y.numel()
    return total / n


def test_distilled_student_is_closer_to_its_teacher(corpus, tmp_path):  # noqa: F811
    teacher_cfg = small_run(corpus, tmp_path, out_dir=str(tmp_path / "teacher"), max_steps=60, eval_every=60,
                            dropout=0.0)
    train(teacher_cfg, progress=False)
    teacher_dir = tmp_path / "teacher" / "best"
    student = dict(model={"n_layers": 1}, max_steps=40, eval_every=40, dropout=0.0)
    plain = small_run(corpus, tmp_path, out_dir=str(tmp_path / "plain"), **student)
    train(plain, progress=False)
    distilled = small_run(corpus, tmp_path, out_dir=str(tmp_path / "distilled"), teacher=str(teacher_dir),
                          distill_alpha=1.0, **student)
    train(distilled, progress=False)
    teacher = tformer.load(teacher_dir).eval()
    kl_plain = _val_kl(tformer.load(tmp_path / "plain" / "best").eval(), teacher, plain)
    kl_distilled = _val_kl(tformer.load(tmp_path / "distilled" / "best").eval(), teacher, distilled)
    assert kl_distilled < 0.5 * kl_plain  # measured 0.04 vs 0.18
    # the student took the teacher's tokenizer
    assert Tokenizer.load(tmp_path / "distilled" / "best").to_str() == Tokenizer.load(teacher_dir).to_str()


def test_bad_teachers_fail_before_training(corpus, tmp_path):  # noqa: F811
    train(small_run(corpus, tmp_path, out_dir=str(tmp_path / "teacher"), max_steps=2, eval_every=2), progress=False)
    teacher_dir = tmp_path / "teacher" / "best"
    other = Tokenizer.train_char(["xyz"])
    other.save(tmp_path / "other.json")
    with pytest.raises(ValueError, match="differs from the teacher's"):
        train(small_run(corpus, tmp_path, teacher=str(teacher_dir), tokenizer=str(tmp_path / "other.json")),
              progress=False)
    with pytest.raises(ValueError, match="reads at most"):
        train(small_run(corpus, tmp_path, teacher=str(teacher_dir), seq_len=4096, model={"max_seq_len": 4096}),
              progress=False)
    with pytest.raises(ValueError, match="distill_alpha"):
        train(small_run(corpus, tmp_path, teacher=str(teacher_dir), distill_alpha=1.5), progress=False)
    bare = tmp_path / "bare"
    shutil.copytree(teacher_dir, bare)
    (bare / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        train(small_run(corpus, tmp_path, teacher=str(bare)), progress=False)


def test_distill_init_starts_from_evenly_spaced_teacher_layers(corpus, tmp_path):  # noqa: F811
    from tformer.train.distill import load_teacher
    from tformer.train.model_setup import setup_model

    train(small_run(corpus, tmp_path, out_dir=str(tmp_path / "teacher"), model={"n_layers": 4}, max_steps=2,
                    eval_every=2), progress=False)
    teacher_dir = tmp_path / "teacher" / "best"
    teacher = tformer.load(teacher_dir)
    cfg = small_run(corpus, tmp_path, teacher=str(teacher_dir), distill_init=True, model={"n_layers": 2})
    tokenizer = prepare_data(cfg).tokenizer
    student = setup_model(cfg, tokenizer, torch.device("cpu"), None,
                          load_teacher(teacher_dir, "cpu", tokenizer.vocab_size, cfg.seq_len))
    assert len(student.layers) == 2
    torch.testing.assert_close(student.tok_emb.weight, teacher.tok_emb.weight)
    torch.testing.assert_close(student.output.weight, teacher.output.weight)
    for i, j in ((0, 0), (1, 2)):  # every other layer
        for (name, p), q in zip(student.layers[i].named_parameters(), teacher.layers[j].parameters()):
            torch.testing.assert_close(p, q, msg=name)
    result = train(cfg, progress=False)  # and it trains from there
    assert result.step == cfg.max_steps
    wide = small_run(corpus, tmp_path, teacher=str(teacher_dir), distill_init=True, model={"n_layers": 2, "dim": 96},
                     out_dir=str(tmp_path / "wide"))
    with pytest.raises(ValueError, match="but for n_layers"):
        train(wide, progress=False)
    with pytest.raises(ValueError, match="need a teacher"):
        train(small_run(corpus, tmp_path, distill_init=True), progress=False)


def test_cosine_term_compares_directions_of_hidden_states(corpus, tmp_path):  # noqa: F811
    from tformer.train.distill import cosine_loss

    h = torch.randn(2, 5, 8)
    assert cosine_loss(3.0 * h, h).abs() < 1e-6
    torch.testing.assert_close(cosine_loss(-h, h), torch.tensor(2.0))
    train(small_run(corpus, tmp_path, out_dir=str(tmp_path / "teacher"), max_steps=2, eval_every=2), progress=False)
    teacher_dir = str(tmp_path / "teacher" / "best")
    result = train(small_run(corpus, tmp_path, teacher=teacher_dir, distill_init=True, distill_cosine=1.0,
                             model={"n_layers": 1}), progress=False)
    assert math.isfinite(result.val_loss)
    with pytest.raises(ValueError, match="distill_cosine compares hidden states"):
        train(small_run(corpus, tmp_path, teacher=teacher_dir, distill_cosine=1.0, model={"dim": 96},
                        out_dir=str(tmp_path / "wide")), progress=False)
    with pytest.raises(ValueError, match="need a teacher"):
        train(small_run(corpus, tmp_path, distill_cosine=1.0), progress=False)
