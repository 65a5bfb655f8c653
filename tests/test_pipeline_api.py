"""Issue 29: the Pipeline shaped like the one diffusers users know -- counts, output types, .to, diffusers'
argument names, callbacks that change the state or stop, progress bars, threads, generator lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torchdiffusion as td
from torchdiffusion._tensor import SampleGenerators
from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs.pipeline import sample_seeds
from torchdiffusion.runs.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["model.channels=8", "model.num_res_blocks=1", "train.batch=16", "train.ckpt_every=0", "train.log_every=2",
        "train.threads=0", "train.warmup=2", "train.device=cpu", "train.steps=3", "sample.steps=4",
        "train.sample_every=0"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    train(config_mod.resolve("ring", ["train.steps=20", "model.hidden=16", "model.depth=1", "train.device=cpu",
                                      "train.ckpt_every=0", "sample.steps=5"]), root / "ring", progress=False)
    train(config_mod.resolve("digits", TINY), root / "digits", progress=False)
    return root


@pytest.fixture(scope="module")
def digits(runs):
    return td.Pipeline.from_pretrained(runs / "digits")


@pytest.fixture(scope="module")
def ring(runs):
    return td.Pipeline.from_pretrained(runs / "ring")


def raw(pipe, n, seed, steps, cond=None, model=None):
    """What the pipeline samples before clamping: its per-sample noise through td.sample."""
    gens = SampleGenerators(sample_seeds(n, gen(seed)))
    x_T = gens.randn((n, *pipe.data_shape)) * pipe.process.prior_std()
    return td.sample(model or pipe.model, x_T, "ddim", steps, generator=gens, cond=cond, progress=False)


# --- how many ---------------------------------------------------------------------------------------------------
def test_batch_size_is_the_number_of_images_as_in_diffusers(ring):
    assert ring(batch_size=4, generator=gen(0)).shape == (4, 2)
    assert ring(generator=gen(0)).shape == (1, 2)  # diffusers' default batch_size=1
    torch.testing.assert_close(ring(batch_size=4, generator=gen(0)), ring(n=4, generator=gen(0)), rtol=0, atol=0)
    torch.testing.assert_close(ring(4, generator=gen(0)), ring(n=4, generator=gen(0), max_batch=3),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="n=4 and batch_size=3 disagree") as e:
        ring(n=4, batch_size=3)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="max_batch must be"):
        ring(n=4, max_batch=0)


def test_labels_give_the_count_and_num_images_per_prompt_repeats_them(digits):
    out = digits(class_labels=[1, 2, 3], generator=gen(0), output_type="pt")
    assert out.images.shape == (3, 1, 8, 8) and out.class_labels.tolist() == [1, 2, 3]
    out = digits(class_labels=[4, 7], num_images_per_prompt=2, generator=gen(0), output_type="pt")
    assert out.class_labels.tolist() == [4, 4, 7, 7]
    assert digits(class_labels=5, num_images_per_prompt=3, generator=gen(0)).shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="2 class_labels x 2 each = 4 samples, but n/batch_size asks for 3"):
        digits(n=3, class_labels=[4, 7], num_images_per_prompt=2)


# --- output types and clamping ------------------------------------------------------------------------------------
def test_output_types_follow_diffusers_and_images_are_clamped(digits):
    kw = dict(n=3, class_labels=[0, 1, 2], guidance=4.0, steps=4)
    cond = torch.tensor([0, 1, 2])
    unclamped = raw(digits, 3, 0, 4, cond=cond, model=td.CFG(digits.model, 4.0))
    assert float(unclamped.abs().max()) > 1.0  # this tiny model leaves the data range: clamping is tested
    x = digits(generator=gen(0), **kw)
    torch.testing.assert_close(x, unclamped.clamp(-1, 1), rtol=0, atol=1e-6)
    pt = digits(generator=gen(0), output_type="pt", **kw)
    np_ = digits(generator=gen(0), output_type="np", **kw).images
    pil = digits(generator=gen(0), output_type="pil", **kw)[0]
    torch.testing.assert_close(pt.images, (x + 1) / 2, rtol=0, atol=1e-6)
    assert isinstance(np_, np.ndarray) and np_.shape == (3, 8, 8, 1) and np_.dtype == np.float32
    np.testing.assert_allclose(np_, ((x + 1) / 2).permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert len(pil) == 3 and pil[0].size == (8, 8) and pil[0].mode == "L"
    np.testing.assert_array_equal(np.asarray(pil[1]), (np_[1, ..., 0] * 255).round().astype(np.uint8))
    (images,) = digits(generator=gen(0), output_type="np", return_dict=False, **kw)
    np.testing.assert_array_equal(images, np_)
    assert isinstance(digits(n=1, steps=2, class_labels=0, return_dict=True)[0], list)  # diffusers' default: pil
    with pytest.raises(ValueError, match="output_type must be one of pt, np, pil"):
        digits(n=1, output_type="latent")


def test_non_image_data_stay_raw(ring):
    x = ring(n=5, generator=gen(2))
    np.testing.assert_array_equal(ring(n=5, generator=gen(2), output_type="np").images, x.numpy())
    torch.testing.assert_close(ring(n=5, generator=gen(2), output_type="pt").images, x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="output_type='pil' needs image data"):
        ring(n=2, output_type="pil")


# --- .to ----------------------------------------------------------------------------------------------------------
def test_to_device_and_dtype(runs):
    pipe = td.Pipeline.from_pretrained(runs / "digits")
    ref = pipe(n=2, class_labels=3, steps=3, generator=gen(1))
    assert pipe.to("cpu") is pipe and pipe.device == torch.device("cpu")
    pipe.to(torch.bfloat16)
    assert pipe.dtype == torch.bfloat16
    low = pipe(n=2, class_labels=3, steps=3, generator=gen(1))
    assert low.dtype == torch.float32
    assert 0 < float((low - ref).abs().max()) < 0.1  # bfloat16 rounding, not another sample
    pipe.to("cpu", torch.float32)
    torch.testing.assert_close(pipe(n=2, class_labels=3, steps=3, generator=gen(1)), ref, rtol=0, atol=1e-2)
    with pytest.raises(TypeError, match="floating point"):
        pipe.to(torch.int64)
    with pytest.raises(ValueError, match="cuda"):
        pipe.to("cuda:7") if not torch.cuda.is_available() else pipe.to("nope")
    assert td.Pipeline.from_pretrained(runs / "digits", torch_dtype=torch.bfloat16).dtype == torch.bfloat16


# --- diffusers' names ---------------------------------------------------------------------------------------------
def test_diffusers_argument_names_mean_what_they_mean_there(digits):
    a = digits(n=2, class_labels=[1, 2], steps=3, guidance=0.5, generator=gen(3))
    b = digits(batch_size=2, class_labels=[1, 2], num_inference_steps=3, guidance_scale=1.5, generator=gen(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    plain = digits(n=2, class_labels=[1, 2], steps=3, generator=gen(3))
    torch.testing.assert_close(digits(n=2, class_labels=[1, 2], steps=3, guidance_scale=1.0, generator=gen(3)),
                               plain, rtol=0, atol=0)  # guidance_scale <= 1: no guidance, as in diffusers
    with pytest.raises(ValueError, match="steps=3 and num_inference_steps"):
        digits(n=1, class_labels=1, steps=3, num_inference_steps=4)
    with pytest.raises(ValueError, match="guidance=0.2 and guidance_scale"):
        digits(n=1, class_labels=1, guidance=0.2, guidance_scale=3.0)
    with pytest.raises(ValueError, match="prompt given, but this run has no text encoder"):
        digits(n=1, prompt="a 3")  # diffusers' name, our meaning: text runs take prompts
    for name, ours in (("latents", "td.sample"), ("height", "data shape"),
                       ("timesteps", "grid="), ("callback_steps", "callback_on_step_end")):
        with pytest.raises(ValueError, match=f"'{name}' is diffusers' argument.*{ours}") as e:
            digits(n=1, **{name: 1})
        assert "\n" not in str(e.value)
    digits(n=1, class_labels=1, steps=2, use_clipped_model_output=False)  # DDIMPipeline's default: accepted
    with pytest.raises(TypeError, match="unexpected argument.*'variant'.*allowed: ema"):
        td.Pipeline.from_pretrained("unused", variant="fp16")


def test_a_list_of_generators_is_one_generator_per_sample(ring):
    gens = [gen(10), gen(11), gen(12)]
    x = ring(batch_size=3, sampler="ddpm", steps=5, generator=gens, max_batch=2)
    own = SampleGenerators(generators=[gen(10), gen(11), gen(12)])
    x_T = own.randn((3, 2)) * ring.process.prior_std()
    ref = td.sample(ring.model, x_T, "ddpm", 5, generator=own, progress=False)
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one generator per sample"):
        ring(batch_size=3, generator=[gen(0)])


# --- callbacks ----------------------------------------------------------------------------------------------------
def test_callback_on_step_end_sees_the_state_and_may_change_it(ring):
    seen = []

    def cb(pipe, i, t, kw):
        assert pipe is ring and set(kw) == {"latents"}
        seen.append((i, t, kw["latents"].clone()))
        return kw

    x = ring(n=3, steps=5, generator=gen(4), callback_on_step_end=cb)
    assert [s[0] for s in seen] == [0, 1, 2, 3, 4] and seen[0][1] > seen[-1][1]
    torch.testing.assert_close(seen[-1][2], x, rtol=0, atol=0)  # the last state is the sample
    torch.testing.assert_close(x, ring(n=3, steps=5, generator=gen(4)), rtol=0, atol=0)  # returning it: no change

    def zero_last(pipe, i, t, kw):
        return {"latents": torch.zeros_like(kw["latents"])} if i == 4 else {}
    assert float(ring(n=3, steps=5, generator=gen(4), callback_on_step_end=zero_last).abs().max()) == 0.0

    def shift_first(pipe, i, t, kw):
        return {"latents": kw["latents"] + 1.0} if i == 0 else {}
    moved = ring(n=3, steps=5, generator=gen(4), callback_on_step_end=shift_first)
    assert float((moved - x).abs().min()) > 1e-3  # every sample walked on from the moved state


def test_interrupt_stops_and_returns_the_state_reached(ring):
    states = []

    def stop_at_1(pipe, i, t, kw):
        states.append(kw["latents"].clone())
        if i == 1:
            pipe._interrupt = True
        return {}
    x = ring(n=4, steps=5, generator=gen(5), callback_on_step_end=stop_at_1, max_batch=2)
    assert ring.interrupt and len(states) == 2  # the second batch never started
    torch.testing.assert_close(x[:2], states[1], rtol=0, atol=0)
    seeds = sample_seeds(4, gen(5))
    x_T = SampleGenerators(seeds[2:]).randn((2, 2)) * ring.process.prior_std()
    torch.testing.assert_close(x[2:], x_T, rtol=0, atol=0)  # at their initial noise
    assert not torch.equal(x, ring(n=4, steps=5, generator=gen(5)))
    assert not ring.interrupt  # a new call starts afresh


def test_td_sample_callback_may_change_the_state_or_stop(ring):
    x_T = torch.randn(3, 2, generator=gen(0))

    def stop(d):
        if d["i"] == 2:
            raise td.samplers.StopSampling
    states = []
    x = td.sample(ring.model, x_T, "ddim", 6, callback=lambda d: states.append(d["x"].clone()), progress=False)
    early = td.sample(ring.model, x_T, "ddim", 6, callback=stop, progress=False)
    torch.testing.assert_close(early, states[2], rtol=0, atol=0)
    zero = td.sample(ring.model, x_T, "ddim", 6, callback=lambda d: {"x": torch.zeros_like(d["x"])}, progress=False)
    assert float(zero.abs().max()) == 0.0 and float(x.abs().max()) > 0
    with pytest.raises(ValueError, match="the callback returned a state of shape"):
        td.sample(ring.model, x_T, "ddim", 6, callback=lambda d: {"x": torch.zeros(2)}, progress=False)


# --- progress, threads --------------------------------------------------------------------------------------------
def test_progress_bars_have_totals_and_can_be_turned_off(runs, capsys):
    pipe = td.Pipeline.from_pretrained(runs / "ring")
    capsys.readouterr()
    pipe(n=4, steps=5, max_batch=2, progress=True)
    assert "10/10" in capsys.readouterr().err  # 5 steps x 2 batches
    pipe(n=4, steps=5)  # not a terminal: no bar unless asked
    assert capsys.readouterr().err == ""
    pipe.set_progress_bar_config(disable=False, desc="mine")
    pipe(n=4, steps=5)
    err = capsys.readouterr().err
    assert "mine" in err and "5/5" in err
    pipe.set_progress_bar_config(disable=True)
    pipe(n=4, steps=5)
    assert capsys.readouterr().err == ""
    pipe(n=4, steps=5, progress=True)  # the call's own argument wins
    assert "5/5" in capsys.readouterr().err
    td.sample(pipe.model, torch.randn(2, 2), "heun", 7, progress=True)
    assert "4/4" in capsys.readouterr().err  # heun: 7 evaluations, 4 intervals
    td.sample(pipe.model, torch.randn(2, 2), "ddim", 7, progress=False)
    assert capsys.readouterr().err == ""


def test_threads_are_set_while_sampling_and_restored(runs):
    pipe = td.Pipeline.from_pretrained(runs / "ring")
    assert pipe.config["sample"]["threads"] == 1
    before = torch.get_num_threads()
    seen = []
    pipe(n=2, steps=2, callback=lambda d: seen.append(torch.get_num_threads()))
    pipe(n=2, steps=2, threads=2, callback=lambda d: seen.append(torch.get_num_threads()))
    assert seen == [1, 1, 2, 2] and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be"):
        pipe(n=2, threads=-1)
