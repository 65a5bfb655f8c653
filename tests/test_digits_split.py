"""Evaluation hygiene: every digits preset whose samples the real-data evaluator scores trains on exactly the
evaluator's training digits, so that the FD floor (held-out vs training digits) is measured on digits the model
never saw; the floor's bootstrap interval is deterministic and brackets the floor."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from torchdiffusion.evaluation import metrics
from torchdiffusion.runs import config, latent
from torchdiffusion.runs.train import train_dataset


def test_evaluator_holdout_is_the_presets_holdout() -> None:
    assert config.EVALUATOR_HOLDOUT == metrics.HOLDOUT


@pytest.mark.parametrize("preset", config.SCORED_DIGITS)
def test_scored_presets_train_on_the_evaluators_train_split(preset: str) -> None:
    cfg = config.resolve(preset)
    train = train_dataset(cfg)
    x_tr, y_tr, _, _ = metrics.digits_split(cfg["data"]["size"])
    assert torch.equal(train.x, x_tr)  # same digits in the same order: the held-out ones never enter training
    if train.y is not None:
        assert torch.equal(train.y, y_tr)


class _IdentityEncoder(nn.Module):
    """A stand-in autoencoder run's network: ``E(x) = x``, so a latent is the digit it encodes."""

    def encode(self, x: Tensor) -> tuple[Tensor, None]:
        return x, None


@pytest.mark.parametrize("preset", config.SCORED_LATENT)
def test_scored_latent_presets_train_on_latents_of_the_evaluators_train_split(preset: str, monkeypatch) -> None:
    ae_cfg = config.resolve("vae_digits")  # the autoencoder preset of benchmarks/latent.py: its data section
    monkeypatch.setattr(latent, "load_autoencoder", lambda run, ema=True: (_IdentityEncoder(), ae_cfg))
    monkeypatch.setattr(latent, "weights_sha256", lambda run: "fake")  # no weights file behind the fake run
    train = train_dataset(config.resolve(preset, ["data.autoencoder=fake-vae"]))
    x_tr, y_tr, _, _ = metrics.digits_split(ae_cfg["data"]["size"])
    c = train.meta["latent"]["scale"]
    assert c == pytest.approx(1 / float(x_tr.std()))  # the scale is measured on the training split only
    assert torch.equal(train.x, x_tr * c)  # latents of exactly the evaluator's training digits, in its order
    assert torch.equal(train.y, y_tr)


def test_floor_bootstrap_deterministic_and_brackets_the_floor() -> None:
    ev = metrics.DigitsEvaluator(8)
    a, b = ev.fd_floor_bootstrap(n_boot=50, seed=3), ev.fd_floor_bootstrap(n_boot=50, seed=3)
    assert a == b
    assert a.floor == pytest.approx(ev.fd_floor())
    assert a.se > 0 and a.lo < a.floor < a.hi and a.bias > 0
    with pytest.raises(ValueError, match="n_boot"):
        ev.fd_floor_bootstrap(n_boot=1)
