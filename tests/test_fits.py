"""Fitted grids where users are (issue 33): ``torchdiffusion fit`` / ``Pipeline.fit`` store a fit in the run folder
(tied to the weights' checksum, with its cost and validation error), the Pipeline, ``sample`` and ``eval`` use it
for the same sampler and step count (and say so), a changed model or clashing options leave it unused with a
note; the robust selection falls back to the best fixed grid when the gain is not significant; the fast method
keeps its cost cap; a fit handed to diffusers schedulers gives the same error there as here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import torchdiffusion as td
from helpers import Counter, ring
from helpers import one_line_error as _error
from torchdiffusion.cli.main import main
from torchdiffusion.runs import fits
from torchdiffusion.samplers import gridfit
from torchdiffusion.studio.app import Settings, Studio
from torchdiffusion.training.checkpoint import CHECKSUM_KEY

D = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rms(a, b) -> float:
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fits") / "ring"
    assert main(["train", "ring", "--out", str(out), "--set", "train.steps=150", "--set", "model.hidden=32",
                 "--set", "model.depth=2", "--set", "train.batch=64", "--set", "data.n=500",
                 "--set", "train.device=cpu", "--quiet"]) == 0
    return out


# --- item 1: the store, the Pipeline, the command line -------------------------------------------------------
def test_pipeline_fit_is_stored_and_used(run: Path, tmp_path: Path) -> None:
    pipe = td.Pipeline.from_pretrained(run)
    rec = pipe.fit("unipc", 5, n_pilot=48, max_runs=14)
    path = run / "fits" / "unipc-5.json"
    assert Path(rec["path"]) == path and json.loads(path.read_text()) == {k: v for k, v in rec.items() if k != "path"}
    data = (run / "ema.safetensors").read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert rec["weights_sha256"] == header["__metadata__"][CHECKSUM_KEY]  # the checkpoint's checksum of its tensors
    assert rec["sampler"] == "unipc" and rec["steps"] == 5 and rec["decision"] in ("fitted", "fixed")
    assert rec["run_nfe"] == 5 and rec["search_runs"] <= 14 and rec["reference_nfe"] > 0
    assert rec["cost_nfe"] == rec["reference_nfe"] + 5 * rec["search_runs"]
    assert rec["cost_runs"] == pytest.approx(rec["cost_nfe"] / 5)
    assert rec["options"]["order"] in (2, 3) and rec["options"]["final_step"] in ("denoise", "extrapolate")
    assert rec["val_rms"] > 0 and rec["fixed_val_rms"] > 0 and rec["n_pilot"] == 48 and rec["n_val"] == 16
    grid = torch.tensor(rec["times"], dtype=D)

    x = pipe(n=8, sampler="unipc", steps=5, generator=gen(3))
    assert pipe.note.startswith("using ") and str(path) in pipe.note
    want = pipe(n=8, sampler="unipc", grid=grid, generator=gen(3), **rec["options"])
    assert torch.equal(x, want)
    plain = pipe(n=8, sampler="unipc", steps=5, grid="logsnr", generator=gen(3))  # a named grid wins
    assert pipe.note is None
    # another step count: no fit, the run's own grid
    pipe(n=8, sampler="unipc", steps=6, generator=gen(3))
    assert pipe.note is None
    # options that contradict the fit's leave it unused, with a note
    other = 2 if rec["options"]["order"] == 3 else 3
    y = pipe(n=8, sampler="unipc", steps=5, order=other, generator=gen(3))
    assert pipe.note.startswith("not using") and f"order={rec['options']['order']}" in pipe.note
    assert torch.equal(y, pipe(n=8, sampler="unipc", steps=5, grid="logsnr", order=other, generator=gen(3)))
    # guidance wrappers and other models get no stored fit: only the model the fit was made for
    # a changed model (other weights) invalidates the fit: never used, a note says why
    with torch.no_grad():
        next(iter(pipe.model.net.parameters())).add_(1e-3)
    z = pipe(n=8, sampler="unipc", steps=5, generator=gen(3))
    assert pipe.note.startswith("not using") and "other weights" in pipe.note
    assert torch.equal(z, pipe(n=8, sampler="unipc", steps=5, grid="logsnr", generator=gen(3)))
    assert not torch.equal(plain, x)


def test_cli_fit_sample_eval_use_the_stored_fit(run: Path, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["fit", str(run), "--sampler", "dpmpp_2m", "--steps", "4", "--pilot", "32", "--runs", "10",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    path = run / "fits" / "dpmpp_2m-4.json"
    assert path.is_file() and str(path) in out and "sampling runs" in out and "validation RMS" in out
    rec = json.loads(path.read_text())
    assert main(["fit", str(run), "--sampler", "dpmpp_2m", "--steps", "4", "--show"]) == 0
    assert "dpmpp_2m, 4 NFE" in capsys.readouterr().out
    npz = tmp_path / "x.npz"
    assert main(["sample", str(run), "--n", "6", "--sampler", "dpmpp_2m", "--steps", "4", "--out", str(npz),
                 "--quiet"]) == 0
    assert f"using fitted grid from {path}" in capsys.readouterr().out or rec["decision"] == "fixed"
    with np.load(npz) as f:
        x = f[f.files[0]]
    pipe = td.Pipeline.from_pretrained(run)
    want = pipe(n=6, sampler="dpmpp_2m", grid=torch.tensor(rec["times"], dtype=D), generator=gen(0),
                **rec["options"])
    np.testing.assert_array_equal(x, want.numpy())
    assert main(["eval", str(run), "--sampler", "dpmpp_2m", "--steps", "4", "--n", "64", "--quiet"]) == 0
    assert f"{path}" in capsys.readouterr().out
    # one-line errors
    assert "deterministic sampler" in _error(capsys, "fit", str(run), "--sampler", "ddpm", "--steps", "4",
                                             "--pilot", "8", "--runs", "5")
    assert "max_runs" in _error(capsys, "fit", str(run), "--sampler", "unipc", "--steps", "4", "--runs", "1")
    assert "unknown sampler" in _error(capsys, "fit", str(run), "--sampler", "nope")
    assert "no stored fit" in _error(capsys, "fit", str(run), "--sampler", "unipc", "--steps", "9", "--show")
    assert ".json" in _error(capsys, "fit", str(run), "--export-diffusers", str(tmp_path / "x.txt"))
    bad = run / "fits" / "euler-3.json"
    bad.write_text("{not json")
    assert "euler-3.json" in _error(capsys, "sample", str(run), "--sampler", "euler", "--steps", "3", "--out",
                                    str(npz))
    bad.unlink()


# --- item 2: robust selection ---------------------------------------------------------------------------------
def _exact(proc, std: float = 0.075):
    gm = ring(std=std)
    net = Counter(gm.net(proc, "eps"))
    return gm, net, td.Denoiser(net, proc, prediction="eps")


def test_paired_gain_is_the_mean_and_standard_error_of_the_difference() -> None:
    a, b = torch.tensor([1.0, 2.0, 4.0, 3.0], dtype=D), torch.tensor([2.0, 2.0, 5.0, 5.0], dtype=D)
    m, se = gridfit.paired_gain(a, b)
    d = np.array([-1.0, 0.0, -1.0, -2.0])
    assert m == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / 2)


def test_robust_selection_falls_back_to_the_best_fixed_grid() -> None:
    proc = td.DDPM("linear")
    gm, net, model = _exact(proc)
    pilot = gm.sample_t(96, proc, proc.t_max, generator=gen(11))
    ref, _ = gridfit.end_state(model, pilot)
    # an impossible significance level: the fixed grid the fit part chose comes back, named
    ts, info = td.grids.optimize(model, "unipc", 5, x_T=pilot, reference=ref, max_runs=20, z=1e9,
                                 return_info=True)
    assert info["decision"] == "fixed" and torch.equal(ts, td.grids.get(info["fixed"], proc, 5))
    assert info["val"] == info["fixed_val"] and info["options"] == info["fixed_options"]
    # no significance asked (z = 0): the fitted grid is kept when it is better on validation at all
    ts0, info0 = td.grids.optimize(model, "unipc", 5, x_T=pilot, reference=ref, max_runs=20, z=0,
                                   return_info=True)
    assert info0["decision"] == "fitted" and info0["gain"] < 0 and info0["val"] < info0["fixed_val"]
    assert not torch.equal(ts0, ts)
    # the decision is the paired test on validation states, recomputed here from the samples
    _, val_idx = gridfit._split(96, 1 / 3)
    e_fit = ((td.sample(model, pilot, "unipc", grid=ts0, **info0["options"]) - ref) ** 2).mean(1)
    e_fix = ((td.sample(model, pilot, "unipc", grid=ts, **info["options"]) - ref) ** 2).mean(1)
    m, se = gridfit.paired_gain(e_fit[val_idx], e_fix[val_idx])
    assert m == pytest.approx(info0["gain"], rel=1e-6) and se == pytest.approx(info0["gain_se"], rel=1e-6)


def _fresh_check(steps: int, n_pilot: int, n_fresh: int) -> None:
    proc = td.DDPM("scaled_linear")
    gm, net, model = _exact(proc, std=0.1)
    pilot = gm.sample_t(n_pilot, proc, proc.t_max, generator=gen(21))
    fresh = gm.sample_t(n_fresh, proc, proc.t_max, generator=gen(22))
    ref = gridfit.end_state(model, fresh)[0]
    ts, info = td.grids.optimize(model, "unipc", steps, x_T=pilot, max_runs=30, return_info=True,
                                 choices=fits.AUTO_CHOICES["unipc"])
    err_fit = rms(td.sample(model, fresh, "unipc", grid=ts, **info["options"]), ref)
    best_fixed = min(rms(td.sample(model, fresh, "unipc", grid=td.grids.get(g, proc, steps), order=o,
                                   final_step=f), ref)
                     for g in ("logsnr", "karras", "optimized", "trailing") for o in (2, 3)
                     for f in ("denoise", "extrapolate"))
    assert err_fit <= best_fixed * 1.02, (steps, err_fit, best_fixed, info["decision"])


def test_robust_fit_never_worse_than_the_best_fixed_grid_on_fresh_states() -> None:
    """On states never used in the fit, the robust fit (at its default z = 2) is not worse than the best fixed
    start grid, the latter chosen with the fresh states' own reference (an oracle choice the fit cannot make)."""
    _fresh_check(5, 96, 128)


