"""Few-step sampling benchmark (issue 16): torchdiffusion against diffusers at full strength, on exact models.

Run (one command; about 25 min on 2 shared CPU cores):  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/samplers.py
``--quick`` is a smoke run (fewer samples, two cases, fewer diffusers options); ``--cases`` selects cases.

Problems (none was used to tune anything in the library): exact Gaussian-mixture eps-models
(``td.GaussianMixture(...).net(process, "eps")``) under diffusers' DDPM schedules (T = 1000): a 2-D ring (12
components, std 0.05) under ``linear`` and ``scaled_linear``; a 64-D anisotropic mixture (spectra 0.25 .. 1e-4);
a 256-D mixture with a log-spaced spectrum (1 .. 1e-5); a 16-D mixture with heavy outliers (3 % of the mass in
broad components 6-10 units away); and the trained digits model (``runs/digits_quality``: class-conditional cosine
DDPM, v-prediction U-Net; scored by RMS to its converged ODE sample on 128 states and by FD with
``DigitsEvaluator`` on 359 for the headline configurations). NFE 5, 10, 20.

Error = RMS distance (per coordinate) of the samples to the exact PF-ODE solution from the same ``x_T``: in VE
coordinates ``y = x / alpha``, ``s = sigma / alpha`` the ODE is ``dy/ds = eps*(y, s)`` with the oracle's exact eps
(log-SNR interpolated linearly between the 1000 training timesteps, as our ``DDPM`` and diffusers'
``_sigma_to_t`` do), integrated from ``s(T-1)`` to ``s = 0`` by dopri5 at rtol = atol = 1e-10 in float64.
``x_T`` is an exact draw of ``p_{T-1}``, seed 0; nothing is tuned on it.

The headline is one a-priori choice per library, fixed before any run:
- ours: ``unipc`` with its order (2 or 3), final step (``denoise`` / ``extrapolate``) and grid fitted once per
  model and NFE by ``td.grids.optimize(model, "unipc", NFE, x_T=pilot, choices=CHOICES)`` (pilot states drawn
  with another seed: as many as the scored states, at least 96, a third held out for validation; reference = the
  PF-ODE end state ``gridfit.end_state`` of the pilot, solved once per model; budget 300 sampling runs, 60 on the
  digits model). ``td.sample``'s own default sampler is ``ddim`` (a 50-step default); the README's few-step
  recommendation is ``unipc``.
- diffusers': ``DPMSolverMultistepScheduler`` with its defaults and ``use_karras_sigmas=True`` ("DPM++ 2M Karras",
  the scheduler diffusers' documentation recommends for fast sampling); where it raises (the digits model's cosine
  schedule), the same scheduler with its default linspace spacing.
Best-vs-best is beside it: the minimum over every deterministic configuration of each library (the counts are
printed; on the digits model only the configurations that ranked top 10 on some exact problem, for time).
diffusers' configurations are the product of every deterministic scheduler's solver options with every
sigma spacing it has (``timestep_spacing`` linspace/leading/trailing, ``use_karras_sigmas``,
``use_exponential_sigmas``, ``use_beta_sigmas``, ``use_lu_lambdas``) and its final-step options
(``final_sigmas_type``, ``lower_order_final``, ``euler_at_final``); an option a scheduler does not keep in its
config is skipped. Stochastic schedulers (DDPM, ancestral Euler / KDPM2, SDE-DPM-Solver, SA-Solver with tau > 0,
LCM / TCD) do not approximate the ODE solution and are left out.

Same-grid pairs: our grids (karras, logsnr, the fitted one) handed to diffusers' schedulers -- after
``set_timesteps(n)`` their ``timesteps`` and ``sigmas`` are replaced by ours (diffusers' ``timesteps=`` takes only
integers and UniPC's ``sigmas=`` only flow sigmas, so this is the one way to hand over a fractional grid exactly).

NFE are counted by wrapping the network, never taken from a sampler; a configuration may use fewer than the
budget (Heun with an even budget) but never more.

Where our a-priori choice misses the goal (<= 0.5 x diffusers' best; <= 1 x on the digits model), the error is split
(``diagnose``): the error at the last positive grid level against the exact ODE state there (integration) and the
error of the final step applied to *exact* states (Tweedie's x0_hat at the last level, or its extrapolation from
the last two levels); the larger is named. Beside it: the error of a converged solve (``gridfit.end_state``, rtol =
atol = 1e-6) -- the model is queried at t >= t_min only, so no sampler reaches much below this -- where a few
states carry most of the squared error (``concentration``), those states, and on the mixture problems the component
flips of ours and of diffusers' best (``flips``: states that end in another component than the exact solution) with
both errors on the states where neither flips.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import _report
import torchdiffusion as td
from torchdiffusion.parameterization.interop import process_from_diffusers

NFES = (5, 10, 20)
SCHEDULES = {"linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
             "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}}
A_PRIORI_OURS = "unipc"
A_PRIORI_DIFFUSERS = "DPMSolverMultistep+karras"
EVAL_SEED, PILOT_SEED = 0, 1000


@dataclass
class Case:
    """One benchmark problem: an oracle mixture under a diffusers schedule, with fixed evaluation noise."""

    name: str
    mixture: td.GaussianMixture
    schedule: str
    n: int
    x_start: torch.Tensor = field(init=False)
    ref: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.config = {"num_train_timesteps": 1000, **SCHEDULES[self.schedule]}
        self.process = process_from_diffusers(self.config)
        self.x_start = self.draw(self.n, EVAL_SEED)

    @property
    def n_pilot(self) -> int:
        """Pilot states for the fit (a priori: as many as the scored states, at least 96; a third validates)."""
        return max(96, self.n)

    def draw(self, n: int, seed: int) -> torch.Tensor:
        """``n`` exact draws of ``p_{T-1}``."""
        return self.mixture.sample_t(n, self.process, self.process.t_max, generator=torch.Generator().manual_seed(seed))

    def net(self):
        """The raw network (diffusers' ``model_output``): here the oracle's exact eps."""
        return self.mixture.net(self.process, "eps")

    def model(self, net=None) -> td.Denoiser:
        return td.Denoiser(net or self.net(), self.process, "eps")


DIGITS_RUN = "runs/digits_quality"
DIGITS_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}


class DigitsCase(Case):
    """The trained class-conditional digits model (``runs/digits_quality``, EMA weights; trained with the
    ``digits`` preset if the folder is missing): cosine DDPM, v-prediction U-Net. x_T ~ N(0, I) (seed 0); the
    labels of a batch of m states are the first m of the evaluator's held-out labels (repeated)."""

    def __init__(self, name: str, n: int, run: str = DIGITS_RUN):
        from torchdiffusion.evaluation.metrics import DigitsEvaluator
        from torchdiffusion.runs.build import load_run

        if not Path(run, "config.json").exists():
            from torchdiffusion.runs import config
            from torchdiffusion.runs.train import train

            print(f"{run} missing: training the digits preset (several minutes)", flush=True)
            train(config.resolve("digits", ["train.threads=1"]), run)
        self.name, self.schedule, self.n, self.mixture = name, "cosine", n, None
        self.den, cfg = load_run(run)
        torch.set_num_threads(1)
        self.shape = tuple(cfg["run"]["data_shape"])
        self.config = dict(DIGITS_CONFIG)
        self.process = self.den.process
        theirs = process_from_diffusers(self.config)
        t = torch.arange(1000, dtype=torch.float64)
        if self.den.prediction != "v" or float((self.process.alpha(t) - theirs.alpha(t)).abs().max()) > 1e-9:
            raise SystemExit(f"{run}: expected a v-prediction run on diffusers' squaredcos_cap_v2 schedule")
        self.evaluator = DigitsEvaluator(8)
        self.labels = self.evaluator.y_heldout.repeat(4)
        self.x_start = self.draw(n, EVAL_SEED)

    @property
    def n_pilot(self) -> int:
        return 96

    def draw(self, n: int, seed: int) -> torch.Tensor:
        return torch.randn(n, *self.shape, generator=torch.Generator().manual_seed(seed))

    def net(self):
        unet, labels = self.den.net, self.labels

        def f(x: torch.Tensor, t, *_):
            tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(len(x))
            with torch.no_grad():
                return unet(x.float(), tt, labels[:len(x)]).to(x.dtype)
        return f

    def model(self, net=None) -> td.Denoiser:
        return td.Denoiser(net or self.net(), self.process, "v")


def _rotated(d: int, K: int, spectrum: torch.Tensor, mean_scale: float, g: torch.Generator) -> tuple:
    covs = []
    for _ in range(K):
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        covs.append(q @ torch.diag(spectrum) @ q.T)
    return mean_scale * torch.randn(K, d, generator=g, dtype=torch.float64), torch.stack(covs)


def ring_2d() -> td.GaussianMixture:
    """Twelve Gaussians (std 0.05) on a ring of radius 1."""
    ang = torch.arange(12, dtype=torch.float64) * (2 * math.pi / 12)
    return td.GaussianMixture(torch.ones(12), torch.stack([ang.cos(), ang.sin()], 1), torch.full((12,), 0.0025))


def aniso_64d() -> td.GaussianMixture:
    """Ten components in 64-D, random means (norm ~1.2), random rotations of a spectrum 0.25 .. 1e-4."""
    g = torch.Generator().manual_seed(64)
    means, covs = _rotated(64, 10, torch.logspace(math.log10(0.25), -4, 64, dtype=torch.float64), 0.15, g)
    return td.GaussianMixture(torch.rand(10, generator=g, dtype=torch.float64) + 0.5, means, covs)


def logspec_256d() -> td.GaussianMixture:
    """Four components in 256-D with a log-spaced spectrum 1 .. 1e-5 (image-like: few strong directions)."""
    g = torch.Generator().manual_seed(256)
    means, covs = _rotated(256, 4, torch.logspace(0, -5, 256, dtype=torch.float64), 0.05, g)
    return td.GaussianMixture(torch.ones(4), means, covs)


def outliers_16d() -> td.GaussianMixture:
    """16-D: five tight components (std 0.1) near the origin hold 97 % of the mass; three broad ones (std 0.5),
    6-10 units away, hold 3 % (heavy outliers)."""
    g = torch.Generator().manual_seed(16)
    d = 16
    core = 0.5 * torch.randn(5, d, generator=g, dtype=torch.float64)
    far = torch.randn(3, d, generator=g, dtype=torch.float64)
    far = far / far.norm(dim=1, keepdim=True) * torch.tensor([[6.0], [8.0], [10.0]], dtype=torch.float64)
    w = torch.tensor([0.194] * 5 + [0.01] * 3, dtype=torch.float64)
    var = torch.tensor([0.01] * 5 + [0.25] * 3, dtype=torch.float64)
    return td.GaussianMixture(w, torch.cat([core, far]), var)


def cases(quick: bool = False) -> list[Case]:
    k = 4 if quick else 1
    out = [Case("ring-2d/linear", ring_2d(), "linear", 1024 // k),
           Case("ring-2d/scaled_linear", ring_2d(), "scaled_linear", 1024 // k),
           Case("aniso-64d/linear", aniso_64d(), "linear", 256 // k),
           Case("logspec-256d/scaled_linear", logspec_256d(), "scaled_linear", 128 // k),
           Case("outliers-16d/linear", outliers_16d(), "linear", 512 // k)]
    return out[::2] if quick else out


N_DIGITS = 128  # scored states of the digits model (RMS); FD on the evaluator's 359 held-out labels
DIGITS_BUDGET = 60  # fit budget (sampling runs) on the digits model: its U-Net costs ~50x an oracle call


# ------------------------------------------------------------------------------------------------------------
# reference and metrics
# ------------------------------------------------------------------------------------------------------------

def reference(case: Case) -> torch.Tensor:
    """Exact PF-ODE solution ``dy/ds = eps*(y, s)`` from ``s_T`` to 0 (dopri5, rtol = atol = 1e-10, float64); for
    the digits model its converged end state (:func:`td.samplers.gridfit.end_state`, rtol = atol = 1e-6)."""
    from torchdiffeq import odeint

    if isinstance(case, DigitsCase):
        return td.samplers.gridfit.end_state(case.model(), case.x_start, rtol=1e-5, atol=1e-5)[0].to(torch.float64)

    proc = case.process
    a_T, s_T = float(proc.alpha(proc.t_max)), float(proc.sigma(proc.t_max))
    ve = td.EDM(sigma_min=1e-12, sigma_max=s_T / a_T + 1.0)

    def f(s, y):
        return case.mixture.eps(y, ve, s.clamp_min(0.0))

    ss = torch.tensor([s_T / a_T, 0.0], dtype=torch.float64)
    return odeint(f, case.x_start / a_T, ss, method="dopri5", rtol=1e-10, atol=1e-10)[-1]


def ode_states(case: Case, ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Exact PF-ODE states x(t) from case.x_start at the decreasing times ``ts`` (one dopri5 solve in VE
    coordinates; for the digits model our adaptive solve at rtol = atol = 1e-6)."""
    from torchdiffeq import odeint

    proc = case.process
    if isinstance(case, DigitsCase):
        out, x, t_prev = [], case.x_start, proc.t_max
        ode = td.samplers.get("ode").fn
        for t in ts:
            box: dict = {}
            ode(td.samplers.Bound(case.model()), x, torch.tensor([float(t_prev), proc.t_zero], dtype=torch.float64),
                rtol=1e-6, atol=1e-6, t_end=float(t), callback=lambda d, box=box: box.setdefault("x", d["x"]))
            x, t_prev = box["x"], t
            out.append(x.to(torch.float64))
        return out
    a_T, s_T = float(proc.alpha(proc.t_max)), float(proc.sigma(proc.t_max))
    ve = td.EDM(sigma_min=1e-12, sigma_max=s_T / a_T + 1.0)
    a = [float(proc.alpha(t)) for t in ts]
    ss = torch.tensor([s_T / a_T] + [float(proc.sigma(t)) / ai for t, ai in zip(ts, a)], dtype=torch.float64)
    ys = odeint(lambda u, y: case.mixture.eps(y, ve, u.clamp_min(0.0)), case.x_start / a_T, ss, method="dopri5",
                rtol=1e-10, atol=1e-10)[1:]
    return [ai * y for ai, y in zip(a, ys)]



def rms(x: torch.Tensor, y: torch.Tensor) -> float:
    v = float(((x.to(torch.float64) - y) ** 2).mean().sqrt())
    return v if math.isfinite(v) else math.inf


def diagnose(case: Case, sampler: str, ts: torch.Tensor, opts: dict) -> dict:
    """Split the a-priori configuration's error: ``integration`` = RMS at the last positive grid level against
    the exact ODE state there; ``final_floor`` = RMS of the final step applied to exact states against the
    reference (what the final step adds by itself): Tweedie's x0_hat of the exact state at the last level, or
    with ``final_step="extrapolate"`` the extrapolation to noise 0 of the x0_hat of the exact states at the last
    two levels."""
    from torchdiffusion.samplers.solvers import extrapolate_x0

    model = case.model()
    fn = td.samplers.get(sampler).fn
    extrap = opts.get("final_step") == "extrapolate" and len(ts) >= 3
    levels = [ts[-3], ts[-2]] if extrap else [ts[-2]]
    exact = ode_states(case, levels)
    with torch.no_grad():
        o = {k: v for k, v in opts.items() if k != "final_step"}
        before = rms(fn(td.samplers.Bound(model), case.x_start, ts[:-1], **o), exact[-1])
        x0s = [model.x0(x.to(case.x_start.dtype), t).to(torch.float64) for x, t in zip(exact, levels)]
        s_lv = [float(case.process.sigma(t) / case.process.alpha(t)) for t in levels]
        floor = rms(extrapolate_x0(s_lv, x0s, 2) if extrap else x0s[-1], case.ref)
    return {"integration": before, "final_floor": floor, "s_last": s_lv[-1],
            "final": "extrapolated x0_hat" if extrap else "Tweedie floor"}


def concentration(x: torch.Tensor, ref: torch.Tensor, share: float = 0.5, few: float = 0.01) -> str:
    """Whether a few states carry the error: the fewest states (at most ``few`` of them, at least one) whose squared
    errors make up ``share`` of the total, their per-state RMS, and the RMS of all the others; "" otherwise. Such
    states are rare events (see :func:`flips`), which a pilot of the same size need not contain."""
    e2 = ((x.to(torch.float64) - ref) ** 2).flatten(1).mean(1)
    order = e2.sort(descending=True).values
    cum = order.cumsum(0) / order.sum()
    k = int((cum < share).sum()) + 1
    if k > max(1, int(few * len(e2))):
        return ""
    rest = float(order[k:].mean().sqrt()) if k < len(e2) else 0.0
    worst = ", ".join(f"{float(v.sqrt()):.2e}" for v in order[:k])
    return (f"{k} of {len(e2)} states carry {100 * float(cum[k - 1]):.0f} % of the squared error (per-state RMS "
            f"{worst}; the other {len(e2) - k}: {rest:.2e})")


class Counter:
    """Counts network evaluations (one per call, whatever the batch)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t, *args):
        self.calls += 1
        return self.fn(x, t, *args)


def flipped(case: Case, x: torch.Tensor) -> torch.Tensor | None:
    """Which states' samples end in another mixture component (the most responsible one at noise 0) than the exact
    solution from the same ``x_T`` (``None`` on the digits model, which has no components)."""
    if isinstance(case, DigitsCase):
        return None
    resp = case.mixture.responsibilities
    return resp(x.to(torch.float64)).argmax(1) != resp(case.ref).argmax(1)


def _count(mask: torch.Tensor | None) -> int | None:
    return None if mask is None else int(mask.sum())


def _flip_counts(rows: list[dict], lib: str) -> str:
    n = sorted(r["flips"] for r in rows if r["lib"] == lib and r.get("flips") is not None)
    return f"fewest {n[0]}, median {n[len(n) // 2]} over {len(n)} configurations" if n else "not counted"


def flips(case: Case, x: torch.Tensor, x_diff: torch.Tensor, rows: list[dict],
          ap_diff: dict) -> tuple[str, float, float]:
    """Component flips on a mixture problem: states whose sample ends in another mixture component (the most
    responsible one at noise 0) than the exact solution from the same ``x_T`` -- a discrete event (the path crossed
    the boundary between basins at moderate noise), whose error is the distance between components, not the
    solver's local error. Counts for our a-priori samples ``x`` and diffusers' best ``x_diff`` (beside them: the
    fewest and the median over each library's configurations ``rows``, and diffusers' a-priori ``ap_diff`` -- the
    best is chosen on the scored states, so where flips dominate it is also the configuration that happened to
    flip least on them), the share of our squared error the flipped states carry, and both RMS on the states where
    neither flips; then that share and the ratio of the two RMS (ours / diffusers' best) on those states."""
    ours, theirs = flipped(case, x), flipped(case, x_diff)
    if not (ours.any() or theirs.any()):
        return "no component flips (ours a-priori or diffusers' best)", 0.0, math.nan
    e2 = ((x.to(torch.float64) - case.ref) ** 2).flatten(1).mean(1)
    share = float(e2[ours].sum() / e2.sum())
    keep = ~(ours | theirs)
    r_o, r_d = rms(x[keep], case.ref[keep]), rms(x_diff[keep], case.ref[keep])
    return (f"component flips (the sample ends in another mixture component than the exact solution): ours "
            f"{int(ours.sum())} of {len(ours)} states ({100 * share:.0f} % of our squared error), diffusers' best "
            f"{int(theirs.sum())}, diffusers' a-priori {ap_diff['flips']} (ours: {_flip_counts(rows, 'ours')}; "
            f"diffusers: {_flip_counts(rows, 'diffusers')}); on the {int(keep.sum())} states where neither ours nor "
            f"diffusers' best flips: ours {r_o:.2e}, diffusers' best {r_d:.2e} (ratio {r_o / r_d:.3f})",
            share, r_o / r_d)


# ------------------------------------------------------------------------------------------------------------
# torchdiffusion
# ------------------------------------------------------------------------------------------------------------

OUR_VARIANTS = {  # name -> (sampler, options); every deterministic registered sampler with defaults is added too
    "dpmpp_2m[taylor]": ("dpmpp_2m", {"solver_type": "taylor"}),
    "dpmpp_2m[extrap]": ("dpmpp_2m", {"final_step": "extrapolate"}),
    "dpmpp_3m[extrap]": ("dpmpp_3m", {"final_step": "extrapolate"}),
    "unipc[2]": ("unipc", {"order": 2}),
    "unipc[2,bh1]": ("unipc", {"order": 2, "variant": "bh1"}),
    "unipc[extrap]": ("unipc", {"final_step": "extrapolate"}),
    "ipndm[fixed]": ("ipndm", {"variable_step": False}),
    "heun[extrap]": ("heun", {"final_step": "extrapolate"}),
}
SKIP = {"ode"}  # adaptive: its NFE is not set by `steps`


def our_configs(case: Case) -> dict[str, tuple[str, dict]]:
    """Every registered sampler that is deterministic with its defaults, plus :data:`OUR_VARIANTS`."""
    model, x = case.model(), case.x_start[:4]
    configs = {}
    for name in td.samplers.names():
        if name in SKIP:
            continue
        try:
            a, b = (td.sample(model, x, name, 20, generator=torch.Generator().manual_seed(k)) for k in (0, 1))
        except ValueError:
            continue
        if torch.equal(a, b):
            configs[name] = (name, {})
    configs.update(OUR_VARIANTS)
    return configs


def run_ours(case: Case, configs: dict, nfe: int, fitted: torch.Tensor, only: set | None = None) -> list[dict]:
    """Every configuration x every named grid (and the fitted grid where its interval count fits the sampler);
    ``only``: just these ``"config / grid"`` labels."""
    rows = []
    for label, (name, opts) in configs.items():
        grids = [(g, g) for g in td.grids.names()]
        if td.samplers.get(name).intervals(nfe, **{k: v for k, v in opts.items() if k == "order"}) == len(fitted) - 1:
            grids.append(("fitted", fitted))
        for gname, grid in grids:
            if only is not None and f"{label} / {gname}" not in only:
                continue
            net = Counter(case.net())
            try:
                x = td.sample(case.model(net), case.x_start, name, None if gname == "fitted" else nfe, grid=grid,
                              **opts)
            except ValueError:
                continue  # e.g. a grid that cannot have this many distinct timesteps
            if net.calls > nfe:
                raise RuntimeError(f"{label} used {net.calls} > {nfe} NFE")
            rows.append({"lib": "ours", "config": f"{label} / {gname}", "nfe": net.calls, "rms": rms(x, case.ref),
                         "flips": _count(flipped(case, x))})
    return rows


# ------------------------------------------------------------------------------------------------------------
# diffusers
# ------------------------------------------------------------------------------------------------------------

SPACINGS = {"linspace": {"timestep_spacing": "linspace"}, "leading": {"timestep_spacing": "leading"},
            "trailing": {"timestep_spacing": "trailing"}, "karras": {"use_karras_sigmas": True},
            "exponential": {"use_exponential_sigmas": True}, "beta": {"use_beta_sigmas": True},
            "lu": {"use_lu_lambdas": True}}


def _product(**axes) -> list[dict]:
    keys = list(axes)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(axes[k] for k in keys))]


def diffusers_space(quick: bool = False) -> list[tuple[str, str, dict, int]]:
    """``(label, scheduler class, options, NFE per step)`` for every deterministic configuration: solver options x
    sigma spacing x final-step options. Options a scheduler does not keep are filtered in :func:`diffusers_run`."""
    finals = [{}, {"final_sigmas_type": "sigma_min"}, {"lower_order_final": False}, {"euler_at_final": True}]
    sp = ["karras", "linspace", "leading"] if quick else list(SPACINGS)
    dpm = [o for o in _product(solver_order=[1, 2, 3], algorithm_type=["dpmsolver++", "dpmsolver"],
                               solver_type=["midpoint", "heun"])
           if not (o["solver_order"] == 1 and o["solver_type"] == "heun")]
    solvers = [("DPMSolverMultistep", o, 1) for o in dpm]
    solvers += [("DPMSolverSinglestep", o, 1) for o in dpm]
    solvers += [("UniPCMultistep", o, 1) for o in _product(solver_order=[1, 2, 3], solver_type=["bh1", "bh2"],
                                                          predict_x0=[True, False])]
    solvers += [("DEISMultistep", {"solver_order": k}, 1) for k in (1, 2, 3)]
    solvers += [("SASolver", {"predictor_order": p, "corrector_order": c, "tau_func": "zero"}, 1)
                for p, c in ((1, 1), (2, 2), (3, 3), (3, 1))]
    solvers += [("EulerDiscrete", {"interpolation_type": i}, 1) for i in ("linear", "log_linear")]
    solvers += [("HeunDiscrete", {}, 2), ("KDPM2Discrete", {}, 2), ("LMSDiscrete", {}, 1)]
    solvers += [("DDIM", {"clip_sample": False, "set_alpha_to_one": a}, 1) for a in (True, False)]
    solvers += [("PNDM", {"skip_prk_steps": s, "set_alpha_to_one": a}, 1) for s in (True, False) for a in (True, False)]
    if quick:
        solvers = [s for s in solvers if s[0] in ("DPMSolverMultistep", "UniPCMultistep", "EulerDiscrete")]
    out = []
    for cls, opts, per_step in solvers:
        for spacing in sp:
            for fin in finals:
                label = cls + "(" + ",".join(f"{k}={v}" for k, v in opts.items()) + ")+" + spacing + (
                    "+" + ",".join(f"{k}={v}" for k, v in fin.items()) if fin else "")
                out.append((label, cls, {**opts, **SPACINGS[spacing], **fin}, per_step))
    return out


def make_scheduler(config: dict, cls_name: str, opts: dict):
    """The diffusers scheduler, or None when it does not keep one of ``opts`` (an option it does not have)."""
    import diffusers

    cls = getattr(diffusers, cls_name + ("Scheduler" if not cls_name.endswith("Scheduler") else ""))
    kw = {k: (lambda t: 0) if v == "zero" and k == "tau_func" else v for k, v in opts.items()}
    try:
        sch = cls(**config, **kw)
    except (TypeError, ValueError, ImportError):
        return None
    for k, v in opts.items():
        if k != "tau_func" and sch.config.get(k, object()) != v:
            return None
    return sch


def _loop(sch, net, x: torch.Tensor, steps: int, grid: torch.Tensor | None = None, process=None) -> torch.Tensor:
    sch.set_timesteps(steps)
    if grid is not None:  # hand our grid over: replace diffusers' timesteps and sigmas (module docstring)
        ts = grid[:-1]
        s = (process.sigma(ts) / process.alpha(ts)).to(torch.float64)
        sch.timesteps = ts.clone()
        sch.sigmas = torch.cat([s, torch.zeros(1, dtype=torch.float64)])
    x = x * sch.init_noise_sigma
    for t in sch.timesteps:
        x = sch.step(net(sch.scale_model_input(x, t), t), t, x).prev_sample
    return x


def diffusers_run(case: Case, cls_name: str, opts: dict, per_step: int, nfe: int,
                  grid: torch.Tensor | None = None,
                  x: torch.Tensor | None = None) -> tuple[torch.Tensor | None, int, str]:
    """Samples of one configuration with the most steps whose counted NFE fit ``nfe``: ``(x, calls, error)``
    (from ``x``, default ``case.x_start``)."""
    oracle = case.net()
    x_T = case.x_start if x is None else x
    steps = len(grid) - 1 if grid is not None else max(1, nfe // per_step)
    while steps >= 1:
        sch = make_scheduler(case.config, cls_name, opts)
        if sch is None:
            return None, 0, "option not kept"
        net = Counter(lambda x, t: oracle(x, torch.as_tensor(t, dtype=torch.float64)))
        torch.manual_seed(0)
        try:
            with torch.no_grad():
                x = _loop(sch, net, x_T.clone(), steps, grid, case.process)
        except (ValueError, IndexError, RuntimeError, AssertionError, ZeroDivisionError) as e:
            return None, 0, f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
        if net.calls <= nfe:
            return x, net.calls, ""
        if grid is not None:
            return None, 0, f"{net.calls} calls on a grid of {steps} steps"
        steps -= 1
    return None, 0, "no step count fits"


def _hash(x: torch.Tensor) -> str:
    return hashlib.sha1(x.to(torch.float64).numpy().tobytes()).hexdigest()


def run_diffusers(case: Case, nfe: int, space: list, failures: dict, only: set | None = None) -> list[dict]:
    """Every configuration of ``space`` (``only``: just these labels). Each is first run on the first 4 states
    (a probe): a configuration whose probe output is bit-identical to an earlier one's (the same computation
    under another option name) takes that one's result instead of a full run."""
    rows, seen = [], {}
    for label, cls_name, opts, per_step in space:
        if only is not None and label not in only:
            continue
        xp, calls, err = diffusers_run(case, cls_name, opts, per_step, nfe, x=case.x_start[:4])
        if xp is None:
            if err != "option not kept":
                failures.setdefault(label.split("+")[0] + " " + err, []).append(f"{case.name}@{nfe}")
            continue
        probe = _hash(xp)
        if probe in seen:
            rows.append({**seen[probe], "config": label, "spec": (cls_name, opts, per_step)})
            continue
        x, calls, err = diffusers_run(case, cls_name, opts, per_step, nfe)
        if x is None:
            failures.setdefault(label.split("+")[0] + " " + err, []).append(f"{case.name}@{nfe}")
            continue
        row = {"lib": "diffusers", "config": label, "nfe": calls, "rms": rms(x, case.ref), "hash": probe,
               "flips": _count(flipped(case, x)),
               "spec": (cls_name, opts, per_step)}
        seen[probe] = row
        rows.append(row)
    return rows


SAME_GRID = [  # (ours, sampler options, diffusers class, options)
    ("dpmpp_2m", {}, "DPMSolverMultistep", {}),
    ("dpmpp_3m", {}, "DPMSolverMultistep", {"solver_order": 3}),
    ("unipc[2]", {"order": 2}, "UniPCMultistep", {}),
    ("unipc", {}, "UniPCMultistep", {"solver_order": 3}),
    ("euler", {}, "EulerDiscrete", {}),
]


def same_grid_rows(case: Case, nfe: int, fitted: torch.Tensor) -> list[str]:
    out = []
    for gname in ("karras", "logsnr", "fitted"):
        for ours, oopts, cls_name, dopts in SAME_GRID:
            name = ours.split("[")[0]
            ts = fitted if gname == "fitted" else td.grids.get(gname, case.process, nfe)
            x = td.sample(case.model(), case.x_start, name, grid=ts, **oopts)
            xd, _, err = diffusers_run(case, cls_name, dopts, 1, nfe, grid=ts)
            d = f"{rms(xd, case.ref):.3e}" if xd is not None else f"failed ({err})"
            out.append(f"| {case.name} | {nfe} | {gname} | {ours} | {rms(x, case.ref):.3e} | {cls_name}"
                       f"({','.join(f'{k}={v}' for k, v in dopts.items())}) | {d} |")
    return out


# ------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------

CHOICES = {"order": [2, 3], "final_step": ["denoise", "extrapolate"]}  # chosen by the fit on pilot validation


def fit_grid(case: Case, nfe: int) -> tuple[torch.Tensor, dict, float]:
    """``td.grids.optimize(model, "unipc", nfe, x_T=pilot, choices=CHOICES)`` on pilot states drawn independently
    of the evaluation noise (the defaults otherwise: a third of the pilot validates, budget 300 runs; 60 on the
    digits model)."""
    pilot = case.draw(case.n_pilot, PILOT_SEED)
    t0 = time.time()
    digits = isinstance(case, DigitsCase)
    if not hasattr(case, "pilot_ref"):  # the fit's reference depends on the model only: solved once per model
        tol = 1e-5 if digits else 1e-6
        case.pilot_ref, case.pilot_ref_nfe = td.samplers.gridfit.end_state(case.model(), pilot, rtol=tol, atol=tol)
        case.pilot_ref_s = time.time() - t0
    # issue 16's fit, as its results file reports it (issue 33 made a cheaper, robust fit the default: fit_cost.py)
    kw = {"budget": DIGITS_BUDGET if digits else 300, "method": "search", "robust": False,
          "starts": ("logsnr", "karras", "optimized")}
    ts, info = td.grids.optimize(case.model(), A_PRIORI_OURS, nfe, x_T=pilot, choices=CHOICES, return_info=True,
                                 reference=case.pilot_ref, **kw)
    return ts, info, time.time() - t0


def _opt_label(opts: dict) -> str:
    return f"order {opts.get('order', 3)}, {opts.get('final_step', 'denoise')}"


def best(rows: list[dict], lib: str) -> dict:
    return min((r for r in rows if r["lib"] == lib), key=lambda r: r["rms"])


def digits_fd(case: DigitsCase, nfe: int, ts: torch.Tensor, opts: dict, d_ap: dict, d_best: dict) -> str:
    """FD (``DigitsEvaluator.fd``, one class-matched chunk: the evaluator's 359 held-out labels) of the converged
    ODE sample (rtol = atol = 1e-4), ours a priori, and diffusers' a-priori and best configurations, all from the
    same 359 x_T."""
    ev = case.evaluator
    y = ev.y_heldout
    x = case.draw(len(y), EVAL_SEED)
    model = case.model()
    out = {"ours a priori": td.sample(model, x, A_PRIORI_OURS, grid=ts, **opts)}
    for name, r in (("diffusers a priori", d_ap), ("diffusers' best", d_best)):
        xd, _, _ = diffusers_run(case, *r["spec"], nfe, x=x)
        out[name] = xd
    if not hasattr(case, "fd_ref"):
        case.fd_ref = ev.fd(td.samplers.gridfit.end_state(model, x, rtol=1e-4, atol=1e-4)[0].float(), y)
    return (f"- NFE {nfe}: FD (359 digits, floor {ev.fd_floor():.2f}; converged ODE sample {case.fd_ref:.2f}): "
            + "; ".join(f"{k} {ev.fd(v.float(), y):.2f}" for k, v in out.items()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer samples, cases and diffusers options")
    ap.add_argument("--nfe", type=int, nargs="*", default=list(NFES))
    ap.add_argument("--cases", nargs="*", default=None, help="only cases whose name contains one of these")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "samplers.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    space = diffusers_space(args.quick)
    head, detail, same, fits, failures, goal, fds, flip_rows = [], [], [], [], {}, [], [], []
    counts: dict[str, tuple] = {}
    ref_costs: dict[str, str] = {}
    top_ours: set[str] = set()
    top_diff: set[str] = set()
    all_cases = [*cases(args.quick), "digits"]
    for case in all_cases:
        name = case if isinstance(case, str) else case.name
        if args.cases and not any(c in name for c in args.cases):
            continue
        if case == "digits":
            case = DigitsCase("digits (trained U-Net)", N_DIGITS // (4 if args.quick else 1))
        t_case = time.time()
        case.ref = reference(case)
        configs = our_configs(case)
        digits = isinstance(case, DigitsCase)
        d = int(math.prod(case.x_start.shape[1:]))
        detail.append(f"\n### {case.name} (N = {case.n}, d = {d})\n")
        for nfe in args.nfe:
            ts, info, secs = fit_grid(case, nfe)
            opts = info["options"]
            # digits: only the configurations that ranked top 10 on some exact problem (its U-Net is ~50x dearer)
            rows = run_ours(case, configs, nfe, ts, only=top_ours if digits and top_ours else None)
            x = td.sample(case.model(), case.x_start, A_PRIORI_OURS, grid=ts, **opts)
            ap_ours = {"lib": "ours", "config": f"{A_PRIORI_OURS}[fitted: {_opt_label(opts)}] / fitted", "nfe": nfe,
                       "rms": rms(x, case.ref), "flips": _count(flipped(case, x))}
            rows.append(ap_ours)
            ap_label = "DPMSolverMultistep(solver_order=2,algorithm_type=dpmsolver++,solver_type=midpoint)+karras"
            drows = run_diffusers(case, nfe, space, failures,
                                  only=(top_diff | {ap_label, ap_label.replace("+karras", "+linspace")})
                                  if digits and top_diff else None)
            # DPM++2M Karras raises on the cosine schedule (IndexError in diffusers 0.42): its default spacing then
            ap_diff = next((r for r in drows if r["config"] == ap_label), None) or next(
                r for r in drows if r["config"] == ap_label.replace("+karras", "+linspace"))
            rows += drows
            o, dbest = best(rows, "ours"), best(rows, "diffusers")
            counts[case.name] = (len([r for r in rows if r["lib"] == "ours"]), len(drows),
                                 len({r["hash"] for r in drows}))
            if not digits:
                top = sorted(rows, key=lambda r: r["rms"])
                top_ours |= set([r["config"] for r in top if r["lib"] == "ours" and "fitted:" not in r["config"]][:10])
                top_diff |= set([r["config"] for r in top if r["lib"] == "diffusers"][:10])
            ratio_ap, ratio_best, ratio_apbest = ap_ours["rms"] / ap_diff["rms"], o["rms"] / dbest["rms"], \
                ap_ours["rms"] / dbest["rms"]
            limit = 1.0 if digits else 0.5
            term = ""
            if ratio_apbest > limit:
                flip_text, flip_share, flip_ratio = ("", 0.0, math.nan) if digits else flips(
                    case, x, diffusers_run(case, *dbest["spec"], nfe)[0], rows, ap_diff)
                dg = diagnose(case, A_PRIORI_OURS, ts, opts)
                term = (f"final step ({dg['final']} {dg['final_floor']:.2e} at s_last = {dg['s_last']:.3g} vs "
                        f"integration {dg['integration']:.2e})" if dg["final_floor"] >= dg["integration"] else
                        f"integration before the last level ({dg['integration']:.2e} vs {dg['final']} "
                        f"{dg['final_floor']:.2e} at s_last = {dg['s_last']:.3g})")
                if not digits:  # what calls at t >= t_min can give (on digits the reference is this solve)
                    if not hasattr(case, "converged"):
                        case.converged = rms(td.samplers.gridfit.end_state(case.model(), case.x_start, rtol=1e-6,
                                                                           atol=1e-6)[0], case.ref)
                    term += f"; a converged solve to t_min, extrapolated to noise 0, has {case.converged:.2e}"
                conc = concentration(x, case.ref)
                if conc:
                    term += "; " + conc
                if flip_share >= 0.5:  # the flips dominate: named first
                    term = f"{flip_text}; the split of the whole error: {term}"
                    flip_rows.append((case.name, nfe, flip_share, flip_ratio))
                elif flip_text:
                    term += "; " + flip_text
                if ap_ours["rms"] > 2 * info["val"]:
                    term += (f"; the fit did not carry over from the pilot (validation RMS {info['val']:.2e}, "
                             f"held-out {ap_ours['rms']:.2e})")
            goal.append((case.name, nfe, ratio_apbest <= limit, ratio_best <= limit, digits))
            head.append(f"| {case.name} | {nfe} | {ap_ours['rms']:.2e} ({_opt_label(opts)}) | {ap_diff['rms']:.2e} | "
                        f"{ratio_ap:.3f} | {o['rms']:.2e} | {dbest['rms']:.2e} | {ratio_best:.3f} | "
                        f"**{ratio_apbest:.3f}** | {'<= 1' if digits else '<= 0.5'} | {term or 'met'} |")
            fits.append(f"| {case.name} | {nfe} | {info['n_fit']} + {info['n_val']} | {info['start']} "
                        f"({_opt_label(info['start_options'])}) | {_opt_label(opts)} | {info['start_rms']:.2e} -> "
                        f"{info['rms']:.2e} | {info['start_val']:.2e} -> {info['val']:.2e} | {ap_ours['rms']:.2e} | "
                        f"{info['cost_runs']:.0f} | {info['cost_nfe']} ({info['reference_nfe']} ref.) | {secs:.1f} |")
            if digits:
                fds.append(digits_fd(case, nfe, ts, opts, ap_diff, dbest))
            else:
                same += same_grid_rows(case, nfe, ts)
            top = sorted(rows, key=lambda r: r["rms"])
            for lib in ("ours", "diffusers"):
                best5 = "; ".join(f"{r['config']} {r['rms']:.2e}" for r in [r for r in top if r["lib"] == lib][:5])
                detail.append(f"- NFE {nfe}, {lib} (best 5): {best5}")
            print(f"[{case.name} NFE {nfe}] a priori {ap_ours['rms']:.2e} ({_opt_label(opts)}) vs "
                  f"{ap_diff['rms']:.2e}; best {o['config']} {o['rms']:.2e} vs {dbest['config']} {dbest['rms']:.2e}; "
                  f"ours/diffusers' best {ratio_apbest:.3f} ({time.time() - t0:.0f}s)", flush=True)
        detail.append(f"\n({case.name}: {time.time() - t_case:.0f} s)")
        ref_costs[case.name] = f"{case.pilot_ref_nfe} calls, {case.pilot_ref_s:.0f} s"
        write_report(args.out, head, detail, same, fits, fds, failures, goal, flip_rows, counts, time.time() - t0,
                     args.quick,
                     ref_costs)
    print("\n".join(HEAD_COLS + head))


HEAD_COLS = [
    "| case | NFE | ours a-priori: unipc, order / final step / grid fitted on pilot noise | diffusers a-priori: "
    "DPM++2M Karras | ratio | ours best | diffusers' best | ratio best/best | **ours a-priori / diffusers' best** | "
    "goal | where the goal is missed: dominant error term |",
    "|---|---|---|---|---|---|---|---|---|---|---|"]


def write_report(path: str, head, detail, same, fits, fds, failures, goal, flip_rows, counts, seconds: float,
                 quick: bool, ref_costs: dict) -> None:
    import diffusers

    exact = [g for g in goal if not g[4]]
    dig = [g for g in goal if g[4]]
    count_lines = [f"- {name}: ours {o}, diffusers {d} ({k} distinct outcomes)" for name, (o, d, k) in counts.items()]
    lines = [
        "# Few-step samplers: torchdiffusion vs diffusers at full strength (exact Gaussian-mixture models and the "
        "trained digits model)",
        "",
        f"Generated by `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/samplers.py{' --quick' if quick else ''}` on "
        f"{datetime.date.today()} in {seconds:.0f} s (every line below is written by the script).",
        f"Machine: `{' '.join(platform.uname())}`, {os.cpu_count()} cores (shared with other jobs); python "
        f"{sys.version.split()[0]}, torch {torch.__version__}, diffusers {diffusers.__version__}.",
        "",
        "Error: RMS (per coordinate) of the samples to the exact PF-ODE solution from the same x_T (dopri5, "
        "rtol = atol = 1e-10, float64, to noise 0); on the digits model to its converged ODE sample (our dopri5 "
        "solve at rtol = atol = 1e-5, Tweedie's x0_hat near t_min extrapolated to noise 0). See the module "
        "docstring of `benchmarks/samplers.py` for the problems, the configurations and what is held out.",
        "",
        "Configurations per (case, NFE) (ours: every deterministic sampler and variant x every named grid, the fitted "
        "grid where its interval count fits, and the a-priori choice; diffusers: every deterministic scheduler x "
        "solver options x sigma spacing x final-step options that it accepts, duplicates found by a 4-state probe "
        "counted but not rerun; on the digits model only the configurations of either library that ranked in the top "
        "10 on some exact problem at some NFE, plus diffusers' a-priori one):",
        *count_lines,
        "",
        f"Goal (ours a-priori <= 0.5 x diffusers' best on the exact problems): met in {sum(g[2] for g in exact)} of "
        f"{len(exact)} rows; best-vs-best <= 0.5 in {sum(g[3] for g in exact)} of {len(exact)}.",
        f"Goal on the digits model (ours a-priori <= diffusers' best, RMS): met in {sum(g[2] for g in dig)} of "
        f"{len(dig)} rows; best-vs-best <= 1 in {sum(g[3] for g in dig)} of {len(dig)}.",
        f"Rows that miss the goal on the exact problems: {sum(not g[2] for g in exact)}; of them, with half or more "
        "of our squared error in component flips (states whose sample ends in another mixture component than the "
        f"exact solution): {len(flip_rows)}" + (": " + "; ".join(
            f"{n} NFE {k} ({100 * sh:.0f} %; on the states where neither ours nor diffusers' best flips, ours / "
            f"diffusers' best = {r:.3f})" for n, k, sh, r in flip_rows) if flip_rows else "") + ".",
        "",
        *HEAD_COLS, *head,
        "",
        *(["## Digits model: Frechet distance", "", *fds, ""] if fds else []),
        "## The fitted grids (`td.grids.optimize(model, 'unipc', NFE, x_T=pilot, choices={order: [2, 3], "
        "final_step: [denoise, extrapolate]})`)",
        "",
        "Pilot: states drawn with another seed than the scored x_T (as many as the scored states, at least 96; 96 "
        "on the digits model); a third of them is held out for validation and never seen by the search. Fit and "
        "validation RMS are against the fit's own reference (`gridfit.end_state`), start -> returned grid; "
        "held-out RMS is the headline error. Cost in sampling runs of NFE network calls on the pilot batch "
        "(the reference solve of the pilot, done once per model and shared by the three NFE, not included: "
        + "; ".join(f"{k} {v}" for k, v in ref_costs.items()) + ").",
        "",
        "| case | NFE | pilot fit + validation | start grid (options) | options chosen | fit RMS | validation RMS | "
        "held-out RMS | cost (runs) | network calls | seconds (with the reference the first time) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *fits,
        "",
        "## Same grid, both libraries",
        "",
        "Our grid handed to diffusers (its `timesteps`/`sigmas` replaced after `set_timesteps`).",
        "",
        "| case | NFE | grid | ours | RMS | diffusers | RMS |",
        "|---|---|---|---|---|---|---|",
        *same,
        "",
        "## Best configurations per case",
        *detail,
        "",
        "## diffusers configurations that raised (left out)",
        "",
        *[f"- {k}: {len(v)} runs (e.g. {', '.join(v[:3])})" for k, v in sorted(failures.items())],
    ]
    _report.write_results(Path(path), lines, echo=False)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
