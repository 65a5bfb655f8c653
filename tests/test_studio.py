"""``torchdiffusion studio`` (docs/design.md section 7), tested in a real browser: Playwright for Python drives the
system's headless Chromium (Debian package ``chromium``; installed with apt-get when we are root and it is
missing) against studios of two tiny runs trained here (a 2-D ring and class-conditional digits)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import torchdiffusion as td
from helpers import launch_chromium
from torchdiffusion.cli.main import main
from torchdiffusion.evaluation.viz import save_samples
from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs.latent import dataset_from_config
from torchdiffusion.runs.train import train
from torchdiffusion.studio import Studio, StudioServer
from torchdiffusion.studio import app as studio_app

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
TINY = ["model.channels=8", "model.num_res_blocks=1", "train.batch=16", "train.ckpt_every=0", "train.log_every=2",
        "train.threads=0", "train.warmup=2", "train.device=cpu", "train.steps=3", "sample.steps=4"]
TESTIDS = ("sampler", "steps", "seed", "generate", "result", "status")


# --- set-up: a browser, two runs, two servers ----------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed: pip install -e '.[dev]'")
    with sync_api.sync_playwright() as p:
        b = launch_chromium(p, sync_api)
        yield b
        b.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("studio")
    train(config_mod.resolve("ring", ["train.steps=20", "model.hidden=16", "model.depth=1", "train.device=cpu",
                                      "train.ckpt_every=0"]), root / "ring", progress=False)
    train(config_mod.resolve("digits", TINY), root / "digits", progress=False)
    return root


@pytest.fixture(scope="module")
def servers(runs):
    out = {}
    for name in ("ring", "digits"):
        server = StudioServer(Studio.from_run(runs / name), "127.0.0.1", 0)
        server.start_background()
        out[name] = server
    yield out
    for server in out.values():
        server.stop()


@pytest.fixture
def open_page(browser, servers):
    """``open_page(name)``: a fresh page on that run's studio, ready; no uncaught page errors allowed."""
    pages, errors = [], []

    def open_(name: str):
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(servers[name].url)
        page.wait_for_selector("body[data-ready='1']", timeout=15000)
        pages.append(page)
        return page
    yield open_
    for page in pages:
        page.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def tid(page, name: str):
    return page.get_by_test_id(name)


def runs_done(page) -> int:
    """How many runs (generate or compare) have finished in the page, with a result or an error."""
    return int(tid(page, "status").get_attribute("data-runs") or 0)


def settle(page, before: int) -> str:
    """Wait until the page has finished more than ``before`` runs; the status text."""
    page.wait_for_function("(b) => Number(document.querySelector('[data-testid=status]').dataset.runs || 0) > b",
                           arg=before, timeout=30000)
    return tid(page, "status").inner_text()


def generate(page, **values) -> str:
    for key, v in values.items():
        if key == "sampler":
            tid(page, "sampler").select_option(v)
        else:
            tid(page, key).fill(str(v))
    before = runs_done(page)
    tid(page, "generate").click()
    return settle(page, before)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))


def fetch(page, url: str) -> bytes:
    resp = page.request.get(url)
    assert resp.ok, url
    return resp.body()


def shown(page, testid: str = "result") -> np.ndarray:
    return pixels(fetch(page, tid(page, testid).evaluate("e => e.src")))


# --- tests ---------------------------------------------------------------------------------------------------
def test_every_testid_present(open_page):
    page = open_page("digits")
    for name in (*TESTIDS, "class", "guidance"):
        assert tid(page, name).count() == 1, name
    assert tid(page, "sampler").evaluate("e => e.tagName") == "SELECT"
    assert tid(page, "result").evaluate("e => e.tagName") == "IMG"
    for name in ("steps", "seed"):
        assert tid(page, name).get_attribute("type") == "number"
    assert "ddim" in tid(page, "sampler").evaluate("e => [...e.options].map(o => o.value)")
    page = open_page("ring")  # unconditional 2-D run: no class or guidance, a score field instead
    for name in TESTIDS:
        assert tid(page, name).count() == 1, name
    assert tid(page, "class").count() == 0 and tid(page, "guidance").count() == 0
    page.wait_for_function("document.querySelector('[data-testid=scorefield]').naturalWidth > 0", timeout=20000)


