"""Bits/dim on held-out 8x8 digits (issue 17): every model trained on digits[:1200] only and scored on all 597
digits[1200:], by the probability-flow ODE (uniform dequantization, Hutchinson) and by the variational bound, beside
two anchors computed here (the uniform distribution over the 17 levels, and a scikit-learn GaussianMixture with 5
full-covariance components fitted on dequantized digits[:1200]).

    .venv/bin/python benchmarks/likelihood.py                       # every model (hours on 2 busy cores)
    .venv/bin/python benchmarks/likelihood.py --models likelihood_digits,vp_digits   # a subset
    .venv/bin/python benchmarks/likelihood.py --report              # only assemble the table from finished models
    .venv/bin/python benchmarks/likelihood.py --quick               # smoke run (few steps, 64 test digits)
    .venv/bin/python benchmarks/likelihood.py --partial --models M  # score M's latest checkpoint (still training)

Each model trains in ``--work`` (default runs/bench_likelihood/NAME, resumable: an interrupted run continues) and its
scores are cached there as JSON, so that several shells can run disjoint ``--models`` at once (a cached score is
used only while the folder's saved config is still the recipe of its name: ``check_cached``); every run
rewrites the results file from all finished models. Models: the presets ``vp_digits``, ``digits`` (class-conditional,
scored with the null label) and ``likelihood_digits`` at their own step counts, and ablations of issue 17's items 1-2
at ``--ablation-steps`` (default 2000, the other presets' budget) next to the recipe they change (likelihood_digits
without augmentation) at that budget.
Results go to benchmarks/results/likelihood.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from _report import write_results
from torchdiffusion.data.datasets import Dataset, load
from torchdiffusion.likelihood import bits_per_dim, dequantize
from torchdiffusion.runs import config
from torchdiffusion.runs.build import load_run
from torchdiffusion.runs.train import build_trainer, ema_model
from torchdiffusion.training.checkpoint import load_json

LEVELS, N_TRAIN = 17, 1200
# the recipe as it was before data.augment joined the preset (the ablations of items 1-2 change that recipe)
NO_AUGMENT = ["data.augment=0"]
# name -> (preset, --set overrides, steps: None = the preset's own, "ablation" = --ablation-steps, what it tests)
MODELS: dict[str, tuple[str, list[str], str | None, str]] = {
    "vp_digits": ("vp_digits", [], None, "preset: VP SDE, eps weighting, trained on the 17-level grid values"),
    "digits": ("digits", [], None, "preset: cosine DDPM, v-prediction, L_simple, class-conditional"),
    "likelihood_digits": ("likelihood_digits", [], None,
                          "preset: VDM bound, learned schedule, Fourier features, uniform dequantization, "
                          "non-leaking augmentation"),
    "without augmentation (3000 steps)": ("likelihood_digits", NO_AUGMENT + ["train.steps=3000"], None,
                                          "the preset's recipe before augmentation (its former default)"),
    "without augmentation (9000 steps)": ("likelihood_digits", NO_AUGMENT + ["train.steps=9000"], None,
                                          "the same for the whole 30-minute budget on 2 cores: overfits"),
    "without augmentation (short)": ("likelihood_digits", NO_AUGMENT, "ablation",
                                     "the recipe without augmentation at the ablation budget"),
    "no-dequantization": ("likelihood_digits", NO_AUGMENT + ["loss.dequantize=none"], "ablation",
                          "item 1: trained on grid values (discretized decoder at t_min)"),
    "variational-dequantization": ("likelihood_digits", NO_AUGMENT + ["loss.dequantize=variational",
                                                                      "model.dequantizer=true"],
                                   "ablation", "item 1: learned q(u | k) instead of uniform"),
    "vp_digits+dequantization": ("vp_digits", ["loss.dequantize=uniform"], None,
                                 "item 1 alone: vp_digits trained on uniformly dequantized digits"),
    "fixed-vp-schedule": ("likelihood_digits", NO_AUGMENT + ["process.name=vp"], "ablation",
                          "item 2: the VP SDE's fixed schedule instead of the learned one (times importance sampled)"),
    "no-fourier": ("likelihood_digits", NO_AUGMENT + ["model.fourier_features=[]"], "ablation",
                   "item 2: no Fourier features"),
    "uniform-times": ("likelihood_digits", NO_AUGMENT + ["loss.time_sampler=uniform"], "ablation",
                      "item 2: independent uniform times instead of antithetic pairs"),
}
ODE = {"divergence": "hutchinson", "rtol": 1e-5, "atol": 1e-5}


def split() -> tuple[Dataset, torch.Tensor]:
    d = load("digits")
    train = Dataset(d.x[:N_TRAIN], d.y[:N_TRAIN], levels=LEVELS, num_classes=10, name="digits")
    return train, d.x[N_TRAIN:]


def summary(bpd: torch.Tensor, seconds: float, nfe: float, variant: str, method: str) -> dict:
    bpd = bpd.double()
    se = float(bpd.std() / math.sqrt(len(bpd)))
    return {"method": method, "variant": variant, "bpd": float(bpd.mean()), "se": se,
            "median": float(bpd.median()), "max": float(bpd.max()), "nfe": nfe, "seconds": seconds, "n": len(bpd),
            "values": [round(float(v), 5) for v in bpd]}


def merge_slices(parts: list[dict]) -> dict:
    """One result from the slices of the test digits scored by separate processes (``--slice i/n``): rows rebuilt
    from the per-digit values; eval seconds are the slowest slice's (they ran at the same time)."""
    out = dict(parts[0])
    rows = []
    for k, r0 in enumerate(parts[0]["rows"]):
        vals = torch.tensor([v for p in parts for v in p["rows"][k]["values"]], dtype=torch.float64)
        nfe = sum(p["rows"][k]["nfe"] * p["rows"][k]["n"] for p in parts) / len(vals)
        rows.append(summary(vals, max(p["rows"][k]["seconds"] for p in parts), nfe, r0["variant"], r0["method"]))
    out["rows"] = rows
    return out


