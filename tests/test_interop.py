"""diffusers interop: schedules, prediction types, and sample-for-sample agreement of DDIM / DDPM / DPM-Solver++
loops with diffusers' schedulers on a small random UNet2DModel (skipped when diffusers is missing)."""

import math

import pytest
import torch

import torchdiffusion as td
from torchdiffusion.parameterization.interop import (
    DiffusersNet,
    denoiser_from_diffusers,
    prediction_from_diffusers,
    process_from_diffusers,
)

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("rescale", [False, True])
def test_schedules_match_diffusers(schedule, rescale):
    kw = {"beta_start": 0.00085, "beta_end": 0.012} if schedule == "scaled_linear" else {}
    sch = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule, rescale_betas_zero_snr=rescale,
                                  **kw)
    proc = process_from_diffusers(sch)
    assert proc.T == 1000
    torch.testing.assert_close(proc.alphas_cumprod, sch.alphas_cumprod.double(), rtol=2e-5, atol=1e-7)
    # the same from the config dict
    assert torch.equal(process_from_diffusers(dict(sch.config)).alphas_cumprod, proc.alphas_cumprod)
    if rescale:  # zero terminal SNR (B-7): sqrt(abar_T) = 0, first step unchanged
        assert proc.alphas_cumprod[-1] == 0
        assert math.isclose(float(proc.alphas_cumprod[0]), float(process_from_diffusers(
            {**sch.config, "rescale_betas_zero_snr": False}).alphas_cumprod[0]), rel_tol=1e-12)


def test_trained_betas_and_errors():
    betas = torch.linspace(1e-4, 0.03, 50)
    proc = process_from_diffusers({"num_train_timesteps": 50, "trained_betas": betas.tolist()})
    torch.testing.assert_close(proc.betas, betas.double())
    with pytest.raises(ValueError, match="beta_schedule"):
        process_from_diffusers({"beta_schedule": "nope"})
    with pytest.raises(ValueError, match="trained_betas"):
        process_from_diffusers({"num_train_timesteps": 10, "trained_betas": [0.1] * 3})
    with pytest.raises(TypeError):
        process_from_diffusers(3)


def test_prediction_types():
    assert prediction_from_diffusers({"prediction_type": "epsilon"}) == "eps"
    assert prediction_from_diffusers({"prediction_type": "sample"}) == "x0"
    assert prediction_from_diffusers({"prediction_type": "v_prediction"}) == "v"
    assert prediction_from_diffusers({}) == "eps"
    with pytest.raises(ValueError, match="prediction_type"):
        prediction_from_diffusers({"prediction_type": "score"})
    with pytest.raises(ValueError, match="flow matching"):
        prediction_from_diffusers({"prediction_type": "flow_prediction"})


def test_eps_prediction_at_zero_snr_raises():
    """B-7: with zero terminal SNR, eps-prediction cannot give x0 at t = T-1; v-prediction can."""
    proc = process_from_diffusers({"rescale_betas_zero_snr": True, "num_train_timesteps": 100})
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        td.Denoiser(lambda x, t: x, proc, "eps").predict(x, proc.t_max)
    x0, eps = td.Denoiser(lambda x, t: x, proc, "v").predict(x, proc.t_max)
    torch.testing.assert_close(x0, -x)  # alpha = 0, sigma = 1: x0 = -v, eps = x
    torch.testing.assert_close(eps, x)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                 layers_per_block=1, norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def _close(ours, ref):
    """Agreement to 1e-5 relative to the output's scale (the random UNet's x0 reaches ~100; diffusers keeps its
    schedule in float32, we keep ours in float64, so float32 rounding is the only difference)."""
    err = float((ours - ref).abs().max())
    assert err <= 1e-5 * max(1.0, float(ref.abs().max())), err


def _diffusers_loop(sch, unet, x, steps, generator=None):
    sch.set_timesteps(steps)
    x = x * sch.init_noise_sigma
    with torch.no_grad():
        for t in sch.timesteps:
            out = unet(sch.scale_model_input(x, t), t).sample
            kw = {"generator": generator} if generator is not None else {}
            x = sch.step(out, t, x, **kw).prev_sample
    return x


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_matches_diffusers(unet, spacing):
    sch = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                  set_alpha_to_one=True, timestep_spacing=spacing)
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = _diffusers_loop(sch, unet, x_T, 10)
    model = denoiser_from_diffusers(unet, sch)
    ts_seen = []
    ours = td.sample(model, x_T, "ddim", 10, grid=spacing, callback=lambda d: ts_seen.append(d["t"]))
    assert ts_seen == [float(t) for t in sch.timesteps]
    _close(ours, ref)


def test_ddpm_matches_diffusers_with_shared_noise(unet):
    """Ancestral sampling with beta-tilde on a 10-step leading sub-grid. The same z is injected by giving both
    loops a generator with the same seed: diffusers' DDPMScheduler.step draws ``randn(shape, generator)`` once
    per step with t > 0, exactly as our ``ddpm`` sampler does (no draw on the last step)."""
    sch = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                  variance_type="fixed_small", timestep_spacing="leading")
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    ref = _diffusers_loop(sch, unet, x_T, 10, generator=torch.Generator().manual_seed(7))
    model = td.Denoiser(DiffusersNet(unet), process_from_diffusers(sch), "eps")
    ours = td.sample(model, x_T, "ddpm", 10, grid="leading", generator=torch.Generator().manual_seed(7))
    _close(ours, ref)
    other = td.sample(model, x_T, "ddpm", 10, grid="leading", generator=torch.Generator().manual_seed(8))
    assert (other - ref).abs().max() > 1e-2  # the noise really is what makes them agree


@pytest.mark.parametrize("order", [2])
def test_dpmpp_2m_matches_diffusers(unet, order):
    """DPM-Solver++(2M) midpoint on diffusers' trailing timesteps (final step: denoise) agrees with
    DPMSolverMultistepScheduler."""
    sch = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                timestep_spacing="trailing", solver_order=order)
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = _diffusers_loop(sch, unet, x_T, 8)
    model = denoiser_from_diffusers(unet, sch)
    ours = td.sample(model, x_T, "dpmpp_2m", 8, grid="trailing")
    _close(ours, ref)


def test_diffusers_net_conditional_and_learned_variance():
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=2, block_out_channels=(16, 32),
                                layers_per_block=1, norm_num_groups=8, num_class_embeds=3,
                                down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    wrapped = DiffusersNet(net)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([10.0, 500.0], dtype=torch.float64)
    y = torch.tensor([0, 2])
    with torch.no_grad():
        out = wrapped(x, t, y)
        raw = net(x.float(), t, class_labels=y).sample
    assert out.dtype == torch.float64 and out.shape == x.shape
    torch.testing.assert_close(out.float(), raw[:, :1])
    with torch.no_grad():
        assert (wrapped(x, t, torch.tensor([1, 1])) - out).abs().max() > 0  # the label reaches the net