@pytest.mark.slow
@pytest.mark.parametrize("steps", [8, 12])
def test_robust_fit_never_worse_on_fresh_states_more_steps(steps: int) -> None:
    _fresh_check(steps, 192, 256)


# --- item 3: the cost cap of the fast method -------------------------------------------------------------------
def test_fast_fit_keeps_its_cost_cap_and_reports_it() -> None:
    proc = td.VP()
    gm, net, model = _exact(proc)
    pilot = gm.sample_t(64, proc, proc.t_max, generator=gen(5))
    for max_runs in (8, 30):
        net.calls = 0
        _, info = td.grids.optimize(model, "unipc", 6, x_T=pilot, max_runs=max_runs, return_info=True,
                                    choices=fits.AUTO_CHOICES["unipc"])
        assert net.calls == info["cost_nfe"] == info["reference_nfe"] + 6 * info["search_runs"]
        assert info["search_runs"] <= max_runs and info["method"] == "fast"
    assert info["search_runs"] >= 25  # the budget is used
    with pytest.raises(ValueError, match="max_runs"):
        td.grids.optimize(model, "unipc", 6, x_T=pilot, max_runs=1)
    with pytest.raises(ValueError, match="unknown fit method"):
        td.grids.optimize(model, "unipc", 6, x_T=pilot, method="dp")


