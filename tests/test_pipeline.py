"""td.Pipeline (docs/design.md section 5): load any diffusion run folder and sample it; run kinds are refused
with one line where a command does not apply."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torchdiffusion as td
from torchdiffusion.cli.main import main
from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs.train import train

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
TINY = ["model.channels=8", "model.num_res_blocks=1", "train.batch=16", "train.ckpt_every=0", "train.log_every=2",
        "train.threads=0", "train.warmup=2", "train.device=cpu", "train.steps=3", "sample.steps=4"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    train(config_mod.resolve("ring", ["train.steps=20", "model.hidden=16", "model.depth=1", "train.device=cpu",
                                      "train.ckpt_every=0"]), root / "ring", progress=False)
    train(config_mod.resolve("digits", TINY), root / "digits", progress=False)
    train(config_mod.resolve("ae_digits", TINY), root / "ae", progress=False)
    train(config_mod.resolve("latent", [*TINY, f"data.autoencoder={root / 'ae'}"]), root / "latent", progress=False)
    return root


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m_sde", "euler_maruyama"])
def test_deterministic_by_generator_and_batch_size_independent(runs, sampler):
    pipe = td.Pipeline.from_pretrained(runs / "ring")
    a = pipe(n=7, sampler=sampler, steps=6, generator=gen(1))
    b = pipe(n=7, sampler=sampler, steps=6, generator=gen(1), max_batch=3)
    c = pipe(n=7, sampler=sampler, steps=6, generator=gen(1), max_batch=1)
    assert a.shape == (7, 2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # float32 kernels differ by batch size
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)  # float32 kernels differ by batch size
    assert not torch.allclose(a, pipe(n=7, sampler=sampler, steps=6, generator=gen(2)))
    # a sample's noise does not depend on how many are drawn: the first 3 of 7 are the 3 of n=3
    first3 = pipe(n=3, sampler=sampler, steps=6, generator=gen(1))
    torch.testing.assert_close(a[:3], first3, rtol=1e-5, atol=1e-5)


def test_save_pretrained_round_trip(runs, tmp_path):
    pipe = td.Pipeline.from_pretrained(runs / "digits")
    pipe.save_pretrained(tmp_path / "copy")
    again = td.Pipeline.from_pretrained(tmp_path / "copy")
    x, y = (p(n=4, steps=3, class_labels=[1, 2, 3, 4], generator=gen(0)) for p in (pipe, again))
    torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert again.config["run"] == pipe.config["run"] and again.process.config() == pipe.process.config()


def test_defaults_come_from_the_run_and_labels_are_checked(runs):
    pipe = td.Pipeline.from_pretrained(runs / "digits")
    seen = []
    x = pipe(n=2, class_labels=5, generator=gen(0), callback=lambda d: seen.append(d["i"]))
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    assert len(seen) == 4  # sample.steps=4 with the run's ddim
    with pytest.raises(ValueError, match="class labels must be in 0..9"):
        pipe(n=2, class_labels=10)
    with pytest.raises(ValueError, match="one int or 2 labels"):
        pipe(n=2, class_labels=[1, 2, 3])
    with pytest.raises(ValueError, match="guidance needs class_labels"):
        pipe(n=2, guidance=1.0)
    with pytest.raises(ValueError, match="finite"):
        pipe(n=2, class_labels=1, guidance=float("nan"))
    with pytest.raises(ValueError, match="n must be"):
        pipe(n=0)
    with pytest.raises(ValueError, match="not class-conditional"):
        td.Pipeline.from_pretrained(runs / "ring")(n=2, class_labels=1)


def test_guidance_equals_the_cfg_wrapper(runs):
    pipe = td.Pipeline.from_pretrained(runs / "digits")
    a = pipe(n=3, steps=3, class_labels=7, guidance=2.0, generator=gen(4))
    b = pipe.generate(td.CFG(pipe.model, 2.0), 3, cond=torch.full((3,), 7), steps=3, generator=gen(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_default_guidance_is_the_runs_sample_guidance_when_conditioned(runs, tmp_path):
    """A preset's sample.guidance (shapes32: 1.0) is what pipe(...) and `sample` use when no w is given and the
    samples are conditioned; unconditioned samples get none."""
    pipe = td.Pipeline.from_pretrained(runs / "digits")
    pipe.config["sample"]["guidance"] = 2.0
    a = pipe(n=3, steps=3, class_labels=7, generator=gen(4))
    torch.testing.assert_close(a, pipe(n=3, steps=3, class_labels=7, guidance=2.0, generator=gen(4)), rtol=0, atol=0)
    assert not torch.allclose(a, pipe(n=3, steps=3, class_labels=7, guidance=0.0, generator=gen(4)))
    assert pipe.default_guidance(False) == 0.0 and pipe(n=2, steps=3, generator=gen(0)).shape == (2, 1, 8, 8)
    # the CLI: the run folder's config says w = 2.0
    import json
    import shutil

    run = tmp_path / "digits"
    shutil.copytree(runs / "digits", run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["sample"]["guidance"] = 2.0
    (run / "config.json").write_text(json.dumps(cfg))
    outs = {}
    for name, extra in (("default", []), ("w2", ["--guidance", "2"]), ("w0", ["--guidance", "0"])):
        out = tmp_path / f"{name}.npz"
        assert main(["sample", str(run), "--n", "3", "--seed", "3", "--steps", "3", "--class", "7", "--quiet",
                     "--out", str(out), *extra]) == 0
        outs[name] = np.load(out)["x"]
    np.testing.assert_array_equal(outs["default"], outs["w2"])
    assert not np.allclose(outs["default"], outs["w0"])


def test_latent_run_decodes_to_images(runs):
    pipe = td.Pipeline.from_pretrained(runs / "latent")
    x = pipe(n=2, steps=3, class_labels=[0, 1], generator=gen(0))
    assert x.shape == (2, 1, 16, 16)  # ae_digits images are 16x16; the latents are 4x4x4
    assert float(x.min()) >= -1 and float(x.max()) <= 1


def test_wrong_kind_is_refused_in_one_line(runs):
    with pytest.raises(ValueError, match="is an autoencoder run; a Pipeline needs a diffusion or latent run"):
        td.Pipeline.from_pretrained(runs / "ae")


def test_cli_sample_equals_the_pipeline(runs, tmp_path):
    out = tmp_path / "s.npz"
    assert main(["sample", str(runs / "digits"), "--n", "5", "--seed", "3", "--steps", "3", "--class", "2",
                 "--guidance", "0.5", "--out", str(out)]) == 0
    ref = td.Pipeline.from_pretrained(runs / "digits")(n=5, steps=3, class_labels=2, guidance=0.5, generator=gen(3))
    np.testing.assert_array_equal(np.load(out)["x"], ref.numpy())
    out2 = tmp_path / "r.npz"
    assert main(["sample", str(runs / "ring"), "--n", "6", "--seed", "9", "--sampler", "ddpm", "--steps", "5",
                 "--out", str(out2)]) == 0
    ref2 = td.Pipeline.from_pretrained(runs / "ring")(n=6, sampler="ddpm", steps=5, generator=gen(9))
    np.testing.assert_array_equal(np.load(out2)["x"], ref2.numpy())


def test_cli_refuses_the_wrong_run_kind(runs, capsys):
    assert main(["likelihood", str(runs / "ae")]) == 2
    assert "autoencoder run" in capsys.readouterr().err
    assert main(["eval", str(runs / "ae")]) == 2
    assert "autoencoder run" in capsys.readouterr().err


def test_latent_run_refuses_a_changed_autoencoder(runs, tmp_path):
    import shutil

    ae2, lat2 = tmp_path / "ae", tmp_path / "latent"
    shutil.copytree(runs / "ae", ae2)
    shutil.copytree(runs / "latent", lat2)
    cfg = td.Pipeline.from_pretrained(lat2).config
    assert cfg["run"]["latent"]["autoencoder_sha256"]
    # point the copy at the copied autoencoder, then change its weights
    import json
    c = json.loads((lat2 / "config.json").read_text())
    c["run"]["latent"]["autoencoder"] = str(ae2)
    (lat2 / "config.json").write_text(json.dumps(c))
    td.Pipeline.from_pretrained(lat2)(n=1, steps=2, class_labels=0, generator=gen(0))
    shutil.copy(runs / "digits" / "ema.safetensors", ae2 / "ema.safetensors")
    with pytest.raises(ValueError, match="autoencoder .* changed since the latent run was trained"):
        td.Pipeline.from_pretrained(lat2)(n=1, steps=2, class_labels=0, generator=gen(0))


@pytest.mark.slow
def test_guided_digits_are_read_as_their_class(tmp_path):
    """The digits preset (2000 steps, a few minutes), sampled through the Pipeline with class labels and
    guidance: the real-data classifier reads >= 90 % of them as the requested class."""
    from torchdiffusion.evaluation.metrics import DigitsEvaluator

    train(config_mod.resolve("digits", ["train.ckpt_every=0"]), tmp_path / "d", progress=False)
    pipe = td.Pipeline.from_pretrained(tmp_path / "d")
    y = torch.arange(10).repeat_interleave(10)
    x = pipe(n=100, sampler="ddim", steps=20, class_labels=y, guidance=1.0, generator=gen(0))
    assert DigitsEvaluator(8).accuracy(x, y) >= 0.9


def test_run_kinds_build_their_own_model_objects():
    from torchdiffusion.nets.autoencoder import Autoencoder
    from torchdiffusion.parameterization.guidance import Classifier
    from torchdiffusion.runs.build import build_model, run_kind
    from torchdiffusion.runs.train import build_trainer

    kinds = {p: run_kind(config_mod.resolve(p)) for p in ("digits", "ae_digits", "classifier_digits", "latent")}
    assert kinds == {"digits": "diffusion", "ae_digits": "autoencoder", "classifier_digits": "classifier",
                     "latent": "latent"}
    assert isinstance(build_model(config_mod.resolve("ae_digits"), (1, 16, 16)), Autoencoder)  # no Denoiser around it
    clf = build_model(config_mod.resolve("classifier_digits"), (1, 8, 8), 10)
    assert isinstance(clf, Classifier)
    assert clf.logits(torch.zeros(2, 1, 8, 8), torch.tensor([5.0, 9.0])).shape == (2, 10)
    with pytest.raises(ValueError, match="loss 'dsm' does not train an autoencoder run"):
        build_trainer(config_mod.resolve("ae_digits", [*TINY, "loss.name=dsm"]), "unused", progress=False)
    with pytest.raises(ValueError, match="loss 'ae' does not train a diffusion run"):
        build_trainer(config_mod.resolve("digits", [*TINY, "loss.name=ae"]), "unused", progress=False)