def anchors(train: Dataset, test: torch.Tensor) -> list[dict]:
    """Uniform over the 17 levels (exact) and sklearn's GaussianMixture (5 full components) on dequantized digits,
    scored on the same uniform dequantization of the test digits: (-log p(y) + 64 log(17/2)) / (64 ln 2)."""
    from sklearn.mixture import GaussianMixture

    D = test[0].numel()
    uniform = torch.full((len(test),), math.log2(LEVELS))
    g = torch.Generator().manual_seed(0)
    y_train = dequantize(train.x.flatten(1).double(), LEVELS, (-1, 1), g).numpy()
    y_test = dequantize(test.flatten(1).double(), LEVELS, (-1, 1), g).numpy()
    t0 = time.time()
    gm = GaussianMixture(5, covariance_type="full", random_state=0).fit(y_train)
    fit_s = time.time() - t0
    t0 = time.time()
    nll = -torch.tensor(gm.score_samples(y_test)) + D * math.log(LEVELS / 2)
    return [{"name": "uniform", "train_s": 0.0, "steps": 0, "what": "anchor: uniform over the 17 levels",
             "rows": [summary(uniform, 0.0, 0, "exact", "exact")]},
            {"name": "GaussianMixture", "train_s": fit_s, "steps": 0,
             "what": "anchor: sklearn GaussianMixture, 5 full-covariance components, dequantized digits[:1200]",
             "rows": [summary(nll / (D * math.log(2)), time.time() - t0, 0, "uniform dequantization", "exact")]}]


