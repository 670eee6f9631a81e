"""`tformer attention`'s explorer page in a real headless chromium: hovering a token shows the stored weights it
gives and receives, the layer/head/rollout selectors switch maps, a 1,024-token page opens and hovers quickly."""

import base64
import json
import os
import re
import struct
import time

import pytest
import torch

from tformer.cli import main
from tformer.viz.explorer import dequantize, quantize
from tests.viz.browser import Browser, chromium

TEXT = "the cat sat on a mat and the dog ran to the park while birds sang in trees"


def test_quantize_round_trips_to_the_nearest_byte():
    w = torch.rand(7, 7).tril()
    w = w / w.sum(-1, keepdim=True)
    back = dequantize(quantize(w), 7)
    assert len(quantize(w)) == 7 * 8 // 2
    assert (back - w).abs().max() <= 0.5 / 255 + 1e-7


def _stored(page) -> dict:
    text = page.read_text(encoding="utf-8")
    data = re.search(r'<script id="data" type="application/json">(.*?)</script>', text, re.S).group(1)
    return json.loads(data.replace("<\\/", "</"))


def _map(data, key) -> torch.Tensor:
    return dequantize(base64.b64decode(data["maps"][key]), len(data["tokens"]))


def _hover(browser, i):
    """Move the mouse (a real input event) onto token i; the [given, received] weights each token then shows."""
    x, y = browser.evaluate(f"(() => {{ const s = document.querySelectorAll('#tokens span')[{i}]; "
                            "s.scrollIntoView({block: 'center'}); const r = s.getBoundingClientRect(); "
                            "return [r.left + r.width / 2, r.top + r.height / 2]; })()")
    browser.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
    assert browser.evaluate("document.body.dataset.hover") == str(i)
    return browser.evaluate("[...document.querySelectorAll('#tokens span')]"
                            ".map(s => [+s.dataset.given, +s.dataset.received])")


def _select(browser, **values):
    for name, value in values.items():
        browser.evaluate(f"(() => {{ const s = document.getElementById('{name}'); s.value = '{value}'; "
                         "s.dispatchEvent(new Event('change')); })()")


@pytest.fixture(scope="module")
def page(viz_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("explorer")
    assert main(["attention", str(viz_ckpt), "--text", TEXT, "--out", str(out), "--layer", "1", "--head", "3"]) == 0
    return out / "attention.html"


def test_page_holds_every_map_and_the_lens(page, viz_ckpt, viz_tokenizer):
    from tformer.checkpoint import load
    from tformer.viz.maps import attention_weights

    data = _stored(page)
    ids = viz_tokenizer.encode(TEXT)
    assert len(data["tokens"]) == len(ids)
    assert len(data["maps"]) == 2 * (6 + 2)  # per layer: 6 heads, the mean, the rollout
    w = attention_weights(load(viz_ckpt), ids)
    assert (_map(data, "1:3") - w[1, 3]).abs().max() <= 0.5 / 255 + 1e-6
    assert (_map(data, "0:mean") - w[0].mean(0)).abs().max() <= 0.5 / 255 + 1e-6
    assert len(data["lens"]["top"]) == 2 and len(data["lens"]["top"][0]) == len(ids)


# CI installs Debian's chromium (.ci/run): there a missing browser fails the test instead of skipping it
needs_chromium = pytest.mark.skipif(chromium() is None and not os.environ.get("CI"),
                                    reason="no chromium (CI installs Debian's package)")


@needs_chromium
def test_hover_shows_the_stored_weights_in_chromium(page):
    data = _stored(page)
    browser = Browser(page.as_uri())
    try:
        browser.wait_for("document.body.dataset.ready === '1'")
        for view, layer, head, key in [("attn", 0, 0, "0:0"), ("attn", 1, 4, "1:4"), ("attn", 1, "mean", "1:mean"),
                                        ("rollout", 1, 0, "rollout:1")]:
            _select(browser, view=view, layer=layer, head=head)
            assert browser.evaluate("document.body.dataset.layer") == str(layer)
            expected = (_map(data, key) * 255).round().int()
            for i in (0, 5, len(data["tokens"]) - 1):
                shown = torch.tensor(_hover(browser, i))
                assert torch.equal(shown[:, 0], expected[i]), (key, i)  # the weights token i gives
                assert torch.equal(shown[:, 1], expected[:, i]), (key, i)  # and receives
        assert browser.evaluate("document.querySelectorAll('#grid canvas').length") == 6 + 1
        browser.evaluate("document.getElementById('lensbox').open = true")
        assert browser.wait_for("document.querySelectorAll('#lens tr').length") == 1 + 2
        png = browser.screenshot()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1200, 900)
    finally:
        browser.close()


@needs_chromium
def test_a_1024_token_page_stays_responsive(viz_ckpt, tmp_path):
    text = " ".join(TEXT.split() * 57)
    assert main(["attention", str(viz_ckpt), "--text", text, "--out", str(tmp_path)]) == 0
    data = _stored(tmp_path / "attention.html")
    T = len(data["tokens"])
    assert T >= 1024
    browser = Browser((tmp_path / "attention.html").as_uri())
    try:
        browser.wait_for("document.body.dataset.ready === '1'", timeout=60)
        start = time.perf_counter()
        for i in range(0, T, T // 10)[:10]:
            _hover(browser, i)
        hover_s = (time.perf_counter() - start) / 10
        expected = (_map(data, "0:0") * 255).round().int()
        assert torch.equal(torch.tensor(_hover(browser, T - 1))[:, 0], expected[T - 1])
        start = time.perf_counter()
        _select(browser, layer=1, head=2)
        switch_s = time.perf_counter() - start
        assert hover_s < 0.25 and switch_s < 2.0, (hover_s, switch_s)
    finally:
        browser.close()
