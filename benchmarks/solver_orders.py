"""Empirical convergence order of every deterministic PF-ODE solver: torchdiffusion's, and diffusers' schedulers of
the same name (k-diffusion's samplers too where ``k_diffusion`` imports), on problems with a known solution.

Run (about 10 s on 2 CPU cores):  .venv/bin/python benchmarks/solver_orders.py

Problems (1-D, float64, VP process beta 0.1 -> 20, x_T = -2, 0.5, 1.7 at t_max):

- ``gaussian``: data N(0.3, 0.05). The PF-ODE has a closed-form solution: ``z = (x - alpha m) / sqrt(alpha^2 v +
  sigma^2)`` is constant along it. The solve stops at SNR = 1 (lambda = log(alpha / sigma) = 0): there every
  solver but ipndm is in its asymptotic regime at 16-128 intervals (down to t_min, the error constants of the third- and
  fourth-order exponential integrators nearly cancel over the trajectory, so their ratios wander for hundreds of
  steps before settling).
- ``mixture``: two components 0.3 N(-1, 0.04) + 0.7 N(0.8, 0.09) (nonlinear), solved down to t_min = 1e-3; the
  reference is ``td.sample(model, x_T, "ode", rtol=1e-11, atol=1e-11)``'s state at t_min (read with ``callback``).

Every solver walks the same grid, uniform in lambda from t_max to the end time, with n = 16, 32, 64, 128 intervals
(an interval costs 2 NFE for heun and dpmpp_2s, 4 for rk4, 1 for the others), and the error is the max over the
three points of the state at the end time, before any final denoising (Tweedie) step, which would dominate: for
our samplers the grid is continued to noise 0 and the state is taken from ``callback`` at the end time; diffusers'
schedulers get the grid's VE sigmas ``sigma / alpha`` written into ``scheduler.sigmas`` (and our times as
``scheduler.timesteps``, passed to the exact model), with ``lower_order_final=False``. The empirical order is the
least-squares slope of log error against log n; "last" is log2 of the error ratio of the last doubling.
Theoretical orders: UniPC's corrector raises its predictor's order p to p + 1; diffusers' ``DPMSolverMultistep
(solver_order=3)`` is third order by its documentation; DEIS (``DEISMultistepScheduler``) is compared with our
variable-step Adams-Bashforth ``ipndm`` of the same order.

Results go to benchmarks/results/solver_orders.md (written entirely by this script).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import _report
import torchdiffusion as td
from torchdiffusion.samplers import Bound

NS = (16, 32, 64, 128)  # more would bring diffusers' float32 round-off (rounds_to_float32) into view
X_T = torch.tensor([[-2.0], [0.5], [1.7]], dtype=torch.float64)
LOF = {"lower_order_final": False}

# label -> (our sampler, options, theoretical order)
OURS = {
    "euler": ("euler", {}, 1),
    "ddim": ("ddim", {}, 1),
    "heun": ("heun", {}, 2),
    "dpmpp_2s": ("dpmpp_2s", {}, 2),
    "dpmpp_2m": ("dpmpp_2m", LOF, 2),
    "dpmpp_2m[taylor]": ("dpmpp_2m", {**LOF, "solver_type": "taylor"}, 2),
    "dpmpp_3m": ("dpmpp_3m", LOF, 3),
    "unipc[1,bh1]": ("unipc", {**LOF, "order": 1, "variant": "bh1"}, 2),
    "unipc[1,bh2]": ("unipc", {**LOF, "order": 1, "variant": "bh2"}, 2),
    "unipc[2,bh1]": ("unipc", {**LOF, "order": 2, "variant": "bh1"}, 3),
    "unipc[2,bh2]": ("unipc", {**LOF, "order": 2, "variant": "bh2"}, 3),
    "unipc[3,bh1]": ("unipc", {**LOF, "order": 3, "variant": "bh1"}, 4),
    "unipc[3,bh2]": ("unipc", {**LOF, "order": 3, "variant": "bh2"}, 4),
    "ipndm[2]": ("ipndm", {"order": 2}, 2),
    "ipndm[3]": ("ipndm", {"order": 3}, 3),
    "ipndm[4]": ("ipndm", {"order": 4}, 4),
    "rk4": ("rk4", {}, 4),
}

# our label -> (diffusers scheduler, config, its nominal order)
_DPM = {"algorithm_type": "dpmsolver++", "final_sigmas_type": "sigma_min", **LOF}
DIFFUSERS = {
    "euler": ("EulerDiscreteScheduler", {}, 1),
    "heun": ("HeunDiscreteScheduler", {}, 2),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {**_DPM, "solver_order": 2, "solver_type": "midpoint"}, 2),
    "dpmpp_2m[taylor]": ("DPMSolverMultistepScheduler", {**_DPM, "solver_order": 2, "solver_type": "heun"}, 2),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", {**_DPM, "solver_order": 3}, 3),
    **{f"unipc[{p},{v}]": ("UniPCMultistepScheduler", {**LOF, "solver_order": p, "solver_type": v}, p + 1)
       for p in (1, 2, 3) for v in ("bh1", "bh2")},
    "ipndm[2]": ("DEISMultistepScheduler", {**LOF, "solver_order": 2}, 2),
    "ipndm[3]": ("DEISMultistepScheduler", {**LOF, "solver_order": 3}, 3),
}
SIGMA_SPACE = ("EulerDiscreteScheduler", "HeunDiscreteScheduler")  # their sample is y = x / alpha

# our label -> (k-diffusion sampler, options, its nominal order)
KDIFF = {
    "euler": ("sample_euler", {}, 1),
    "heun": ("sample_heun", {}, 2),
    "dpmpp_2s": ("sample_dpmpp_2s_ancestral", {"eta": 0.0}, 2),
    "dpmpp_2m": ("sample_dpmpp_2m", {}, 2),
    "dpmpp_3m": ("sample_dpmpp_3m_sde", {"eta": 0.0}, 3),
    "ipndm[4]": ("sample_lms", {"order": 4}, 4),
}


@dataclass
class Problem:
    name: str
    model: td.Denoiser
    t_end: torch.Tensor
    exact: torch.Tensor

    @property
    def process(self):
        return self.model.process

    def grid(self, n: int) -> torch.Tensor:
        """n + 1 times uniform in lambda from t_max down to t_end (both exact)."""
        proc = self.process
        lam0, lam1 = float(proc.log_snr(proc.t_max)) / 2, float(proc.log_snr(self.t_end)) / 2
        ts = proc.t_from_log_snr(2 * torch.linspace(lam0, lam1, n + 1, dtype=torch.float64))
        ts[0], ts[-1] = proc.t_max, self.t_end
        return ts


def gaussian_problem() -> Problem:
    m, v = 0.3, 0.05
    proc = td.VP()
    model = td.Denoiser(td.GaussianMixture.gaussian(m, v, dim=1).net(proc, "eps"), proc, "eps")
    t_end = proc.t_from_log_snr(torch.tensor(0.0, dtype=torch.float64))  # SNR = 1
    a, s = proc.alpha(proc.t_max), proc.sigma(proc.t_max)
    z = (X_T - a * m) / torch.sqrt(a**2 * v + s**2)
    a, s = proc.alpha(t_end), proc.sigma(t_end)
    return Problem("gaussian", model, t_end, a * m + torch.sqrt(a**2 * v + s**2) * z)


def mixture_problem() -> Problem:
    proc = td.VP()
    gm = td.GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-1.0], [0.8]]), torch.tensor([0.04, 0.09]))
    model = td.Denoiser(gm.net(proc, "eps"), proc, "eps")
    states = []
    td.sample(model, X_T.clone(), "ode", rtol=1e-11, atol=1e-11, callback=lambda d: states.append(d["x"]))
    return Problem("mixture", model, torch.tensor(proc.t_min, dtype=torch.float64), states[0])


# --- the three libraries ----------------------------------------------------------------------------------------

def run_ours(problem: Problem, sampler: str, opts: dict, n: int) -> torch.Tensor:
    """Our sampler on the grid continued to noise 0; the state at the end time from ``callback``."""
    proc = problem.process
    ts = torch.cat([problem.grid(n), torch.tensor([proc.t_zero], dtype=torch.float64)])
    states = {}
    td.samplers.get(sampler).fn(Bound(problem.model), X_T.clone(), ts,
                                callback=lambda d: states.setdefault(d["i"], d["x"]), **opts)
    return states[n - 1]


def run_diffusers(problem: Problem, cls_name: str, config: dict, n: int) -> torch.Tensor:
    import diffusers

    proc, model = problem.process, problem.model
    ts = problem.grid(n)
    s = proc.sigma(ts) / proc.alpha(ts)  # VE sigmas; for a VP, alpha = 1 / sqrt(1 + s^2) as diffusers assumes
    sch = getattr(diffusers, cls_name)(num_train_timesteps=1000, **config)
    sch.set_timesteps(n)
    if cls_name == "HeunDiscreteScheduler":  # [s0, s1, s1, ..., s_n-1, s_n-1, s_n]: a correction in every interval
        sch.sigmas = torch.cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])
        times = torch.cat([ts[:1], ts[1:].repeat_interleave(2)])[:-1]
    else:
        sch.sigmas = s.clone()
        times = ts[:-1].clone()
    sch.timesteps = times
    sch._step_index, sch._begin_index = None, None
    sigma_space = cls_name in SIGMA_SPACE
    x = X_T * math.sqrt(1 + float(s[0]) ** 2) if sigma_space else X_T.clone()
    for t in times:
        _, eps = model.predict(sch.scale_model_input(x, t), t)
        x = sch.step(eps, t, x).prev_sample
    return x / math.sqrt(1 + float(s[-1]) ** 2) if sigma_space else x


def run_kdiffusion(problem: Problem, fn_name: str, opts: dict, n: int) -> torch.Tensor:
    from k_diffusion import sampling

    proc, model = problem.process, problem.model
    ts = problem.grid(n)
    s = proc.sigma(ts) / proc.alpha(ts)

    def denoiser(y, sigma):  # k-diffusion's model: VE sample y = x / alpha and sigma -> x0
        t = proc.t_from_log_snr(-2 * torch.log(sigma.reshape(-1)[:1].to(torch.float64)))[0]
        x0, _ = model.predict(y / torch.sqrt(1 + sigma.to(torch.float64) ** 2).reshape(-1, 1), t)
        return x0

    if opts.get("eta") == 0:  # deterministic: no noise sampler (the default Brownian tree needs torchsde)
        opts = {**opts, "noise_sampler": lambda sigma, sigma_next: torch.zeros_like(X_T)}
    y = getattr(sampling, fn_name)(denoiser, X_T * math.sqrt(1 + float(s[0]) ** 2), s, disable=True, **opts)
    return y / math.sqrt(1 + float(s[-1]) ** 2)


def kdiffusion_status() -> str | None:
    """None if k-diffusion's samplers import, else why not."""
    try:
        import k_diffusion.sampling  # noqa: F401
    except Exception as e:  # noqa: BLE001 (any import failure means: not available)
        return f"{type(e).__name__}: {e}"
    return None