def evaluate(model, test: torch.Tensor, cfg: dict, batch: int) -> list[dict]:
    rows = []
    runs = [("ode", "uniform dequantization, Hutchinson, rtol 1e-5", {**ODE})]
    if model.process.discrete:
        runs.append(("vlb", "DDPM bound, 100 sampled of 1000 terms, small var.", {"n_t": 100, "variance": "small"}))
    else:
        runs.append(("vlb", "continuous bound, uniform dequantization, 32 times", {"n_t": 32,
                                                                                  "dequantize": "uniform"}))
        if cfg["loss"].get("dequantize") == "variational":
            runs.append(("vlb", "continuous bound, variational dequantization, 32 times",
                         {"n_t": 32, "dequantize": "variational"}))
            runs[0] = ("ode", "variational dequantization, Hutchinson, rtol 1e-5", {**ODE, "dequantize": "variational"})
        if cfg["loss"].get("dequantize", "none") == "none":
            runs.append(("vlb", "continuous bound, discretized decoder on the levels, 32 times",
                         {"n_t": 32, "dequantize": "none"}))
    for method, variant, opts in runs:
        g = torch.Generator().manual_seed(0)
        t0 = time.time()
        parts, nfe = [], 0.0
        for i in range(0, len(test), batch):
            xb = test[i: i + batch]
            try:
                r = bits_per_dim(model, xb, method=method, levels=LEVELS, value_range=(-1, 1), generator=g, **opts)
            except ValueError as e:  # a diverging ODE solve is reported, then scored with x0_hat clamped to [-1, 1]
                if method != "ode":
                    raise
                print(f"  ode: {str(e)[:200]}; retrying with x0_hat in [-1, 1]", flush=True)
                variant = variant + ", x0_hat in [-1, 1] (the plain solve diverged)"
                r = bits_per_dim(model, xb, method=method, levels=LEVELS, value_range=(-1, 1), generator=g,
                                 x0_range=(-1.0, 1.0), **opts)
            parts.append(r.bpd.detach())
            nfe += r.nfe * len(xb)
        row = summary(torch.cat(parts), time.time() - t0, nfe / len(test), variant, method)
        rows.append(row)
        print(f"  {method:4s} {variant:60s} {row['bpd']:.3f} +- {row['se']:.3f} (median {row['median']:.3f}, "
              f"max {row['max']:.2f}) NFE {row['nfe']:.0f} {row['seconds']:.0f} s", flush=True)
    return rows


def recipe(name: str, ablation_steps: int, quick: bool, threads: int | None = None) -> tuple[list[str], dict]:
    """The ``--set`` list and the resolved config that model ``name`` trains with."""
    preset, sets, steps, _ = MODELS[name]
    sets = list(sets)
    if steps == "ablation":  # one thread each, so that two ablations train side by side on the 2 cores
        sets += [f"train.steps={ablation_steps}", "train.threads=1"]
    if quick:
        sets.append("train.steps=20")
    if threads is not None:  # e.g. 1 while another job shares the 2 cores
        sets.append(f"train.threads={threads}")
    return sets, config.resolve(preset, [*sets, "train.device=cpu", "train.ckpt_every=500", "train.log_every=100"])


# settings that do not change what is trained (threads, device, logging): a cached score ignores them
NOT_RECIPE = {"train": ("threads", "device", "ckpt_every", "log_every")}


def _recipe_part(cfg: dict) -> dict:
    """``cfg`` as ``{"section.key": value}`` without ``run``/``sample`` and the settings of :data:`NOT_RECIPE`."""
    flat = {}
    for sec, v in cfg.items():
        if sec in ("run", "sample"):
            continue
        items = v.items() if isinstance(v, dict) else [("", v)]
        flat.update({f"{sec}.{k}".rstrip("."): vv for k, vv in items if k not in NOT_RECIPE.get(sec, ())})
    return flat


def check_cached(name: str, work: Path, ablation_steps: int, quick: bool) -> None:
    """Refuse scores cached in ``work/name`` that were trained with another recipe than ``MODELS[name]`` now gives
    (e.g. a folder of a renamed or changed recipe): the run folder's saved config, with today's defaults filled in,
    must equal the recipe's in every section but ``run``/``sample`` and the settings of :data:`NOT_RECIPE`."""
    saved_path = work / name / "config.json"
    if not saved_path.is_file():
        raise SystemExit(f"{name}: cached scores in {work / name} have no config.json to check them against; delete "
                         "the folder or use another --work")
    saved = _recipe_part(config.with_defaults(load_json(saved_path)))
    want = _recipe_part(recipe(name, ablation_steps, quick)[1])
    diff = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
    if diff:
        raise SystemExit(f"{name}: the run in {work / name} was trained with another recipe than MODELS[{name!r}] "
                         f"(differs in {', '.join(diff[:6])}); delete the folder or use another --work")


