"""Trained score models on toys: NCSN + annealed Langevin, an energy model, a VE SDE model (THEORY T-SM-6,
T-NCSN-1, T-EBM-1, T-SDE-8), the ncsn/esm/ssm training losses, presets and the ``scorefield`` command.

Tolerances: a model trained for seconds on CPU is not exact. Sample quality is measured as the mean NLL of
samples under the true toy density minus that of exact samples (the "NLL gap", in nats); each test states
the gap it allows. Longer runs with tighter gaps are marked slow.
"""

from __future__ import annotations

import math

import pytest
import torch

import torchdiffusion as td
from torchdiffusion.data.datasets import toy_density
from torchdiffusion.losses.score import ncsn_loss, ncsn_sigmas, noisy_score_matching_loss, process_ncsn_sigmas
from torchdiffusion.nets.energy import EnergyScoreNet
from torchdiffusion.nets.mlp import MLP
from torchdiffusion.runs import config as C
from torchdiffusion.runs.train import build_trainer, ema_model

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def train_preset(preset: str, out, steps: int, sets: list[str]):
    over = [f"train.steps={steps}", "train.ckpt_every=0", "train.warmup=50", "train.ema=0.99", *sets]
    tr = build_trainer(C.resolve(preset, over), out, progress=False)
    tr.run()
    return tr


def nll_gap(model, sampler: str, steps: int, n: int = 1000, toy: str = "gmm", **opts) -> float:
    dens = toy_density(toy)
    g = gen(0)
    x = td.sample(model, model.process.prior_sample((n, 2), g), sampler, steps, generator=g, **opts)
    ex, _ = dens.sample(n, gen(1))
    return float((-dens.log_prob(x.double())).mean() - (-dens.log_prob(ex)).mean())


# --- T-SM-6 / T-NCSN-1: variance-dependent score by the NCSN loss ----------------------------------------------
GMM1 = td.GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-2.0], [1.5]]), torch.tensor([0.09, 0.25]))


