"""Issue 19, parts 1-2: every diffusers scheduler family read as our process (sigmas equal the scheduler's own),
flow matching and unknown classes refused, folders accepted; export of a run as a diffusers UNet2DModel
pipeline folder (the U-Net's identical twin) and import of a diffusers folder into td.Pipeline."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

import torchdiffusion as td
from torchdiffusion.cli.main import main
from torchdiffusion.nets.unet import UNet
from torchdiffusion.parameterization.interop import (
    DDPM_SCHEDULERS,
    denoiser_from_diffusers,
    diffusers_scheduler_config,
    process_from_diffusers,
    scheduler_family,
    unet2d_from_unet,
)
from torchdiffusion.processes import DDPM, EDM, VE, VP, times_from_ve_sigmas
from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs.build import load_run
from torchdiffusion.runs.train import train
from torchdiffusion.samplers import grids
from torchdiffusion.training.checkpoint import save_tensors

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")


def _ve_sigmas(proc, ts):
    ts = torch.as_tensor(ts, dtype=torch.float64)
    return proc.sigma(ts) / proc.alpha(ts)


# --- part 1: schedulers -> processes ---------------------------------------------------------------------------
def _ddpm_cases():
    for name in sorted(DDPM_SCHEDULERS):
        cls = getattr(diffusers, name, None)
        if cls is None or name == "DPMSolverSDEScheduler":  # the latter needs torchsde (read from its config only)
            continue
        params = inspect.signature(cls.__init__).parameters
        for schedule in ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"):
            if schedule in ("sigmoid", "laplace") and name not in ("DDPMScheduler", "DDPMParallelScheduler"):
                continue  # diffusers implements these two schedules only there
            if ("beta_schedule" not in params or name == "UnCLIPScheduler") and schedule != "squaredcos_cap_v2":
                continue  # UnCLIP has the cosine schedule only
            for prediction in ("epsilon", "v_prediction"):
                yield name, schedule, prediction


@pytest.mark.parametrize(("name", "schedule", "prediction"), list(_ddpm_cases()))
def test_ddpm_type_sigmas_equal_the_schedulers(name, schedule, prediction):
    cls = getattr(diffusers, name)
    params = inspect.signature(cls.__init__).parameters
    kw = {"beta_schedule": schedule} if "beta_schedule" in params else {}
    if "prediction_type" in params:
        kw["prediction_type"] = prediction
    sch = cls(**kw)
    proc = process_from_diffusers(sch)
    assert isinstance(proc, DDPM) and sch.config.num_train_timesteps == proc.T
    ac = sch.alphas_cumprod.double()
    ours = proc.sigma(torch.arange(proc.T)) / proc.alpha(torch.arange(proc.T))
    # diffusers keeps its schedule in float32: agreement to float32 rounding (of the cumulative product at late
    # steps, of 1 - abar ~ 1e-4 at the first steps, where float32 leaves ~3 digits of sigma)
    torch.testing.assert_close(proc.alphas_cumprod, ac, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(ours, ((1 - ac) / ac).sqrt(), rtol=2e-5, atol=5e-6)
    assert process_from_diffusers({**sch.config, "_class_name": name}).config() == proc.config()  # as a dict
    if "prediction_type" in params:
        model = denoiser_from_diffusers(torch.nn.Identity(), sch)
        assert model.prediction == {"epsilon": "eps", "v_prediction": "v"}[prediction]


@pytest.mark.parametrize("spacing", ["leading", "trailing", "karras"])
def test_euler_sigmas_and_timesteps_equal_our_grid(spacing):
    """The Euler scheduler's inference sigmas and (fractional, for Karras) timesteps are our grid's."""
    kw = {"use_karras_sigmas": True} if spacing == "karras" else {"timestep_spacing": spacing}
    sch = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **kw)
    sch.set_timesteps(10)
    proc = process_from_diffusers(sch)
    ts = grids.get(spacing, proc, 10)[:-1]
    torch.testing.assert_close(_ve_sigmas(proc, ts), sch.sigmas[:-1].double(), rtol=2e-5, atol=0)
    torch.testing.assert_close(ts, sch.timesteps.double(), rtol=0, atol=2e-3)


def test_score_sde_ve_sigmas_equal_ours():
    sch = diffusers.ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=348.0, sampling_eps=1e-5)
    sch.set_timesteps(50)
    sch.set_sigmas(50)
    proc = process_from_diffusers(sch)
    assert isinstance(proc, VE) and proc.sigma_min == 0.01 and proc.sigma_max == 348.0
    s = sch.sigmas.double()
    ts = times_from_ve_sigmas(proc, s)
    assert float(ts.min()) >= proc.t_min - 1e-9 and float(ts.max()) <= proc.t_max + 1e-9  # every level is ours
    torch.testing.assert_close(proc.sigma(ts), s, rtol=1e-12, atol=0)
    # the ends: diffusers' sigma_max at our t_max, its smallest level s_min (s_max/s_min)^eps at our t_min
    assert math.isclose(float(proc.sigma(proc.t_max)), 348.0, rel_tol=1e-9)
    assert math.isclose(float(proc.sigma(proc.t_min)), float(s[-1]), rel_tol=1e-6)
    assert denoiser_from_diffusers(torch.nn.Identity(), sch).prediction == "score"


@pytest.mark.parametrize("name", ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"])
@pytest.mark.parametrize("schedule", ["karras", "exponential"])
def test_edm_sigmas_equal_ours(name, schedule):
    sch = getattr(diffusers, name)(sigma_min=0.002, sigma_max=80.0, sigma_schedule=schedule)
    sch.set_timesteps(12)
    proc = process_from_diffusers(sch)
    assert isinstance(proc, EDM) and (proc.sigma_min, proc.sigma_max) == (0.002, 80.0)
    ours = grids.get("karras" if schedule == "karras" else "logsnr", proc, 12)
    torch.testing.assert_close(ours, sch.sigmas.double(), rtol=1e-6, atol=0)


def test_score_sde_vp_and_process_only_families():
    proc = process_from_diffusers({"_class_name": "ScoreSdeVpScheduler", "beta_min": 0.1, "beta_max": 20,
                                   "sampling_eps": 1e-3})
    assert isinstance(proc, VP) and (proc.beta_min, proc.beta_max, proc.t_min) == (0.1, 20.0, 1e-3)
    cm = diffusers.CMStochasticIterativeScheduler()
    assert isinstance(process_from_diffusers(cm), EDM)
    with pytest.raises(ValueError, match="consistency model"):
        denoiser_from_diffusers(torch.nn.Identity(), cm)
    euler = diffusers.EulerDiscreteScheduler(prediction_type="v_prediction", timestep_type="continuous")
    assert isinstance(process_from_diffusers(euler), DDPM)
    with pytest.raises(ValueError, match="continuous"):
        denoiser_from_diffusers(torch.nn.Identity(), euler)


def test_old_bug_edm_and_ve_configs_are_not_ddpm():
    """Before issue 19 both of these silently became DDPM(linear)."""
    assert scheduler_family(dict(diffusers.EDMEulerScheduler().config) | {"_class_name": "EDMEulerScheduler"}) == "edm"
    assert isinstance(process_from_diffusers(diffusers.EDMEulerScheduler()), EDM)
    assert isinstance(process_from_diffusers(diffusers.ScoreSdeVeScheduler()), VE)


@pytest.mark.parametrize("source", [
    "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
    {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0},
    {"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True, "prediction_type": "flow_prediction"},
])
def test_flow_matching_is_refused_with_one_line(source):
    if isinstance(source, str):
        source = getattr(diffusers, source)()
    with pytest.raises(ValueError, match="flow matching") as e:
        process_from_diffusers(source)
    assert "\n" not in str(e.value)


def test_unknown_scheduler_class_refused():
    with pytest.raises(ValueError, match="unknown diffusers scheduler 'AmusedScheduler'.*supported: "):
        process_from_diffusers({"_class_name": "AmusedScheduler", "mask_token_id": 3})
    with pytest.raises(ValueError, match="beta_schedule"):
        process_from_diffusers({"beta_schedule": "nope"})


def test_folders_are_accepted(tmp_path):
    sch = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    sch.save_config(tmp_path / "model" / "scheduler")
    for src in (tmp_path / "model" / "scheduler", tmp_path / "model",
                tmp_path / "model" / "scheduler" / "scheduler_config.json", str(tmp_path / "model")):
        assert process_from_diffusers(src).config() == process_from_diffusers(sch).config()
    assert denoiser_from_diffusers(torch.nn.Identity(), tmp_path / "model").prediction == "v"
    diffusers.EDMEulerScheduler().save_config(tmp_path / "edm")
    assert isinstance(process_from_diffusers(tmp_path / "edm"), EDM)
    with pytest.raises(ValueError, match="scheduler_config.json"):
        process_from_diffusers(tmp_path)


def _unet2d(**kw):
    torch.manual_seed(0)
    base = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D"))
    return diffusers.UNet2DModel(**{**base, **kw}).eval()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_edm_euler_matches_diffusers(prediction):
    """EDM preconditioning (c_noise = ln(sigma)/4, c_out negated for v) through our Euler sampler on the
    scheduler's own sigmas equals EDMEulerScheduler's loop."""
    unet = _unet2d()
    sch = diffusers.EDMEulerScheduler(prediction_type=prediction)
    sch.set_timesteps(6)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * sch.sigmas[0]
    x = x_T.clone()
    with torch.no_grad():
        for t in sch.timesteps:
            x = sch.step(unet(sch.scale_model_input(x, t), t).sample, t, x).prev_sample
        ours = td.sample(denoiser_from_diffusers(unet, sch), x_T, "euler", grid=sch.sigmas.double())
    err = float((ours - x).abs().max())
    assert err <= 1e-5 * max(1.0, float(x.abs().max())), err


# --- part 2: export and import --------------------------------------------------------------------------------
def test_unet2d_twin_on_random_inputs():
    """Our U-Net and the UNet2DModel built from unet2d_from_unet agree to 1e-5 (attention at two levels, classes,
    RGB, several heads of one size; augmentation labels, left out of the twin, which equals the net at the zero
    label)."""
    for kw in (dict(in_channels=3, image_size=16, channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                    attn_resolutions=(8, 4), num_classes=3, groups=16),
               dict(image_size=8, channels=32, channel_mult=(1, 1), attn_resolutions=(4,), num_heads=4),
               dict(image_size=8, channels=16, channel_mult=(1, 2), attn_resolutions=(4,), groups=16,
                    augment_dim=6)):
        torch.manual_seed(0)
        net = UNet(**kw).eval()
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 0.2)
        cfg, sd = unet2d_from_unet(net)
        twin = diffusers.UNet2DModel(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()
        twin.load_state_dict(sd, strict=True)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(4, net.in_channels, net.image_size, net.image_size, generator=g)
        t = torch.tensor([0.0, 17.0, 500.5, 999.0])
        y = torch.tensor([0, 1, 2, 3]) if net.num_classes else None  # 3 = the null class
        with torch.no_grad():
            a, b = net(x, t, y), twin(x, t, class_labels=y).sample
        assert float(a.abs().max()) > 0.1
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_no_twin_is_refused_with_one_line():
    with pytest.raises(ValueError, match="time_scale = 1"):
        unet2d_from_unet(UNet(channels=16, groups=16, time_scale=1000.0))
    with pytest.raises(ValueError, match="groups"):
        unet2d_from_unet(UNet(channels=48, channel_mult=(1, 2)))  # 48 -> 24 groups, 96 -> 32 groups
    with pytest.raises(ValueError, match="Fourier input features"):
        unet2d_from_unet(UNet(channels=16, groups=16, fourier_features=(3,)))
    with pytest.raises(ValueError, match="UNet2DModel twin"):
        unet2d_from_unet(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="DDPM"):
        diffusers_scheduler_config(EDM(), "x0")


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory):
    """A tiny unconditional DDPM U-Net run on 8x8 digits, its weights then randomized (a trained-for-3-steps net
    predicts ~0; random weights make the comparisons meaningful)."""
    root = tmp_path_factory.mktemp("export")
    sets = ["model.channels=8", "model.num_res_blocks=1", "train.batch=8", "train.ckpt_every=0",
            "train.log_every=2", "train.threads=0", "train.warmup=1", "train.device=cpu", "train.steps=1",
            "sample.steps=4", "data.conditional=false", "process.T=100"]
    train(config_mod.resolve("digits", sets), root / "run", progress=False)
    model, _ = load_run(root / "run")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.net.parameters():
            p.normal_(0, 0.15)
    save_tensors(model.net.state_dict(), root / "run" / "ema.safetensors")
    return root / "run"


def test_export_unet_equals_ours_and_pipelines_run_offline(ddpm_run, tmp_path, capsys):
    assert main(["export-diffusers", str(ddpm_run), str(tmp_path / "ddim"), "--pipeline", "ddim"]) == 0
    assert "DDIMPipeline" in capsys.readouterr().out
    model, cfg = load_run(ddpm_run)
    unet = diffusers.UNet2DModel.from_pretrained(str(tmp_path / "ddim" / "unet"), local_files_only=True).eval()
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(5, 1, 8, 8, generator=g), torch.tensor([0.0, 3.0, 50.0, 77.5, 99.0])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t).sample, model.net(x, t), rtol=0, atol=1e-5)

    # DDIM through the exported diffusers pipeline equals ours at the same noise (leading spacing, eta = 0)
    pipe = diffusers.DDIMPipeline.from_pretrained(str(tmp_path / "ddim"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), num_inference_steps=10, eta=0.0,
               output_type="np").images
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = td.sample(model, x_T, "ddim", 10, grid="leading")
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)

    # DDPMPipeline: ancestral sampling with the same generator stream (x_T, then one draw per step)
    assert main(["export-diffusers", str(ddpm_run), str(tmp_path / "ddpm")]) == 0
    pipe = diffusers.DDPMPipeline.from_pretrained(str(tmp_path / "ddpm"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=10,
               output_type="np").images
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(2, 1, 8, 8, generator=g)
    with torch.no_grad():
        ours = td.sample(model, x_T, "ddpm", 10, grid="leading", generator=g)
    np.testing.assert_allclose((ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), ref, rtol=0, atol=1e-5)


def test_export_refusals(ddpm_run, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["export-diffusers", str(ddpm_run), str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--force" in err
    assert main(["export-diffusers", str(ddpm_run), str(tmp_path / "full"), "--force"]) == 0


def test_pipeline_imports_a_diffusers_folder_and_samples_with_unipc(ddpm_run, tmp_path):
    """Our exported folder through td.Pipeline gives our run's samples; a folder written by diffusers itself
    (random UNet2DModel, v-prediction DDIM scheduler) samples with our unipc as its Denoiser does."""
    from torchdiffusion.runs.diffusers_io import export_diffusers

    export_diffusers(ddpm_run, tmp_path / "exp")
    ours, imported = td.Pipeline.from_pretrained(ddpm_run), td.Pipeline.from_pretrained(tmp_path / "exp")
    assert imported.data_shape == (1, 8, 8) and isinstance(imported.process, DDPM)
    # (the grid named: the folder's default is its scheduler's timestep_spacing, "leading"; the run's is its own)
    kw = dict(n=3, sampler="unipc", steps=6, grid="leading", generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = ours(**kw)
        kw["generator"] = torch.Generator().manual_seed(5)
        b = imported(**kw)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="diffusers folder"):
        imported.save_pretrained(tmp_path / "copy")

    unet = _unet2d()
    sch = diffusers.DDIMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear")
    diffusers.DDIMPipeline(unet=unet, scheduler=sch).save_pretrained(str(tmp_path / "hub"))
    pipe = td.Pipeline.from_pretrained(tmp_path / "hub")
    assert pipe.model.prediction == "v"
    with torch.no_grad():
        x = pipe(n=2, sampler="unipc", steps=5, generator=torch.Generator().manual_seed(0))
        ref = pipe.generate(denoiser_from_diffusers(unet, sch), 2, sampler="unipc", steps=5,
                            generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-5)
