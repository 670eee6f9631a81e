"""Logit lens: the last layer's view is the model's own top-k; `tformer lens` prints it and draws the PNG."""

import torch

from tformer.cli import main
from tformer.models import build_model
from tformer.viz.lens import logit_lens
from tests.conftest import tiny_config


def test_last_layer_is_the_models_own_top_k():
    torch.manual_seed(0)
    model = build_model(tiny_config(n_layers=3)).eval()
    ids = torch.randint(97, (10,)).tolist()
    lens = logit_lens(model, ids, k=4)
    assert lens.top_ids.shape == lens.top_probs.shape == (3, 10, 4)
    with torch.no_grad():
        probs = model(torch.tensor([ids]))[0].softmax(-1)
    top = probs.topk(4, dim=-1)
    assert torch.equal(lens.top_ids[-1], top.indices)
    torch.testing.assert_close(lens.top_probs[-1], top.values)
    torch.testing.assert_close(lens.final_prob[-1], top.values[:, 0])
    assert not torch.equal(lens.top_probs[0], lens.top_probs[-1])  # earlier layers see something else


def test_cli_prints_the_table_and_writes_the_png(viz_ckpt, tmp_path, capsys):
    from PIL import Image

    assert main(["lens", str(viz_ckpt), "--text", "the cat sat on", "--top-k", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("position ") == 4 and out.count("layer   1") == 4
    width, height = Image.open(tmp_path / "lens.png").size
    assert (width, height) == (600, 300)  # 4 positions, 2 layers: the 6 x 3 in minimum at 100 dpi
    assert main(["lens", str(viz_ckpt), "--text", "the cat", "--top-k", "0"]) == 2
