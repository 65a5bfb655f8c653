"""The studio's prompt box (issue 30; docs/design.md section 7: ``prompt`` and ``negative-prompt`` for text runs),
in headless Chromium against a tiny text-conditioned run: the picture equals the Pipeline's for the same prompt,
negative prompt, guidance and seed; bad input is an error in ``status`` and the page keeps working."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import torchdiffusion as td
from helpers import launch_chromium
from torchdiffusion.data.shapes import write_shapes
from torchdiffusion.evaluation.viz import save_samples
from torchdiffusion.runs import config
from torchdiffusion.runs.train import train
from torchdiffusion.studio import Studio, StudioServer

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["data.size=16", "data.holdout=0", "model.net=unet_text", "model.channels=8", "model.channel_mult=[1,2]",
        "model.num_res_blocks=1", "model.attn_resolutions=[8]", "model.text_dim=16", "model.text_layers=1",
        "model.text_heads=2", "model.text_vocab=64", "model.text_length=16", "process.T=100", "train.steps=3",
        "train.batch=8", "train.lr=0.01", "train.warmup=0", "train.ema=0", "train.ckpt_every=0", "sample.steps=4",
        "train.threads=1"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("studio_text")
    write_shapes(root / "shapes", 40, n_test=4, size=16, seed=0)
    train(config.resolve(None, [f"data.name={root / 'shapes' / 'train'}", *TINY]), root / "run", progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def page(text_run):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'")
    server = StudioServer(Studio.from_run(text_run), "127.0.0.1", 0)
    server.start_background()
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        try:
            browser = launch_chromium(p, sync_api)
        except BaseException:  # a skip too: the server must not outlive the test
            server.stop()
            raise
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(server.url)
        pg.wait_for_selector("body[data-ready='1']", timeout=15000)
        yield pg
        browser.close()
    server.stop()
    assert not errors, f"uncaught errors in the page: {errors}"


def _generate(page, **values) -> str:
    for key, v in values.items():
        page.get_by_test_id(key).fill(str(v))
    before = int(page.get_by_test_id("status").get_attribute("data-runs") or 0)
    page.get_by_test_id("generate").click()
    page.wait_for_function("(b) => Number(document.querySelector('[data-testid=status]').dataset.runs || 0) > b",
                           arg=before, timeout=30000)
    return page.get_by_test_id("status").inner_text()


def _shown(page) -> np.ndarray:
    resp = page.request.get(page.get_by_test_id("result").evaluate("e => e.src"))
    assert resp.ok
    return np.asarray(Image.open(io.BytesIO(resp.body())).convert("RGBA"))


def test_prompt_box_samples_what_the_pipeline_samples(page, text_run, tmp_path):
    tid = page.get_by_test_id
    assert tid("prompt").count() == 1 and tid("negative-prompt").count() == 1 and tid("guidance").count() == 1
    assert tid("prompt").get_attribute("type") == "text"
    assert tid("class").count() == 0 and tid("all-classes").count() == 0  # a text run has no class
    status = _generate(page, prompt="a red star", **{"negative-prompt": "a blue circle"}, guidance=2, seed=1, n=4,
                       steps=4)
    assert "NFE 4" in status, status
    pipe = td.Pipeline.from_pretrained(text_run)
    x = pipe(4, steps=4, prompt="a red star", negative_prompt="a blue circle", guidance=2.0,
             generator=torch.Generator().manual_seed(1))
    want = save_samples(x, tmp_path / "want.png", value_range=tuple(pipe.config["run"]["value_range"]))
    first = _shown(page)
    np.testing.assert_array_equal(first, np.asarray(Image.open(want).convert("RGBA")))
    _generate(page, **{"negative-prompt": ""}, prompt="a red star")  # another setting, another picture
    assert not np.array_equal(_shown(page), first)


def test_prompt_box_bad_input_shows_an_error_and_the_page_keeps_working(page):
    status = _generate(page, prompt="a red star", **{"negative-prompt": "a circle"}, guidance=0, steps=4)
    assert status.startswith("error:") and "negative prompt needs guidance" in status, status
    status = _generate(page, prompt="", **{"negative-prompt": ""}, guidance=0, steps=4)  # empty: unconditional
    assert "NFE 4" in status, status