def run_model(name: str, train: Dataset, test: torch.Tensor, work: Path, ablation_steps: int, quick: bool,
              batch: int, threads: int | None = None) -> dict:
    preset, _, _, what = MODELS[name]
    sets, cfg = recipe(name, ablation_steps, quick, threads)
    out = work / name
    t_prev = 0.0
    state = out / "bench_train.json"
    if state.is_file():
        t_prev = json.loads(state.read_text())["train_s"]
    t0 = time.time()
    tr = build_trainer(cfg, out, dataset=train, progress=False, resume=True)
    done_before = tr.step
    tr.run()
    train_s = t_prev + (time.time() - t0 if tr.step > done_before else 0.0)
    state.write_text(json.dumps({"train_s": train_s}))
    if int(cfg["train"]["threads"]) > 0:  # score with the threads it trained with (Trainer.run restores the caller's)
        torch.set_num_threads(int(cfg["train"]["threads"]))
    model = ema_model(tr)
    print(f"{name}: {cfg['train']['steps']} steps, {train_s:.0f} s of training", flush=True)
    rows = evaluate(model, test, cfg, batch)
    return {"name": name, "preset": preset, "sets": sets, "steps": int(cfg["train"]["steps"]), "train_s": train_s,
            "what": what, "rows": rows}


def evaluate_partial(name: str, test: torch.Tensor, work: Path, batch: int) -> dict | None:
    """Score the latest checkpoint (EMA weights) of a model, without touching its run (the trainer may still hold
    the folder): the row says how many of its steps it had when it is unfinished."""
    out = work / name
    if not (out / "ema.safetensors").is_file() or not (out / "log.csv").is_file():
        return None
    model, cfg = load_run(out)
    rows = [ln.split(",") for ln in (out / "log.csv").read_text().splitlines()[1:] if ln.strip()]
    done = int(rows[-1][0]) if rows else 0
    total = int(cfg["train"]["steps"])
    print(f"{name}: latest checkpoint (training at step ~{done} of {total})", flush=True)
    preset, sets, _, what = MODELS[name]
    res = evaluate(model, test, cfg, batch)
    wall = [float(r[-1]) for r in rows if len(r) > 1] if rows else [0.0]
    steps = total if done >= total else f"{done} of {total} (unfinished)"
    return {"name": name, "preset": preset, "sets": sets, "steps": steps,
            "train_s": wall[-1], "what": what, "rows": res}


def step_time(train: Dataset, work: Path, steps: int = 200) -> dict:
    """Seconds per training step of the likelihood_digits preset as configured (its train.threads), after 20
    warm-up steps, in a scratch run folder: what the preset's training time on this machine is (steps x this)."""
    cfg = config.resolve("likelihood_digits", ["train.device=cpu", "train.ckpt_every=0"])
    tr = build_trainer(cfg, work / "_step_time", dataset=train, progress=False, resume=False, force=True)
    load0 = os.getloadavg()[0]
    tr.run(stop_after=20)
    t0 = time.time()
    tr.run(stop_after=steps)
    per = (time.time() - t0) / steps
    return {"seconds_per_step": per, "threads": int(cfg["train"]["threads"]), "steps": int(cfg["train"]["steps"]),
            "measured_steps": steps, "load": load0, "date": datetime.datetime.now().isoformat(timespec="seconds")}


def machine() -> str:
    uname = " ".join(platform.uname())
    threads = f"torch threads {torch.get_num_threads()}" + \
        (f" (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})" if "OMP_NUM_THREADS" in os.environ else "")
    return (f"{uname}; cpus {os.cpu_count()}; {threads}; torch {torch.__version__}; "
            f"python {sys.version.split()[0]}; {datetime.datetime.now().isoformat(timespec='seconds')}")


