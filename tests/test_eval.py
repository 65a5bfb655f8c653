"""``torchdiffusion eval``: exact-density NLL for toy runs, errors for misuse."""

import json

import pytest
import torch

from torchdiffusion import cli
from torchdiffusion.data.datasets import toy_density
from torchdiffusion.runs import config
from torchdiffusion.runs.train import train


@pytest.fixture(scope="module")
def ring_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ring")
    cfg = config.resolve("ring", ["train.steps=400", "train.batch=128", "train.ckpt_every=0"])
    train(cfg, out, progress=False)
    return out


def test_eval_toy_reports_exact_nll(ring_run, tmp_path):
    path = tmp_path / "e.json"
    assert cli.main(["eval", str(ring_run), "--n", "1000", "--steps", "20", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    # the exact-sample reference is the ring's entropy, up to Monte Carlo error
    dens = toy_density("ring")
    big, _ = dens.sample(200_000, torch.Generator().manual_seed(5))
    entropy = float(-dens.log_prob(big).mean())
    assert abs(res["exact_nll"] - entropy) < 4 * res["exact_nll_se"]
    # a model trained for 400 steps is worse than exact samples, and far better than its N(0, I) prior
    prior_nll = float(-dens.log_prob(torch.randn(1000, 2, generator=torch.Generator().manual_seed(6),
                                                 dtype=torch.float64)).mean())
    assert res["exact_nll"] < res["nll"] < prior_nll / 2 and res["nll_se"] > 0
    assert res["samples"] == 1000 and res["steps"] == 20


def test_eval_errors(ring_run, capsys):
    for argv, msg in ((["--guidance", "1"], "class-conditional"), (["--steps", "0"], "--steps must be >= 1"),
                      (["--sampler", "nope"], "unknown sampler")):
        assert cli.main(["eval", str(ring_run), *argv]) == 2
        assert msg in capsys.readouterr().err
