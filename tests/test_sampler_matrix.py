"""Every sampler x every process x every prediction on the exact Gaussian-mixture model (issue 13).

The model is exact (the oracle of an 8-component ring, std 0.075), so any error is the sampler's: with
``td.sample``'s defaults at 200 evaluations every sampler must give finite samples whose mean NLL under the
true density is within max(3 SE, 0.05 nats) of exact samples', and every deterministic sampler must land within
2e-2 RMS of the exact probability-flow ODE solution (tight adaptive solve) from the same noise. The error must
fall from 20 to 200 evaluations, and any ``steps >= 1`` is accepted and spent as promised.
"""

from __future__ import annotations

import math

import pytest
import torch

import torchdiffusion as td

D = torch.float64
def learned() -> td.LearnedVP:
    """VDM's learned schedule (issue 17) with its shape bent away from linear, deterministically; as a trained one
    would be used: without gradients to its parameters."""
    proc = td.LearnedVP(-10.0, 6.0, schedule_hidden=8)
    with torch.no_grad():
        proc.schedule.c.fill_(3.0)
        proc.schedule.w.fill_(2.0)
    proc.schedule.requires_grad_(False)
    return proc


PROCESSES = {
    "ddpm_linear": lambda: td.DDPM(betas="linear"),
    "ddpm_cosine": lambda: td.DDPM(betas="cosine"),
    "vp": td.VP,
    "subvp": td.SubVP,
    "ve": td.VE,
    "edm": td.EDM,
    "learned": learned,
}
PREDICTIONS = ("eps", "x0", "v")
SAMPLERS = td.samplers.names()


def ring(K: int = 8, std: float = 0.075) -> td.GaussianMixture:
    ang = torch.arange(K, dtype=D) * 2 * math.pi / K
    return td.GaussianMixture(torch.ones(K), torch.stack([ang.cos(), ang.sin()], 1), std**2)


GM = ring()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def setup(pname: str, prediction: str, n: int):
    proc = PROCESSES[pname]()
    model = td.Denoiser(GM.net(proc, prediction), proc, prediction=prediction)
    x_T = GM.sample_t(n, proc, proc.t_max, generator=gen(2))
    return proc, model, x_T


def ode_reference(model, x_T):
    # 1e-7: DDPM's drift has a kink at every integer timestep, so tighter tolerances cost 10-30x the calls
    return td.sample(model, x_T, "ode", rtol=1e-7, atol=1e-7)


def nll(x):
    return -GM.log_prob(x)


def exact_nll(n: int):
    return nll(GM.sample(n, generator=gen(1))[0])


def deterministic(model, x_T, name: str, steps: int, out) -> bool:
    """A sampler is deterministic with its defaults if another generator gives the same sample."""
    if not td.samplers.get(name).stochastic:
        return True
    return torch.equal(out, td.sample(model, x_T, name, steps=steps, generator=gen(4)))


def energy_distance(a, b):
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


def check_matrix(pname: str, prediction: str, n: int, rms_tol: float, nll_floor: float,
                 steps_for: dict[str, int] | None = None) -> None:
    proc, model, x_T = setup(pname, prediction, n)
    ref = ode_reference(model, x_T)
    exact = exact_nll(n)
    failures = []
    for name in SAMPLERS:
        steps = (steps_for or {}).get(name, 200)
        x = td.sample(model, x_T, name, steps=steps, generator=gen(3))
        if not torch.isfinite(x).all():
            failures.append(f"{name}: non-finite samples")
            continue
        v = nll(x)
        gap = float(v.mean() - exact.mean())
        se = math.sqrt(float(v.var()) / n + float(exact.var()) / n)
        if abs(gap) > max(3 * se, nll_floor):
            failures.append(f"{name}: NLL gap {gap:+.3f} nats > max(3 SE = {3 * se:.3f}, {nll_floor})")
        if deterministic(model, x_T, name, steps, x):
            rms = float((x - ref).pow(2).mean().sqrt())
            if rms > rms_tol:
                failures.append(f"{name}: RMS to the exact PF-ODE {rms:.2e} > {rms_tol}")
    assert not failures, f"{pname}/{prediction}: " + "; ".join(failures)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("pname", list(PROCESSES))