# --- measurement ------------------------------------------------------------------------------------------------

def order_of(errs: list[float]) -> tuple[float, float]:
    """(least-squares slope of -log err against log n, log2 of the last doubling's error ratio)."""
    xs = [math.log(n) for n in NS]
    ys = [math.log(max(e, 1e-300)) for e in errs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    return -slope, math.log2(errs[-2] / errs[-1])


def measure(problem: Problem, run, *args) -> dict | str:
    try:
        with torch.no_grad():
            errs = [float((run(problem, *args, n) - problem.exact).abs().max()) for n in NS]
    except Exception as e:  # noqa: BLE001 (a library that fails on a configuration is reported, not fatal)
        return f"{type(e).__name__}: {e}"[:120]
    fit, last = order_of(errs)
    return {"errs": errs, "fit": fit, "last": last}


def cell(r: dict | str | None) -> str:
    if r is None:
        return "-"
    if isinstance(r, str):
        return r if r == "not importable" else f"failed ({r})"
    return f"{r['fit']:.2f} / {r['last']:.2f}"


def err_cell(r: dict | str | None) -> str:
    return f"{r['errs'][-1]:.2e}" if isinstance(r, dict) else "-"


def within(r: dict | str | None, p: int) -> bool:
    """The last doubling's error ratio within +-15 % of 2^p (the tests' window)."""
    return isinstance(r, dict) and abs(r["last"] - p) <= math.log2(1.15)


def rounds_to_float32(cls_name: str) -> bool:
    """Whether the scheduler's ``step`` casts the state to float32 (a round-off floor near 1e-7)."""
    import inspect

    import diffusers

    return "sample.to(torch.float32)" in inspect.getsource(getattr(diffusers, cls_name).step)


def machine() -> str:
    threads = f"torch threads {torch.get_num_threads()}" + \
        (f" (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})" if "OMP_NUM_THREADS" in os.environ else "")
    return f"{' '.join(platform.uname())}; cpus {os.cpu_count()}; {threads}"


def versions() -> str:
    import diffusers

    return f"python {sys.version.split()[0]}, torch {torch.__version__}, diffusers {diffusers.__version__}"


def diffusers_label(cls_name: str, config: dict) -> str:
    shown = {k: v for k, v in config.items() if k not in ("lower_order_final", "final_sigmas_type")}
    return cls_name.replace("Scheduler", "") + (f"({', '.join(f'{k}={v}' for k, v in shown.items())})"
                                                if shown else "")


def measure_all(problem: Problem, kd_missing: str | None) -> dict:
    """label -> {"ours": ..., "diffusers": ..., "kdiff": ...} (each a measure() result, or None)."""
    res = {}
    print(f"\n{problem.name}")
    for label, (sampler, opts, p) in OURS.items():
        r = {"ours": measure(problem, run_ours, sampler, opts), "diffusers": None, "kdiff": None}
        if label in DIFFUSERS:
            cls_name, cfg, _ = DIFFUSERS[label]
            r["diffusers"] = measure(problem, run_diffusers, cls_name, cfg)
        if label in KDIFF:
            k_fn, k_opts, _ = KDIFF[label]
            r["kdiff"] = "not importable" if kd_missing else measure(problem, run_kdiffusion, k_fn, k_opts)
        res[label] = r
        print(f"  {label:18s} theory {p}  ours {cell(r['ours']):14s}  diffusers {cell(r['diffusers']):14s}  "
              f"k-diffusion {cell(r['kdiff'])}")
    return res


def table(problem: Problem, res: dict) -> list[str]:
    lines = [f"## {problem.name}", "",
             "| solver | theory | ours: order fit / last | diffusers scheduler | nominal | diffusers: order fit / last "
             f"| k-diffusion sampler | k-diffusion: order fit / last | ours: error at n = {NS[-1]} "
             f"| diffusers: error at n = {NS[-1]} |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, (_, _, p) in OURS.items():
        r = res[label]
        d_name, d_nom = (diffusers_label(DIFFUSERS[label][0], DIFFUSERS[label][1]), DIFFUSERS[label][2]) \
            if label in DIFFUSERS else ("-", "-")
        if label in KDIFF:
            k_fn, k_opts, _ = KDIFF[label]
            k_name = k_fn + (f"({', '.join(f'{k}={v}' for k, v in k_opts.items())})" if k_opts else "")
        else:
            k_name = "-"
        lines.append(f"| {label} | {p} | {cell(r['ours'])} | {d_name} | {d_nom} | {cell(r['diffusers'])} | "
                     f"{k_name} | {cell(r['kdiff'])} | {err_cell(r['ours'])} | {err_cell(r['diffusers'])} |")
    return lines + [""]


def reading(results: dict) -> list[str]:
    """Findings computed from the measurements (so the file needs no hand edits)."""
    out = ["## Reading (generated from the numbers above)", ""]
    for name, res in results.items():
        bad = [f"{label} ({res[label]['ours']['last']:.2f} vs {p})" if isinstance(res[label]["ours"], dict)
               else label for label, (_, _, p) in OURS.items() if not within(res[label]["ours"], p)]
        out.append(f"- {name}: our solvers whose last doubling is within +-15 % of 2^order: "
                   f"{sum(within(res[k]['ours'], p) for k, (_, _, p) in OURS.items())} of {len(OURS)}"
                   + (f"; not: {', '.join(bad)}" if bad else "") + ".")
        dbad = [f"{diffusers_label(c, cfg)} ({res[k]['diffusers']['last']:.2f} vs nominal {q})"
                for k, (c, cfg, q) in DIFFUSERS.items()
                if isinstance(res[k]["diffusers"], dict) and not within(res[k]["diffusers"], q)]
        out.append(f"- {name}: diffusers' schedulers off their nominal order by more than +-15 % in the ratio: "
                   + (", ".join(dbad) if dbad else "none") + ".")
    o = {n: r["dpmpp_3m"]["ours"] for n, r in results.items()}
    d = {n: r["dpmpp_3m"]["diffusers"] for n, r in results.items()}
    if all(isinstance(v, dict) for v in (*o.values(), *d.values())):
        out.append("- DPM-Solver++(3M): ours " + ", ".join(f"{o[n]['last']:.2f} ({n})" for n in o)
                   + "; diffusers' `DPMSolverMultistepScheduler(solver_order=3)` "
                   + ", ".join(f"{d[n]['last']:.2f} ({n})" for n in d)
                   + " (empirical order of the last doubling). diffusers' third-order update weights the quadratic "
                   "part of the x0 interpolant by half the exact phi weight (benchmarks/results/samplers.md), which "
                   "leaves a second-order error term; ours integrates the quadratic interpolant exactly.")
    f32 = sorted({c for c, _, _ in DIFFUSERS.values() if rounds_to_float32(c)})
    if f32:
        out.append(f"- {', '.join(f32)} cast the state to float32 in `step()` (\"upcast\"), so their errors "
                   "carry round-off of about 1e-7 times the state; the error columns show how far above it they are.")
    out.append("- ipndm (Adams-Bashforth in s = sigma / alpha on a grid geometric in s) approaches its ratio "
               "slowly (16 times the error per halving for order 4 only from a few hundred intervals on); the "
               "tests measure it at 128 -> 256 (order 2) and 256 -> 512 intervals (orders 3 and 4).")
    out.append("- tests/test_solvers.py::test_order_of_convergence checks our orders on the `gaussian` problem "
               "with the error ratio on step doubling within +-15 % of 2^order.")
    return out + [""]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/solver_orders.md")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    kd_missing = kdiffusion_status()
    problems = (gaussian_problem(), mixture_problem())
    results = {p.name: measure_all(p, kd_missing) for p in problems}
    lines = [line for p in problems for line in table(p, results[p.name])] + reading(results)
    seconds = time.time() - t0
    write_report(a.out, lines, kd_missing, seconds)
    print(f"\n{seconds:.1f} s; wrote {a.out}")


def write_report(path: str, lines: list[str], kd_missing: str | None, seconds: float) -> None:
    kd = ("k-diffusion: imported and measured." if kd_missing is None else
          f"k-diffusion: not importable here ({kd_missing}), so its columns say so. It is on PyPI "
          "(`k-diffusion`), but its package imports its training and evaluation code too (torchvision, torchsde, "
          "clean-fid, kornia, wandb, ...), which this project does not install for a benchmark; with it "
          "installed this script measures `sample_euler`, `sample_heun`, `sample_dpmpp_2s_ancestral(eta=0)`, "
          "`sample_dpmpp_2m`, `sample_dpmpp_3m_sde(eta=0)` and `sample_lms(order=4)` on the same grids.")
    out = [
        "# Empirical convergence orders of the PF-ODE solvers (ours vs diffusers' same-named schedulers)",
        "",
        "Written by `.venv/bin/python benchmarks/solver_orders.py` (no hand edits); the problems and the method "
        "are described in the script's docstring.",
        "",
        f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}. Machine: {machine()}. {versions()}. "
        f"Run time {seconds:.1f} s.",
        "",
        "Each cell \"fit / last\" is the empirical order: the least-squares slope of log(max error) against "
        f"log(number of intervals) over n = {', '.join(map(str, NS))} (grid uniform in lambda, float64, error at "
        "the end time before any final denoising step), and log2 of the error ratio of the last doubling "
        f"(n = {NS[-2]} -> {NS[-1]}). \"theory\": the order the method is designed to have; \"nominal\": the order "
        "diffusers' documentation gives its scheduler. Stochastic samplers (ddpm, ddim with eta > 0, "
        "dpmpp_2m_sde, euler_maruyama, reverse_diffusion, pc, annealed_langevin, py24) are not ODE solvers and "
        "have no place here; `ode` is the adaptive reference itself. Problems: `gaussian` = N(0.3, 0.05) from "
        "t_max to SNR = 1 (closed form); `mixture` = 0.3 N(-1, 0.04) + 0.7 N(0.8, 0.09) from t_max to t_min "
        "(reference: adaptive dopri5 at rtol = atol = 1e-11); VP (beta 0.1 -> 20), x_T = -2, 0.5, 1.7.",
        "",
        kd,
        "",
        *lines,
    ]
    _report.write_results(Path(path), out, echo=False)


if __name__ == "__main__":
    main()
