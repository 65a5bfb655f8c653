"""``torchdiffusion fit RUN --sampler S --steps N``: fit a time grid to the run's model once and keep it in the run
folder (``RUN/fits/S-N.json``, :mod:`torchdiffusion.runs.fits`); ``sample``, ``eval``, the studio and the Pipeline
then use it whenever S and N are asked for and no grid is named. ``--export-diffusers FILE.json`` also writes the
grid as the ``set_timesteps`` arguments of a diffusers scheduler (:func:`torchdiffusion.samplers.grids.
to_diffusers`); ``--show`` prints the stored fit without fitting."""

from __future__ import annotations

import argparse
import importlib.util

from tqdm.auto import tqdm

from torchdiffusion._files import prepare_output, write_json
from torchdiffusion.cli.commands import command
from torchdiffusion.parameterization.interop import diffusers_scheduler_config
from torchdiffusion.runs import fits
from torchdiffusion.runs.pipeline import Pipeline
from torchdiffusion.samplers import grids


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder written by `torchdiffusion train` (diffusion or latent)")
    p.add_argument("--sampler", default=None, help="deterministic sampler to fit for (default: the run's)")
    p.add_argument("--steps", type=int, default=None, help="network evaluations per sample (default: the run's)")
    p.add_argument("--pilot", type=int, default=256, help="pilot states (a third validates; cost does not grow)")
    p.add_argument("--runs", type=int, default=30,
                   help="at most this many sampling runs of the pilot batch, plus one reference solve")
    p.add_argument("--seed", type=int, default=0, help="seed of the pilot states")
    p.add_argument("--show", action="store_true", help="print the stored fit instead of fitting")
    p.add_argument("--export-diffusers", default=None, metavar="FILE.json",
                   help="also write the grid as diffusers set_timesteps arguments (see --scheduler)")
    p.add_argument("--scheduler", default="EulerDiscreteScheduler",
                   help="diffusers scheduler class for --export-diffusers (e.g. EulerDiscreteScheduler: sigmas=; "
                        "DPMSolverMultistepScheduler: integer timesteps=, rounded)")
    p.add_argument("--no-ema", action="store_true", help="fit the raw weights instead of the EMA")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _describe(rec: dict, path) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in rec["options"].items()) or "no options"
    chosen = ("fitted grid" if rec.get("decision", "fitted") == "fitted"
              else f"fixed grid {rec.get('fixed')} (the fit's gain over it was not significant)")
    gain = ""
    if rec.get("gain") is not None and rec.get("gain_se") is not None:
        gain = f"; fitted minus fixed, mean squared error {rec['gain']:.3g} +- {rec['gain_se']:.2g}"
    return (f"{path}: {rec['sampler']}, {rec['steps']} NFE: {chosen} ({opts}); validation RMS {rec['val_rms']:.4g} "
            f"vs best fixed grid {rec.get('fixed')} {rec['fixed_val_rms']:.4g}{gain}; cost {rec['cost_nfe']} network "
            f"calls = {rec['cost_runs']:.1f} sampling runs of {rec['run_nfe']} NFE ({rec['search_runs']:.0f} runs + "
            f"reference solve {rec['reference_nfe']} calls), pilot {rec['n_pilot']} states ({rec['n_val']} held out)")


def _scheduler_class(name: str) -> type:
    """The diffusers scheduler class ``name`` (checked before a fit, so that a typo costs no fit and leaves the
    stored one in place)."""
    if importlib.util.find_spec("diffusers") is None:
        raise ValueError("--export-diffusers needs diffusers (pip install 'torchdiffusion[diffusers]')")
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "set_timesteps"):
        raise ValueError(f"unknown diffusers scheduler {name!r} (e.g. EulerDiscreteScheduler, "
                         "DPMSolverMultistepScheduler)")
    return cls


def _scheduler(a, pipe: Pipeline):
    """The diffusers scheduler of ``--scheduler`` configured for the run's process, and its config."""
    config = diffusers_scheduler_config(pipe.process, getattr(pipe.model, "prediction", "eps"), a.scheduler)
    return _scheduler_class(a.scheduler).from_config(config), config


def _export(a, pipe: Pipeline, rec: dict) -> str:
    sch, config = _scheduler(a, pipe)
    kw = grids.to_diffusers(rec, sch, round_timesteps=True)
    out = write_json(a.export_diffusers, {"scheduler": a.scheduler, "scheduler_config": config,
                                          "set_timesteps": kw, "times": rec["times"], "sampler": rec["sampler"],
                                          "steps": rec["steps"], "options": rec["options"],
                                          "weights_sha256": rec["weights_sha256"]})
    key = next(iter(kw))
    return (f"wrote {out}: {a.scheduler}.set_timesteps({key}=...) (or pipe(..., {key}=...)) walks this grid"
            + (" rounded to integer timesteps" if key == "timesteps" and any(
                float(t) != round(float(t)) for t in rec["times"][:-1]) else ""))


def _run(a) -> int:
    if a.export_diffusers:
        if not a.export_diffusers.endswith(".json"):
            raise ValueError(f"--export-diffusers must name a .json file, got {a.export_diffusers}")
        prepare_output(a.export_diffusers)
        _scheduler_class(a.scheduler)  # refused before the fit, not after it replaced the stored one
    pipe = Pipeline.from_pretrained(a.run, ema=not a.no_ema)
    if pipe.path is None:
        raise ValueError(f"{a.run} is a diffusers folder; fit a torchdiffusion run folder")
    s = pipe.config.get("sample", {})
    sampler = a.sampler or s.get("sampler", "ddim")
    steps = a.steps if a.steps is not None else int(s.get("steps", 50))
    if a.export_diffusers and not a.show:  # a scheduler that takes no grid of ours (e.g. DDIMScheduler) is refused
        # before the fit, which would otherwise replace the stored fit and then fail (issue 33 item 6)
        grids.to_diffusers(grids.get("trailing", pipe.process, steps), _scheduler(a, pipe)[0], round_timesteps=True)
    if a.show:
        path = fits.fit_path(pipe.path, sampler, steps)
        if not path.is_file():
            raise ValueError(f"no stored fit for {sampler} at {steps} steps in {pipe.path} (run `torchdiffusion fit "
                             f"{a.run} --sampler {sampler} --steps {steps}`)")
        rec = fits.read_fit(path)
        grid, _, note = fits.lookup(pipe.path, pipe.model, sampler, steps)
        print(_describe(rec, path))
        if grid is None:
            print(note)
    else:
        bar = None

        def progress(d: dict) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=d["max_calls"], desc="fit", unit="NFE", disable=a.quiet, dynamic_ncols=True)
            bar.total = d["max_calls"]
            bar.update(d["calls"] - bar.n)
        try:
            rec = pipe.fit(sampler, steps, n_pilot=a.pilot, max_runs=a.runs, seed=a.seed, progress=progress)
        finally:
            if bar is not None:
                bar.close()
        print(_describe(rec, rec["path"]))
    if a.export_diffusers:
        print(_export(a, pipe, rec))
    return 0


command("fit", "fit a time grid for one sampler and step count to a run's model and keep it in the run folder"
        )((_args, _run))