def test_every_sampler_on_every_process(pname, prediction):
    check_matrix(pname, prediction, n=384, rms_tol=2e-2, nll_floor=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("pname", list(PROCESSES))
def test_every_sampler_on_every_process_tight(pname, prediction):
    # 8192 samples (3 SE ~ 0.046 nats). Three samplers carry a first-order bias that 200 calls do not hide at this
    # precision (measured at N = 8192): ancestral ddpm -0.063 (DDPM linear) / -0.080 (VE) nats, too sharp (the
    # plug-in posterior mean ignores Cov[x0 | x_t]); reverse_diffusion +0.059 on VE; annealed Langevin ~+0.1.
    # They are held to the same limits with more calls: reverse_diffusion 1000 (VE: -0.005), annealed Langevin and
    # ddpm 2000 (ddpm at 1000 still measured -0.047 on VP against 3 SE = 0.046).
    check_matrix(pname, prediction, n=8192, rms_tol=1e-2, nll_floor=0.03,
                 steps_for={"annealed_langevin": 2000, "ddpm": 2000, "reverse_diffusion": 1000})


@pytest.mark.parametrize("pname", [pytest.param(p, marks=pytest.mark.slow) if p == "learned" else p
                                   for p in PROCESSES])  # learned: ~2.6x the others' time (its schedule is a net)
def test_error_falls_from_20_to_200_evaluations(pname):
    """Deterministic samplers: RMS to the exact ODE solution from the same noise must fall. Stochastic ones:
    energy distance to 4096 exact samples (a metric of distributions, unlike the mean NLL, whose errors can
    cross zero) must fall, or already be at the noise floor at 200 (within twice the distance between two
    exact sample sets: Euler-Maruyama is there at 20). The adaptive ``ode`` sampler is left out: ``steps``
    does not set its accuracy (``rtol``/``atol`` do)."""
    n_det, n_sto = 256, 4096
    proc, model, x_T = setup(pname, "eps", n_sto)
    ref = ode_reference(model, x_T[:n_det])
    exact = GM.sample(n_sto, generator=gen(1))[0]
    floor = energy_distance(exact, GM.sample(n_sto, generator=gen(11))[0])
    worse = []
    for name in SAMPLERS:
        if name == "ode":
            continue
        x20 = td.sample(model, x_T[:n_det], name, steps=20, generator=gen(3))
        if deterministic(model, x_T[:n_det], name, 20, x20):
            x200 = td.sample(model, x_T[:n_det], name, steps=200, generator=gen(3))
            errs = [float((x - ref).pow(2).mean().sqrt()) for x in (x20, x200)]
            ok = errs[1] < errs[0]
        else:
            errs = [energy_distance(td.sample(model, x_T, name, steps=s, generator=gen(3)), exact) for s in (20, 200)]
            ok = errs[1] < errs[0] or errs[1] <= 2 * floor
        if not ok:
            worse.append(f"{name}: {errs[0]:.2e} at 20 -> {errs[1]:.2e} at 200")
    assert not worse, f"{pname} (energy-distance floor {floor:.1e}): " + "; ".join(worse)


class Counting:
    """The exact model with an evaluation counter."""

    def __init__(self, model):
        self.model, self.process, self.calls = model, model.process, 0

    def predict(self, x, t, cond=None):
        self.calls += 1
        return self.model.predict(x, t)


@pytest.mark.parametrize("pname", list(PROCESSES))
def test_any_steps_is_accepted_and_spent_as_promised(pname):
    """steps = 1..6 and 13: finite samples, at most ``steps`` network calls (annealed Langevin exactly
    ``steps``; the adaptive ode alone chooses its own number)."""
    proc, model, x_T = setup(pname, "eps", 64)
    bad = []
    for name in SAMPLERS:
        for steps in (1, 2, 3, 4, 5, 6, 13):
            counted = Counting(model)
            x = td.sample(counted, x_T, name, steps=steps, generator=gen(3))
            if not torch.isfinite(x).all():
                bad.append(f"{name}@{steps}: non-finite")
            if name != "ode" and counted.calls > steps:
                bad.append(f"{name}@{steps}: {counted.calls} calls")
            if name == "annealed_langevin" and counted.calls != steps:
                bad.append(f"{name}@{steps}: {counted.calls} calls, not {steps}")
    assert not bad, f"{pname}: " + "; ".join(bad)


def test_default_grids_reach_the_smallest_noise_level():
    """Item 2: each process's default grid has ``t_min`` as its last positive time (then the clean time);
    diffusers' spacings stay available by name."""
    for pname, make in PROCESSES.items():
        proc = make()
        for n in (1, 2, 10, 200):
            ts = td.grids.get(td.grids.default_for(proc), proc, n)
            assert float(ts[-1]) == proc.t_zero
            if n > 1:
                assert float(ts[-2]) == pytest.approx(proc.t_min, abs=1e-12), (pname, n)
    assert {"leading", "trailing", "uniform"} <= set(td.grids.names())
    proc = td.DDPM()
    assert td.grids.get("trailing", proc, 10)[-2].item() == 99.0


def test_annealed_langevin_spends_levels_times_steps_each():
    from torchdiffusion.samplers.langevin import level_plan

    assert level_plan(200) == (20, 10)
    assert level_plan(200, levels=8) == (8, 25)
    assert level_plan(200, n_steps_each=40) == (5, 40)
    assert level_plan(7) == (7, 1)
    with pytest.raises(ValueError, match="levels x n_steps_each"):
        level_plan(200, n_steps_each=30)
    with pytest.raises(ValueError, match="levels x n_steps_each"):
        level_plan(200, levels=4, n_steps_each=40)
    proc, model, x_T = setup("ve", "eps", 16)
    for kw, calls in (({"n_steps_each": 25}, 200), ({"levels": 4}, 200), ({}, 200)):
        counted = Counting(model)
        levels = []
        td.sample(counted, x_T, "annealed_langevin", steps=200, generator=gen(0),
                  callback=lambda d, levels=levels: levels.append(d["i"]), **kw)
        assert counted.calls == calls
        if "levels" in kw:
            assert len(set(levels)) == 4


def test_annealed_langevin_converges_as_steps_grow():
    """Item 3 with the defaults: the NLL gap to exact samples shrinks from 200 to 2000 calls (VE)."""
    proc, model, x_T = setup("ve", "eps", 4096)
    exact = exact_nll(4096)
    gaps = [float(nll(td.sample(model, x_T, "annealed_langevin", steps=s, generator=gen(3))).mean() - exact.mean())
            for s in (20, 200, 2000)]
    assert abs(gaps[2]) < abs(gaps[1]) < abs(gaps[0])
    assert abs(gaps[2]) < 0.06


def test_explicit_grid_and_steps_must_agree():
    proc, model, x_T = setup("vp", "eps", 8)
    grid = td.grids.get("logsnr", proc, 20)
    counted = Counting(model)
    td.sample(counted, x_T, "ddim", grid=grid)  # steps left out: the grid decides
    assert counted.calls == 20
    td.sample(model, x_T, "ddim", steps=20, grid=grid)
    td.sample(model, x_T, "heun", steps=39, grid=grid)  # 20 intervals cost 39 calls
    with pytest.raises(ValueError, match="grid has 20 intervals"):
        td.sample(model, x_T, "ddim", steps=1, grid=grid)
    with pytest.raises(ValueError, match="grid has 20 intervals"):
        td.sample(model, x_T, "heun", steps=20, grid=grid)
    with pytest.raises(ValueError, match="must end at the clean time"):
        td.sample(model, x_T, "ddim", grid=grid[:-1])
    with pytest.raises(ValueError, match="finite"):
        td.sample(model, x_T, "ddim", grid=torch.tensor([1.0, float("nan"), 0.0]))


def test_ode_sampler_stays_inside_the_process_range():
    """The adaptive solver's first step is bounded: torchdiffeq's own guess evaluated DDPM at t = -48617."""
    for pname in ("ddpm_linear", "ddpm_cosine", "vp", "subvp"):
        proc, model, x_T = setup(pname, "eps", 32)
        spy = Spy(model)
        for dtype in (torch.float32, torch.float64):
            x = td.sample(spy, x_T.to(dtype), "ode")
            assert torch.isfinite(x).all()
        assert min(spy.seen) >= proc.t_min - 1e-9 and max(spy.seen) <= proc.t_max + 1e-9, pname


class Spy:
    """The model, recording the times it is asked at."""

    def __init__(self, model):
        self.model, self.process, self.seen = model, model.process, []

    def predict(self, x, t, cond=None):
        self.seen.append(float(t))
        return self.model.predict(x, t)