# --- item 4: diffusers ---------------------------------------------------------------------------------------
def _diffusers_loop(sch, net, x: torch.Tensor) -> torch.Tensor:
    x = x * sch.init_noise_sigma
    for t in sch.timesteps:
        x = sch.step(net(sch.scale_model_input(x, t), t), t, x).prev_sample
    return x


def test_a_fit_samples_alike_in_diffusers() -> None:
    diffusers = pytest.importorskip("diffusers")
    proc = td.DDPM("linear")
    gm, net, model = _exact(proc)
    fresh = gm.sample_t(64, proc, proc.t_max, generator=gen(2))
    ref = gridfit.end_state(model, fresh)[0]  # the same states and reference serve the fit and the comparison
    eps = gm.net(proc, "eps")

    def oracle(x, t):
        return eps(x.double(), torch.as_tensor(t, dtype=D)).to(x.dtype)
    # one fitted grid (fitted for unipc) handed to three diffusers schedulers, three ways
    ts = td.grids.optimize(model, "unipc", 6, x_T=fresh, reference=ref, max_runs=12, z=0)
    cases = (("euler", diffusers.EulerDiscreteScheduler, {}, {}, "sigmas"),
             ("dpmpp_2m", diffusers.DPMSolverMultistepScheduler, {}, {}, "timesteps"),
             ("unipc", diffusers.UniPCMultistepScheduler, {"solver_order": 3}, {"order": 3}, None))
    for sampler, cls, dopts, opts, key in cases:
        sch = cls(beta_schedule="linear", **dopts)
        if key is not None:
            kw = td.grids.to_diffusers(ts, sch, round_timesteps=True)
            assert list(kw) == [key]
            walked = ts if key == "sigmas" else torch.tensor(kw["timesteps"] + [proc.t_zero], dtype=D)
            sch.set_timesteps(**kw)
        else:
            with pytest.raises(ValueError, match="set_diffusers_grid"):
                td.grids.to_diffusers(ts, sch)
            walked = ts
            td.grids.set_diffusers_grid(sch, ts)
        with torch.no_grad():
            theirs = _diffusers_loop(sch, oracle, fresh.clone())
        ours = td.sample(model, fresh, sampler, grid=walked, **opts)
        e_ours, e_theirs = rms(ours, ref), rms(theirs, ref)
        assert e_theirs == pytest.approx(e_ours, rel=2e-3), (sampler, e_ours, e_theirs)
        assert rms(ours, theirs) < 0.05 * e_ours
    with pytest.raises(ValueError, match="DDIMScheduler"):
        td.grids.set_diffusers_grid(diffusers.DDIMScheduler(), ts)
    with pytest.raises(ValueError, match="round_timesteps"):
        td.grids.to_diffusers(ts, diffusers.DPMSolverMultistepScheduler())