def train_noise_conditional(steps: int, batch: int):
    """eps_theta(y, sigma) = c_out MLP(c_in y, log sigma) with c_in = 1/sqrt(sigma^2 + sd^2), c_out = sigma c_in
    (so the net's output is O(1) at every level), trained with the NCSN loss on a geometric ladder."""
    torch.manual_seed(0)
    proc = td.EDM(sigma_min=0.02, sigma_max=10.0)  # t = sigma
    net = MLP(dim=1, hidden=64, depth=3, time_scale=1.0)
    sd = 1.7  # data std

    def eps_net(x, t):
        c = torch.sqrt(t**2 + sd**2)[:, None]
        return (t[:, None] / c) * net(x / c, torch.log(t))

    model = td.Denoiser(eps_net, proc, prediction="eps")
    sigmas = ncsn_sigmas(10.0, 0.02, 12)
    opt = torch.optim.Adam(net.parameters())
    g = gen(1)
    for step in range(steps):
        opt.param_groups[0]["lr"] = 1e-4 + (3e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * step / steps))
        x0, _ = GMM1.sample(batch, g, dtype=torch.float32)
        loss = ncsn_loss(model, x0, sigmas, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    errors = []
    for s in sigmas.tolist():
        t = torch.full((4000,), s, dtype=D)
        x = GMM1.sample_t(4000, proc, t, gen(2))
        with torch.no_grad():
            learned = model.score(x.float(), t).double()
        exact = GMM1.score(x, proc, t)
        errors.append(math.sqrt(float(((learned - exact) ** 2).mean() / (exact**2).mean())))
    return errors


def test_noise_conditional_score_learns_the_oracle():  # T-SM-6, T-NCSN-1 (fast: 1500 steps)
    errors = train_noise_conditional(1500, 512)
    # relative L2 error of -eps_theta/sigma against the oracle score under p_sigma, at every level; the
    # smallest levels are the hardest (eps* is O(sigma) there, below the loss's unit noise)
    assert max(errors) < 0.25, errors
    assert max(errors[:6]) < 0.10, errors


@pytest.mark.slow
def test_noise_conditional_score_within_ten_percent():  # T-SM-6 as stated (8000 steps of 4096, ~110 s)
    errors = train_noise_conditional(8000, 4096)
    # measured: 0.004 at sigma = 10 .. 0.073 at sigma = 0.02 (with batch 1024: 0.115 at sigma = 0.02, where
    # eps* ~ 0.07 lies under the loss's unit noise, so the smallest level needs the larger batch)
    assert max(errors) < 0.10, errors


# --- models trained through the Trainer and sampled ------------------------------------------------------------
# Fast versions: the 3-component "gmm" toy, 500 steps (~3 s each). An untrained model's gap is > 5 nats.
FAST = ["data.name=gmm", "model.hidden=64"]


def test_ve_sde_model_samples(tmp_path):  # T-SDE-8 (weighted DSM) + T-SDE-7 (reverse SDE), learned
    model = ema_model(train_preset("ve", tmp_path / "ve", 500, FAST))
    gap = nll_gap(model, "euler_maruyama", 200)
    assert abs(gap) < 0.5, gap  # measured 0.27
    assert abs(nll_gap(model, "reverse_diffusion", 200)) < 0.5


def test_ncsn_model_with_annealed_langevin(tmp_path):  # T-NCSN-1, T-NCSN-2, learned
    model = ema_model(train_preset("ncsn", tmp_path / "ncsn", 500, FAST))
    # the sampler's logsnr grid with 10 levels visits exactly the training ladder
    ts = td.grids.get("logsnr", model.process, 10)[:-1]
    torch.testing.assert_close(model.process.sigma(ts), process_ncsn_sigmas(model.process, 10), rtol=1e-9, atol=0)
    gap = nll_gap(model, "annealed_langevin", 1000, grid="logsnr")  # 10 levels x 100 steps
    assert abs(gap) < 0.5, gap  # measured 0.27


def test_energy_model_samples(tmp_path):  # T-EBM-1 trained by DSM, sampled by the reverse SDE
    model = ema_model(train_preset("ebm", tmp_path / "ebm", 400, FAST + ["model.depth=2", "train.batch=128"]))
    assert isinstance(model.net, EnergyScoreNet) and model.net.output == "eps"
    gap = nll_gap(model, "euler_maruyama", 150)
    assert abs(gap) < 0.5, gap  # measured 0.12


@pytest.mark.slow
@pytest.mark.parametrize("preset,sampler,steps,tol", [("ve", "reverse_diffusion", 500, 0.5),
                                                      ("ncsn", "annealed_langevin", 1000, 0.5),
                                                      ("ebm", "euler_maruyama", 500, 0.5),
                                                      ("vp", "euler_maruyama", 500, 0.5)])
def test_presets_train_to_good_samples_on_the_ring(tmp_path, preset, sampler, steps, tol):
    tr = train_preset(preset, tmp_path / preset, 3000, [])
    opts = {"grid": "logsnr"} if preset == "ncsn" else {}
    assert abs(nll_gap(ema_model(tr), sampler, steps, n=2000, toy="ring", **opts)) < tol


# --- the ncsn / esm / ssm losses in the trainer -------------------------------------------------------------------
def test_score_matching_losses_train(tmp_path):  # T-SM-2, T-SM-4 on the noised marginals
    losses = {}
    for name in ("esm", "ssm"):
        cfg = C.resolve("ve", ["train.steps=60", "train.ckpt_every=0", "model.hidden=32", "model.depth=1",
                               f"loss.name={name}", "train.batch=64", "train.log_every=10"])
        tr = build_trainer(cfg, tmp_path / name, progress=False)
        first = [tr.train_step()[0] for _ in range(10)]
        tr.run()
        last = [tr.train_step()[0] for _ in range(10)]
        assert all(math.isfinite(v) for v in first + last)
        assert sum(last) < sum(first), name
        losses[name] = tr
    # on the same draws, sliced SM with many projections matches exact SM (T-SM-4 (c))
    model = losses["esm"].model
    x0 = toy_density("ring").sample(256, gen(3), dtype=torch.float32)[0]
    esm = noisy_score_matching_loss(model, x0, method="esm", generator=gen(4)).detach()
    ssm = noisy_score_matching_loss(model, x0, method="ssm", generator=gen(4), n_projections=64).detach()
    assert abs(float(esm - ssm)) < 0.1 * abs(float(esm)) + 0.05


def test_ncsn_loss_via_trainer_and_unknown_loss(tmp_path):
    cfg = C.resolve("ncsn", ["train.steps=5", "train.ckpt_every=0", "model.hidden=16", "model.depth=1"])
    tr = build_trainer(cfg, tmp_path / "n", progress=False)
    assert math.isfinite(tr.train_step()[0])
    with pytest.raises(ValueError, match="allowed"):
        build_trainer(C.resolve("ve", ["loss.name=nope"]), tmp_path / "x", progress=False)


def test_score_presets_resolve_and_build():
    from torchdiffusion.runs.build import build_model

    for p in ("vp", "subvp", "ve", "ncsn", "ebm"):
        cfg = C.resolve(p)
        model = build_model(cfg, (2,))
        assert model.process.name == cfg["process"]["name"]
    for p in ("vp_digits", "ve_digits", "ncsn_digits"):
        cfg = C.resolve(p)
        assert cfg["data"]["name"] == "digits" and cfg["model"]["net"] == "unet"
        assert td.samplers.get(cfg["sample"]["sampler"])
    # the energy net takes its dimension from the data, and refuses image data with a clear error
    model = build_model(C.resolve("ve", ["model.net=energy"]), (3,))
    assert model.net.energy.dim == 3
    with pytest.raises(ValueError, match="needs vector data"):
        build_model(C.resolve("ve", ["model.net=energy"]), (1, 8, 8))


# --- CLI ---------------------------------------------------------------------------------------------------------
def test_scorefield_command(tmp_path, capsys):
    from torchdiffusion.cli.main import main

    run = tmp_path / "run"
    assert main(["train", "ve", "--out", str(run), "--quiet", "--set", "train.steps=20", "--set", "model.hidden=16",
                 "--set", "model.depth=1"]) == 0
    out = tmp_path / "field.png"
    assert main(["scorefield", str(run), "--out", str(out), "--n", "9"]) == 0
    assert out.is_file() and out.stat().st_size > 1000
    assert "relative squared error" in capsys.readouterr().out
    assert main(["scorefield", str(run), "--out", str(tmp_path / "f.jpg")]) == 2
    assert "must end in .png" in capsys.readouterr().err


@pytest.mark.parametrize("loss", ["esm", "ssm", "ncsn"])
def test_energy_model_trains_with_every_score_loss(tmp_path, loss):  # T-EBM-1 with T-SM-2 / T-SM-4 / T-NCSN-1
    cfg = C.resolve("ebm", ["train.steps=3", "train.ckpt_every=0", "model.hidden=16", "model.depth=1",
                            "train.batch=32", f"loss.name={loss}"])
    tr = build_trainer(cfg, tmp_path / loss, progress=False)
    before = [p.detach().clone() for p in tr.net.parameters()]
    assert all(math.isfinite(tr.train_step()[0]) for _ in range(3))
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.net.parameters()))