def test_generate_equals_the_pipeline_and_is_reproducible(open_page, runs, tmp_path):
    page = open_page("digits")
    status = generate(page, sampler="ddim", steps=10, seed=1, n=16, **{"class": 3})
    assert re.search(r"NFE 10 · \d+\.\d\d s", status), status
    pipe = td.Pipeline.from_pretrained(runs / "digits")
    x = pipe(16, sampler="ddim", steps=10, class_labels=3, generator=torch.Generator().manual_seed(1))
    expected = save_samples(x, tmp_path / "expected.png", value_range=tuple(pipe.config["run"]["value_range"]))
    first = shown(page)
    np.testing.assert_array_equal(first, pixels(expected.read_bytes()))
    cli_png = tmp_path / "cli.png"  # and the same picture as the sample command's
    assert main(["sample", str(runs / "digits"), "--sampler", "ddim", "--steps", "10", "--seed", "1", "--n", "16",
                 "--class", "3", "--out", str(cli_png), "--quiet"]) == 0
    np.testing.assert_array_equal(first, pixels(cli_png.read_bytes()))
    # the download links: the same PNG, and the samples themselves as .npz
    assert fetch(page, tid(page, "download-png").evaluate("e => e.href")) == expected.read_bytes()
    npz = np.load(io.BytesIO(fetch(page, tid(page, "download-npz").evaluate("e => e.href"))))
    np.testing.assert_array_equal(npz["x"], x.numpy())
    # the reverse process was streamed: x_t and x0 pictures of the last step
    assert tid(page, "step").text_content().startswith("step 10")
    assert tid(page, "xt").get_attribute("src").startswith("data:image/png")
    assert tid(page, "x0").get_attribute("src").startswith("data:image/png")
    # same settings, same image; another seed, another image
    generate(page, seed=1)
    np.testing.assert_array_equal(shown(page), first)
    generate(page, seed=2)
    assert not np.array_equal(shown(page), first)


def test_2d_generate_equals_the_pipeline_scatter(open_page, runs, tmp_path):
    page = open_page("ring")
    status = generate(page, sampler="ddim", steps=10, seed=1, n=300)
    assert "NFE 10" in status, status
    pipe = td.Pipeline.from_pretrained(runs / "ring")
    x = pipe(300, sampler="ddim", steps=10, generator=torch.Generator().manual_seed(1))
    data = dataset_from_config(pipe.config["data"]).x[:2000]
    expected = save_samples(x, tmp_path / "expected.png", data=data, title="ddim, 10 NFE")
    np.testing.assert_array_equal(shown(page), pixels(expected.read_bytes()))
    before = tid(page, "scorefield").get_attribute("src")
    tid(page, "sigma").fill("0")  # the noise-level slider: sigma = 1
    page.wait_for_function("(b) => document.querySelector('[data-testid=scorefield]').src !== b", arg=before,
                           timeout=20000)
    assert "t = " in page.locator("#score-note").inner_text()


def test_compare_shows_two_images_and_their_rms(open_page):
    page = open_page("digits")
    tid(page, "steps").fill("6")
    tid(page, "sampler-b").select_option("ddpm")
    tid(page, "steps-b").fill("6")
    before = runs_done(page)
    tid(page, "compare").click()
    status = settle(page, before)
    assert "RMS difference" in status, status
    for name in ("compare-a", "compare-b"):
        assert tid(page, name).evaluate("e => e.complete && e.naturalWidth") > 0
    rms = float(tid(page, "rms").inner_text())
    assert rms > 0 and np.isfinite(rms)
    # the same setting twice from the same noise: no difference
    tid(page, "sampler-b").select_option("ddim")
    before = runs_done(page)
    tid(page, "compare").click()
    settle(page, before)
    assert float(tid(page, "rms").inner_text()) == 0.0