NOTES = """Reading the table:
- Every model sees digits[:1200] only (1200 digits; no labels except the class-conditional `digits` preset, scored
  with its null label) and is scored on all 597 digits[1200:], EMA weights. Bits/dim are of the discrete 17-level
  digits. ODE: -log p(y) of y = -1 + 2 (k + u) / 17, u ~ U[0, 1)^64 (or the learned q(u | k), then + log q), by the
  probability-flow ODE from t_min (dopri5, rtol = atol = 1e-5, one Gaussian Hutchinson probe per digit), plus
  64 log(17/2) nats. VLB: the continuous-time bound (VDM; `likelihood.continuous_vlb`) with the same uniform
  dequantization, 32 stratified times per digit (importance sampled by log-SNR for fixed schedules), or, for the
  DDPM preset, the 1000-step bound with 100 sampled terms per digit. SE = standard error over the 597 digits (it
  includes the Monte Carlo noise of the dequantization, probes and times).
- Anchors: uniform over the 17 levels is log2(17) = 4.087 exactly; the GaussianMixture is fitted and scored on the
  same uniform dequantization.
- "train s" (summed over resumed sessions, from log.csv) and "eval s" are wall-clock seconds on the shared 2-core
  machine with other jobs running: compare them with care. One intra-op thread per process. A row scored in parts
  (`--partial --slice i/n`, parallel processes over the test digits) gives the slowest part's eval s.
- The ablation rows change one thing in the recipe without augmentation (likelihood_digits with data.augment=0) and
  train at the ablation budget; compare them with "without augmentation (short)", not with the full preset.
  "vp_digits+dequantization" is vp_digits with item 1 alone.
- The preset's augmentation and step count were chosen on a validation split of the training digits
  (benchmarks/likelihood_select.py: fit on digits[:1000], validate on digits[1000:1200]); the test digits were not
  used for that choice."""


def train_seconds(folder: Path) -> float | None:
    """Training wall time from the run's log.csv, summed over resumed sessions (its ``seconds`` restart at 0)."""
    log = folder / "log.csv"
    if not log.is_file():
        return None
    secs = [float(ln.split(",")[-1]) for ln in log.read_text().splitlines()[1:] if ln.strip()]
    total = sum(a for a, b in zip(secs, secs[1:]) if b < a) + (secs[-1] if secs else 0.0)
    return total