def test_cli_export_diffusers(run: Path, tmp_path: Path, capsys) -> None:
    diffusers = pytest.importorskip("diffusers")
    out = tmp_path / "grid.json"
    assert main(["fit", str(run), "--sampler", "euler", "--steps", "4", "--pilot", "16", "--runs", "6", "--quiet",
                 "--export-diffusers", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    obj = json.loads(out.read_text())
    sch = getattr(diffusers, obj["scheduler"]).from_config(obj["scheduler_config"])
    sch.set_timesteps(**obj["set_timesteps"])
    proc = td.Pipeline.from_pretrained(run).process
    pts = torch.tensor(obj["times"][:-1], dtype=D)
    torch.testing.assert_close(sch.sigmas[:-1].double(), proc.sigma(pts) / proc.alpha(pts), rtol=1e-5, atol=0)
    assert float(sch.sigmas[-1]) == 0.0


def test_a_refused_export_leaves_the_run_as_it_was(run: Path, tmp_path: Path, capsys) -> None:
    """A scheduler name that does not exist, or one that takes no grid of ours, is refused before the fit: the run
    folder (its stored fits included) is byte-identical and nothing is written (it used to fit, store, then fail)."""
    pytest.importorskip("diffusers")

    def files() -> dict:
        return {str(q): q.read_bytes() for q in sorted(run.rglob("*")) if q.is_file()}
    before, out = files(), tmp_path / "g.json"
    argv = ["fit", str(run), "--sampler", "euler", "--steps", "5", "--pilot", "16", "--runs", "6", "--quiet",
            "--export-diffusers", str(out), "--scheduler"]
    assert "unknown diffusers scheduler 'NoSuchScheduler'" in _error(capsys, *argv, "NoSuchScheduler")
    assert "DDIMScheduler cannot be given this grid" in _error(capsys, *argv, "DDIMScheduler")
    assert files() == before and not out.exists()


def test_the_studio_samples_with_the_stored_fit(run: Path) -> None:
    """The studio samples through the Pipeline: same settings, same samples as the Pipeline with the stored fit."""
    pipe = td.Pipeline.from_pretrained(run)
    rec = pipe.fit("euler", 3, n_pilot=16, max_runs=6)
    studio = Studio(pipe, name="ring")
    try:
        x, nfe, _ = studio.sample(Settings(sampler="euler", grid=None, steps=3, seed=4, n=8))
        assert nfe == 3 and studio.pipe.note.startswith("using ") and "euler-3.json" in studio.pipe.note
        want = pipe(n=8, sampler="euler", grid=torch.tensor(rec["times"], dtype=D), generator=gen(4),
                    **rec["options"])
        torch.testing.assert_close(x, want)
    finally:
        studio.close()