def test_bad_values_show_an_error_and_the_page_keeps_working(open_page, tmp_path):
    page = open_page("digits")
    status = generate(page, steps=0, seed=1)
    assert status.startswith("error:") and "steps" in status, status
    assert tid(page, "status").get_attribute("data-state") == "error"
    status = generate(page, steps=5, **{"class": 99})
    assert "error:" in status and "class" in status, status
    status = generate(page, steps="", **{"class": 2})
    assert "error:" in status and "steps must be a whole number" in status, status
    status = generate(page, steps=5, guidance=1, **{"class": ""})
    assert "error:" in status and "guidance needs a class" in status, status
    status = generate(page, guidance=0.5, n=8, **{"class": 2})
    assert "NFE 5" in status, status  # guided: one batched call per step
    # a visual anagram (class-conditional image run): pairs side by side
    page.get_by_test_id("view").select_option("rot180")
    status = generate(page, class2=7)
    assert "NFE 5" in status, status
    page.screenshot(path=str(tmp_path / "studio.png"), full_page=True)
    target = os.environ.get("TD_STUDIO_SCREENSHOT")  # e.g. docs/studio.png
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "studio.png", target)
    assert Image.open(tmp_path / "studio.png").size[0] == 1280


def test_another_origin_cannot_start_or_read_anything_but_the_page_can(open_page, servers):
    """In Chromium: a page of another origin (the ring studio) asks the digits studio for a job and its info, the
    ways a browser lets it try (JSON with a preflight, a no-cors text/plain "simple request", a plain GET); nothing
    starts and nothing is read; the digits page itself still generates (the other tests)."""
    page = open_page("ring")
    studio = servers["digits"].studio
    before = studio._next_id
    outcome = page.evaluate("""async (url) => {
        const body = JSON.stringify({sampler: "ddim", grid: "", steps: "2", seed: "0", n: "2", class: "1"});
        const out = [];
        for (const init of [{method: "POST", headers: {"Content-Type": "application/json"}, body},
                            {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}, body}]) {
          try { const r = await fetch(url + "api/generate", init); out.push(r.type + " " + r.status); }
          catch (e) { out.push("failed"); }
        }
        try { await (await fetch(url + "api/info")).json(); out.push("read"); } catch (e) { out.push("failed"); }
        return out;
    }""", servers["digits"].url)
    assert outcome == ["failed", "opaque 0", "failed"], outcome
    for _ in range(100):  # a job that started would hold the model until it stores its result
        if not studio.lock.locked():
            break
        time.sleep(0.05)
    assert studio._next_id == before