def report(work: Path, out: Path, ablation_steps: int, cmd: str, notes: list[str] | None = None,
           quick: bool = False) -> None:
    results = {}
    for folder in sorted(p.parent for p in work.glob("*/bench_result_partial_0of*.json")):
        n = int(next(folder.glob("bench_result_partial_0of*.json")).stem.rsplit("of", 1)[1])
        parts = [folder / f"bench_result_partial_{i}of{n}.json" for i in range(n)]
        if all(p.is_file() for p in parts):
            results[folder.name] = merge_slices([json.loads(p.read_text()) for p in parts])
    results.update({p.parent.name: json.loads(p.read_text()) for p in work.glob("*/bench_result_partial.json")})
    results.update({p.parent.name: json.loads(p.read_text()) for p in work.glob("*/bench_result.json")})
    anchor = json.loads((work / "anchors.json").read_text()) if (work / "anchors.json").is_file() else []
    order = [a["name"] for a in anchor] + [n for n in MODELS if n in results]
    for name, e in results.items():
        if name in MODELS:
            check_cached(name, work, ablation_steps, quick)
        e["train_s"] = train_seconds(work / name) or e["train_s"]
        e["what"] = MODELS[name][3] if name in MODELS else e["what"]
    entries = {**{a["name"]: a for a in anchor}, **results}
    lines = ["# Likelihood benchmark: held-out 8x8 digits (17 levels, D = 64)", "",
             f"Machine: {machine()}", "", f"Command: `{cmd}`", "",
             f"Train: digits[:{N_TRAIN}]; test: all 597 digits[{N_TRAIN}:]; ablation budget {ablation_steps} steps.",
             "", "| model | what | steps | train s | method | variant | bits/dim | SE | median | max | NFE/digit | "
             "eval s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in order:
        e = entries[name]
        for r in e["rows"]:
            lines.append(f"| {name} | {e['what']} | {e['steps']} | {e['train_s']:.0f} | {r['method']} | "
                         f"{r['variant']} | {r['bpd']:.3f} | {r['se']:.3f} | {r['median']:.3f} | {r['max']:.2f} | "
                         f"{r['nfe']:.0f} | {r['seconds']:.0f} |")
    if (work / "step_time.json").is_file():
        st = json.loads((work / "step_time.json").read_text())
        lines += ["", f"Training time of the likelihood_digits preset on this machine (`--step-time`, {st['date']}, "
                  f"load average {st['load']:.1f} at the start): {st['seconds_per_step']:.3f} s a step with "
                  f"{st['threads']} threads over {st['measured_steps']} steps, so its {st['steps']} steps take "
                  f"{st['seconds_per_step'] * st['steps'] / 60:.1f} minutes."]
    missing = [n for n in MODELS if n not in results]
    if missing:
        lines += ["", "Not run in this results file: " + ", ".join(missing) + "."]
    lines += ["", NOTES]
    write_results(out, lines, notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    ap.add_argument("--ablation-steps", type=int, default=2000)
    ap.add_argument("--work", default="runs/bench_likelihood", help="run folders and cached scores")
    ap.add_argument("--batch", type=int, default=200, help="test digits per likelihood batch")
    ap.add_argument("--report", action="store_true", help="only write the table from the cached scores")
    ap.add_argument("--quick", action="store_true", help="20 training steps, 64 test digits (smoke run)")
    ap.add_argument("--slice", default=None, help="i/n: with --partial, score only the i-th of n equal parts of the "
                    "test digits (parts run as separate processes; the report merges them once all n are there)")
    ap.add_argument("--partial", action="store_true",
                    help="score the latest checkpoint of the --models whose training has not finished (no training)")
    ap.add_argument("--step-time", action="store_true",
                    help="time 200 training steps of likelihood_digits as configured (run it on an idle machine)")
    ap.add_argument("--threads", type=int, default=None, help="train.threads for every model trained by this call "
                    "(default: the preset's, 1 for ablations)")
    ap.add_argument("--out", default="benchmarks/results/likelihood.md")
    ap.add_argument("--note", action="append", default=[], help="a line about this run for the results file")
    a = ap.parse_args()
    torch.manual_seed(0)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    train, test = split()
    if a.quick:
        test = test[:64]
        ODE.update(rtol=1e-3, atol=1e-3)
    cmd = " ".join([".venv/bin/python", *sys.argv])
    if a.step_time:
        (work / "step_time.json").write_text(json.dumps(step_time(train, work)))
    elif not a.report:
        if not (work / "anchors.json").is_file():
            (work / "anchors.json").write_text(json.dumps(anchors(train, test)))
        for name in a.models.split(","):
            if name not in MODELS:
                raise SystemExit(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
            if (work / name / "bench_result.json").is_file():
                check_cached(name, work, a.ablation_steps, a.quick)
                print(f"{name}: cached", flush=True)
                continue
            if a.partial:
                part, suffix = test, ""
                if a.slice:
                    i, n = (int(v) for v in a.slice.split("/"))
                    bounds = [round(k * len(test) / n) for k in range(n + 1)]
                    part, suffix = test[bounds[i]: bounds[i + 1]], f"_{i}of{n}"
                res = evaluate_partial(name, part, work, a.batch)
                if res is not None:
                    (work / name / f"bench_result_partial{suffix}.json").write_text(json.dumps(res))
                continue
            res = run_model(name, train, test, work, a.ablation_steps, a.quick, a.batch, a.threads)
            (work / name / "bench_result.json").write_text(json.dumps(res))
    report(work, Path(a.out), a.ablation_steps, cmd, a.note, a.quick)


if __name__ == "__main__":
    main()
