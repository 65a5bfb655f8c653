"""Evaluation hygiene: every digits preset whose samples the real-data evaluator scores trains on exactly the
evaluator's training digits, so that the FD floor (held-out vs training digits) is measured on digits the model
never saw; the floor's bootstrap interval is deterministic and brackets the floor."""

from __future__ import annotations

import pytest
import torch

from torchdiffusion.evaluation import metrics
from torchdiffusion.runs import config
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


def test_floor_bootstrap_deterministic_and_brackets_the_floor() -> None:
    ev = metrics.DigitsEvaluator(8)
    a, b = ev.fd_floor_bootstrap(n_boot=50, seed=3), ev.fd_floor_bootstrap(n_boot=50, seed=3)
    assert a == b
    assert a.floor == pytest.approx(ev.fd_floor())
    assert a.se > 0 and a.lo < a.floor < a.hi and a.bias > 0
    with pytest.raises(ValueError, match="n_boot"):
        ev.fd_floor_bootstrap(n_boot=1)