def test_sampling_runs_off_the_request_thread_one_job_at_a_time(servers, monkeypatch):
    studio = servers["digits"].studio
    body = json.dumps({"sampler": "ddim", "grid": "", "steps": "3", "seed": "0", "n": "2", "class": "1"}).encode()

    def post() -> list[dict]:
        req = urllib.request.Request(servers["digits"].url + "api/generate", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return [json.loads(line) for line in resp]
        except urllib.error.HTTPError as e:
            return [json.loads(line) for line in e]

    threads = []
    inner = studio.counter.model
    monkeypatch.setattr(studio.counter, "model", _Spy(inner, threads))
    assert post()[-1]["type"] == "done"
    assert threads and set(threads) == {"studio-worker"}
    monkeypatch.setattr(studio_app, "WAIT_SECONDS", 0.2)
    with studio.lock:  # another job holds the model
        msgs = post()
    assert msgs == [{"type": "error", "message": "the model is busy with another request; try again when it finishes"}]
    assert post()[-1]["type"] == "done"


def test_sampling_threads_are_the_pipelines_setting(runs, monkeypatch, capsys):
    """The studio samples with the Pipeline's thread setting (the run's sample.threads, or --threads), restored
    afterwards, and shows no progress bar on the server's console."""
    seen = []

    class Probe:
        def __init__(self, model):
            self.model = model

        def predict(self, *args):
            seen.append(torch.get_num_threads())
            return self.model.predict(*args)

    s = studio_app.Settings("ddim", None, 2, 0, 2)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal, where a bar would show by default
    for threads, expected in ((None, 1), (2, 2)):  # the run's sample.threads is 1 by default
        studio = Studio.from_run(runs / "ring", threads=threads)
        assert studio.pipe.threads == threads
        monkeypatch.setattr(studio.counter, "model", Probe(studio.counter.model))
        torch.set_num_threads(3)
        seen.clear()
        studio.sample(s)
        assert seen and set(seen) == {expected}
        assert torch.get_num_threads() == 3
        studio.close()
    torch.set_num_threads(1)
    assert capsys.readouterr().err == ""
    assert main(["studio", str(runs / "ring"), "--threads", "-1"]) == 2
    assert "--threads" in capsys.readouterr().err


class _Spy:
    """A model that records the thread of every call."""

    def __init__(self, model, threads: list):
        self.model, self.threads = model, threads

    def predict(self, *args):
        self.threads.append(threading.current_thread().name)
        return self.model.predict(*args)


def test_command_prints_the_address_and_stops_on_ctrl_c(runs):
    # a background job (nohup, `cmd &` without job control) inherits SIGINT ignored; a terminal's Ctrl-C does not
    proc = subprocess.Popen([sys.executable, "-m", "torchdiffusion", "studio", str(runs / "ring"), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stdout.readline()
        m = re.fullmatch(r"serving (http://127\.0\.0\.1:(\d+)/)\n", line)
        assert m, line
        with urllib.request.urlopen(m.group(1), timeout=10) as resp:
            assert b'data-testid="generate"' in resp.read()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and out.strip() == "stopped"


def test_command_refuses_what_it_cannot_serve(runs, capsys, tmp_path):
    assert main(["studio", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["studio", str(runs / "ring"), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err


# --- everyday use (issue 29) ---------------------------------------------------------------------------------
def visible_images_loaded(page) -> bool:
    """No broken-image box: every image that is shown has loaded a picture."""
    return page.evaluate("[...document.images].filter(i => i.offsetParent !== null)"
                         ".every(i => i.complete && i.naturalWidth > 0)")


def test_no_broken_image_and_2d_panels_say_what_is_data(open_page):
    page = open_page("digits")
    assert visible_images_loaded(page)
    assert not tid(page, "result").is_visible() and tid(page, "result-empty").is_visible()
    assert not tid(page, "xt").is_visible() and not tid(page, "x0").is_visible()
    generate(page, steps=3, n=4)
    assert tid(page, "result").is_visible() and not tid(page, "result-empty").is_visible()
    assert tid(page, "xt").is_visible() and visible_images_loaded(page)
    page = open_page("ring")  # the data is drawn for reference only once there are samples, and labelled
    page.wait_for_function("document.querySelector('[data-testid=scorefield]').naturalWidth > 0", timeout=20000)
    assert visible_images_loaded(page)
    assert not tid(page, "xt").is_visible() and not tid(page, "legend").is_visible()
    generate(page, steps=3, n=50)
    assert tid(page, "xt").is_visible() and tid(page, "xt").evaluate("e => e.tagName") == "CANVAS"
    legend = tid(page, "legend").inner_text()
    assert "training data" in legend and "samples" in legend
    assert visible_images_loaded(page)


def test_class_empty_means_unconditional_as_the_hint_says(open_page, runs, servers, tmp_path):
    page = open_page("digits")  # trained with label dropout (loss.p_uncond = 0.1): an unconditional model exists
    assert tid(page, "class").input_value() == ""
    assert "class empty: unconditional" in tid(page, "class-hint").inner_text()
    status = generate(page, sampler="ddim", steps=4, seed=5, n=6)
    assert "unconditional" in status, status
    pipe = td.Pipeline.from_pretrained(runs / "digits")
    x = pipe(6, sampler="ddim", steps=4, generator=torch.Generator().manual_seed(5))
    expected = save_samples(x, tmp_path / "u.png", value_range=tuple(pipe.config["run"]["value_range"]))
    np.testing.assert_array_equal(shown(page), pixels(expected.read_bytes()))
    # the same weights said to be trained without label dropout: a class is needed, the page says so
    cfg = json.loads(json.dumps(pipe.config))
    cfg["loss"]["p_uncond"] = 0.0
    studio = Studio(td.Pipeline(pipe.model, cfg), name="no-uncond")
    assert studio.defaults().klass == 0
    with pytest.raises(studio_app.StudioError, match="no unconditional model"):
        studio.parse({"sampler": "ddim", "steps": "2", "seed": "0", "n": "2", "class": ""})
    server = StudioServer(studio, "127.0.0.1", 0)
    server.start_background()
    servers["no-uncond"] = server  # stopped with the others
    page = open_page("no-uncond")
    assert tid(page, "class").input_value() == "0"
    assert "a class is needed" in tid(page, "class-hint").inner_text()
    status = generate(page, steps=2, n=2, **{"class": ""})
    assert "error:" in status and "no unconditional model" in status, status


def test_class2_only_with_an_anagram(open_page):
    page = open_page("digits")
    assert not tid(page, "class2").is_visible()
    tid(page, "view").select_option("rot180")
    assert tid(page, "class2").is_visible()
    tid(page, "view").select_option("")
    assert not tid(page, "class2").is_visible()


def test_grid_default_names_its_grid(open_page, runs):
    page = open_page("digits")
    pipe = td.Pipeline.from_pretrained(runs / "digits")
    name = pipe.config["sample"].get("grid") or td.samplers.grids.default_for(pipe.model.process)
    first = tid(page, "grid").evaluate("e => e.options[0].text")
    assert first == f"default ({name})" and tid(page, "grid").input_value() == ""
    assert tid(page, "grid-b").evaluate("e => e.options[0].text") == first
    assert f"grid default ({name})" in generate(page, steps=2, n=2)


def test_grid_default_names_a_stored_fit_where_one_applies(open_page, runs, servers, tmp_path):
    run = tmp_path / "fitted"  # a copy: the other tests' run keeps no fits
    shutil.copytree(runs / "digits", run)
    td.Pipeline.from_pretrained(run).fit("ddim", 3, n_pilot=16, max_runs=3)
    server = StudioServer(Studio.from_run(run), "127.0.0.1", 0)
    server.start_background()
    servers["fitted"] = server
    page = open_page("fitted")
    tid(page, "sampler").select_option("ddim")
    tid(page, "steps").fill("3")
    assert tid(page, "grid").evaluate("e => e.options[0].text") == "default (fitted: fits/ddim-3.json)"
    status = generate(page, n=2)
    assert "grid default (fitted: fits/ddim-3.json)" in status and "using" in status, status
    tid(page, "steps").fill("4")  # no fit for 4 steps: the run's own grid
    own = td.samplers.grids.default_for(server.studio.denoiser.process)
    assert tid(page, "grid").evaluate("e => e.options[0].text") == f"default ({own})"
    assert f"grid default ({own})" in generate(page, n=2)


def test_compare_shows_both_reverse_processes(open_page):
    page = open_page("digits")
    tid(page, "steps").fill("5")
    tid(page, "sampler-b").select_option("ddpm")
    tid(page, "steps-b").fill("5")
    before = runs_done(page)
    tid(page, "compare").click()
    settle(page, before)
    srcs = {}
    for which in ("a", "b"):
        assert tid(page, f"step-{which}").inner_text().startswith("step 5")
        for view in ("xt", "x0"):
            loc = tid(page, f"{view}-{which}")
            assert loc.is_visible() and loc.get_attribute("src").startswith("data:image/png")
            srcs[view, which] = loc.get_attribute("src")
    assert srcs["xt", "a"] != srcs["xt", "b"]  # ddim and ddpm end in different samples
    assert visible_images_loaded(page)


def test_sampler_options_come_from_the_registry_and_are_used(open_page, runs, tmp_path):
    offered = studio_app.sampler_options()
    assert set(offered) == set(td.samplers.names())
    assert {o["name"] for o in offered["ddim"]} >= {"eta"} and not any(o["name"] == "eta" for o in offered["ddpm"])
    for name, opts in offered.items():  # each offered option, at its default, is one td.sample accepts
        td.samplers.check_options(name, td.samplers.get(name).fn, {o["name"]: o["default"] for o in opts})
    page = open_page("digits")
    tid(page, "sampler").select_option("ddim")
    assert tid(page, "eta").is_visible() and tid(page, "eta").input_value() == "0"
    for other in ("ddpm", "dpmpp_2m"):  # shown only where the chosen sampler has it
        tid(page, "sampler").select_option(other)
        assert tid(page, "eta").count() == 0
    tid(page, "sampler").select_option("dpmpp_2m_sde")
    assert tid(page, "eta").input_value() == "1"  # that sampler's own default
    tid(page, "sampler").select_option("ddim")
    tid(page, "eta").fill("1")
    status = generate(page, steps=5, seed=1, n=8, **{"class": 3})
    assert "ddim eta=1," in status, status
    pipe = td.Pipeline.from_pretrained(runs / "digits")
    x = pipe(8, sampler="ddim", steps=5, class_labels=3, eta=1.0, generator=torch.Generator().manual_seed(1))
    expected = save_samples(x, tmp_path / "eta.png", value_range=tuple(pipe.config["run"]["value_range"]))
    with_eta = shown(page)
    np.testing.assert_array_equal(with_eta, pixels(expected.read_bytes()))
    tid(page, "eta").fill("0")
    generate(page)
    assert not np.array_equal(shown(page), with_eta)
    # compare: B has its own options (ddim eta 0 against ddim eta 1 from the same noise)
    tid(page, "sampler-b").select_option("ddim")
    tid(page, "steps-b").fill("5")
    tid(page, "eta-b").fill("1")
    before = runs_done(page)
    tid(page, "compare").click()
    settle(page, before)
    assert "eta=1" in page.locator("#compare-b-label").inner_text()
    assert float(tid(page, "rms").inner_text()) > 0
    studio = Studio.from_run(runs / "digits")
    with pytest.raises(studio_app.StudioError, match="has no option 'eta'"):
        studio.parse({"sampler": "ddpm", "steps": "2", "seed": "0", "n": "2", "opt_eta": "1"})
    with pytest.raises(studio_app.StudioError, match="eta must be a number"):
        studio.parse({"sampler": "ddim", "steps": "2", "seed": "0", "n": "2", "opt_eta": "x"})


def test_all_classes_grid_has_one_row_per_class(open_page, runs, tmp_path):
    page = open_page("digits")
    for key, v in {"steps": 3, "seed": 2, "n": 2, "guidance": 0}.items():
        tid(page, key).fill(str(v))
    before = runs_done(page)
    tid(page, "all-classes").click()
    status = settle(page, before)
    assert "all 10 classes" in status and "10 classes × 2 samples" in status, status
    pipe = td.Pipeline.from_pretrained(runs / "digits")
    labels = torch.arange(10).repeat_interleave(2)
    x = pipe(20, sampler="ddim", steps=3, class_labels=labels, generator=torch.Generator().manual_seed(2))
    expected = save_samples(x, tmp_path / "all.png", nrow=2, value_range=tuple(pipe.config["run"]["value_range"]))
    np.testing.assert_array_equal(shown(page), pixels(expected.read_bytes()))
    assert tid(page, "all-classes").count() == 1
    assert open_page("ring").get_by_test_id("all-classes").count() == 0  # unconditional runs: no such grid


def test_history_shows_earlier_generations_again(open_page):
    page = open_page("digits")
    generate(page, steps=3, seed=1, n=4)
    first = shown(page)
    generate(page, seed=2)
    second = shown(page)
    items = tid(page, "history-item")
    assert items.count() == 2 and "seed 2" in items.nth(0).get_attribute("title")
    assert "seed 1" in items.nth(1).get_attribute("title")
    before = runs_done(page)
    items.nth(1).click()
    status = settle(page, before)
    assert status.startswith("shown again") and "seed 1" in status
    np.testing.assert_array_equal(shown(page), first)
    assert tid(page, "seed").input_value() == "1"  # its settings are back in the form
    np.testing.assert_array_equal(pixels(fetch(page, items.nth(0).locator("img").evaluate("e => e.src"))), second)


def test_stop_cancels_a_running_job(open_page, servers):
    page = open_page("digits")
    studio = servers["digits"].studio
    assert tid(page, "stop").is_disabled()
    for key, v in {"steps": 2000, "n": 256, "seed": 0}.items():
        tid(page, key).fill(str(v))
    before = runs_done(page)
    tid(page, "generate").click()
    page.wait_for_function("document.querySelector('[data-testid=step]').textContent.startsWith('step')",
                           timeout=20000)
    tid(page, "stop").click()
    status = settle(page, before)
    m = re.fullmatch(r"stopped after step (\d+)", status)
    assert m and int(m.group(1)) < 2000, status
    assert tid(page, "status").get_attribute("data-state") == "stopped"
    assert not studio.lock.locked() and tid(page, "stop").is_disabled()
    assert tid(page, "history-item").count() == 0  # nothing was stored
    assert "NFE 2" in generate(page, steps=2, n=2)  # and the page keeps working
