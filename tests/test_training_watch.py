"""Issue 29: training you can watch -- a held-out loss in log.csv, a loss-curve PNG in every run folder, preview
grids by default for image presets, TensorBoard scalars with the tensorboard extra."""

from __future__ import annotations

import csv

import pytest
import torch
from PIL import Image

from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs.build import load_run, net_of
from torchdiffusion.runs.train import build_trainer, data_splits, train, validator
from torchdiffusion.training.checkpoint import load_tensors

pytestmark = pytest.mark.usefixtures("one_thread")
RING = ["train.steps=20", "model.hidden=16", "model.depth=1", "train.device=cpu", "train.ckpt_every=10",
        "train.log_every=5", "train.batch=64"]


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_log_has_a_held_out_loss_and_the_run_a_loss_curve(tmp_path):
    cfg = config_mod.resolve("ring", RING)
    train(cfg, tmp_path / "r", progress=False)
    log = rows(tmp_path / "r" / "log.csv")
    assert [int(r["step"]) for r in log] == [5, 10, 15, 20] and all(r["val_loss"] for r in log)
    assert len({r["val_loss"] for r in log}) == 4  # it follows the model
    assert all(r["val_loss"] != r["loss"] for r in log)
    png = Image.open(tmp_path / "r" / "loss.png")
    assert png.format == "PNG" and png.size[0] > 300
    # the last row is the EMA weights' held-out loss (a function of the weights alone)
    model, saved = load_run(tmp_path / "r")
    _, heldout, _ = data_splits(saved)
    assert len(heldout) == 1000  # data.holdout = 0.1 of the ring's 10000
    val = validator(model, saved, heldout, False, 64)(net_of(model))
    assert val == pytest.approx(float(log[-1]["val_loss"]), rel=1e-6)


def test_validation_does_not_change_training(tmp_path):
    cfg = config_mod.resolve("ring", RING)
    a = build_trainer(cfg, tmp_path / "a", progress=False)
    a.run()
    b = build_trainer(cfg, tmp_path / "b", progress=False)
    b.validate = None
    b.run()
    for name in ("ema.safetensors", "train_state.safetensors"):
        ta, tb = load_tensors(tmp_path / "a" / name)[0], load_tensors(tmp_path / "b" / name)[0]
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert "val_loss" not in rows(tmp_path / "b" / "log.csv")[0]
    losses = [[r["loss"] for r in rows(tmp_path / run / "log.csv")] for run in ("a", "b")]
    assert losses[0] == losses[1]


def test_no_holdout_no_val_column_and_an_old_log_keeps_its_columns(tmp_path):
    train(config_mod.resolve("ring", [*RING, "data.holdout=0"]), tmp_path / "n", progress=False)
    assert "val_loss" not in rows(tmp_path / "n" / "log.csv")[0] and (tmp_path / "n" / "loss.png").is_file()
    # a run begun before the val column existed resumes with its own header and loses no row
    cfg = config_mod.resolve("ring", RING)
    train(cfg, tmp_path / "o", progress=False, stop_after=10)
    log = tmp_path / "o" / "log.csv"
    old = [{k: v for k, v in r.items() if k != "val_loss"} for r in rows(log)]
    with open(log, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(old[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(old)
    train(cfg, tmp_path / "o", progress=False)
    new = rows(log)
    assert list(new[0]) == list(old[0]) and [int(r["step"]) for r in new] == [5, 10, 15, 20]


def test_image_presets_preview_by_default(tmp_path):
    for preset in ("digits", "digits16", "images", "latent", "ae_digits"):
        assert config_mod.resolve(preset)["train"]["sample_every"] > 0, preset
    assert config_mod.resolve("ring")["train"]["sample_every"] == 0
    cfg = config_mod.resolve("digits", ["model.channels=8", "model.num_res_blocks=1", "train.batch=8",
                                        "train.ckpt_every=0", "train.steps=2", "train.sample_every=2",
                                        "sample.steps=2", "train.device=cpu", "train.log_every=1"])
    train(cfg, tmp_path / "d", progress=False)
    grid = Image.open(tmp_path / "d" / "samples" / "step_0000002.png")
    assert grid.size[0] == grid.size[1]  # 64 of the preset's 100 samples: an 8 x 8 grid
    assert all(r["val_loss"] for r in rows(tmp_path / "d" / "log.csv"))


def test_tensorboard_extra_logs_the_losses(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(config_mod.resolve("ring", [*RING, "train.tensorboard=true"]), tmp_path / "t", progress=False)
    acc = EventAccumulator(str(tmp_path / "t" / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/val_loss"} <= set(tags)
    assert [e.step for e in acc.Scalars("train/val_loss")] == [5, 10, 15, 20]
