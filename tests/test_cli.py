"""The command line (cli.py): a real ``python -m torchdiffusion`` train -> sample round trip and ``--help``, and
every user error (bad preset, config key or value, sampler, grid, steps, run folder, checkpoint, class label)
exiting with status 2 and one line on stderr that says what was wrong and what is allowed, without a traceback.

Subprocesses cost seconds each (importing torch), so only the round trip, ``--help`` and one error run as real
processes; the other error cases call ``torchdiffusion.cli.main.main`` in-process (the same code path after argv).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import torchdiffusion as td
from helpers import one_line_error
from torchdiffusion.cli.main import main

TINY = ["--set", "train.steps=30", "--set", "model.hidden=32", "--set", "model.depth=2", "--set", "train.batch=64",
        "--set", "data.n=2000", "--set", "train.device=cpu", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torchdiffusion", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": "/tmp"})


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny ring run trained by a real ``python -m torchdiffusion train`` process."""
    out = tmp_path_factory.mktemp("cli") / "ring"
    p = _cli("train", "ring", "--out", str(out), *TINY)
    assert p.returncode == 0, p.stderr
    assert "trained 30 steps (now at 30)" in p.stdout
    assert {"config.json", "model.safetensors", "ema.safetensors", "train_state.safetensors"} <= {
        f.name for f in out.iterdir()}
    return out


# --- real processes (and --help) ---------------------------------------------------------------------------------
def test_help_lists_the_commands(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("train", "sample", "demo", "likelihood"):
        assert f"    {cmd}" in out, cmd
    for cmd, words in (("train", ("--out", "--set", "--no-resume", "ring")),
                       ("sample", ("--sampler", "--steps", "--n"))):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        sub = capsys.readouterr().out
        assert all(w in sub for w in words), (cmd, sub)


def test_sample_round_trip_png_and_npz(run: Path, tmp_path: Path, capsys) -> None:
    png = tmp_path / "x.png"
    p = _cli("sample", str(run), "--n", "16", "--sampler", "ddim", "--steps", "5", "--out", str(png))
    assert p.returncode == 0, p.stderr
    assert "wrote 16 samples" in p.stdout
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    pil = pytest.importorskip("PIL.Image")
    with pil.open(png) as im:
        im.verify()
    # npz in-process: shape, finiteness, and the same seed gives the same samples
    outs = []
    for name in ("a.npz", "b.npz"):
        assert main(["sample", str(run), "--n", "16", "--sampler", "ddim", "--steps", "5", "--seed", "3",
                     "--out", str(tmp_path / name)]) == 0
        with np.load(tmp_path / name) as z:
            arrays = [z[k] for k in z.files]
        assert len(arrays) >= 1
        x = arrays[0]
        assert x.shape == (16, 2) and np.isfinite(x).all()
        outs.append(x)
    assert np.array_equal(outs[0], outs[1])
    # exactly what the library gives for that run, seed, sampler and steps
    ref = td.Pipeline.from_pretrained(run)(n=16, sampler="ddim", steps=5, generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(outs[0], ref.numpy(), rtol=1e-6, atol=1e-6)


def test_unknown_preset_in_a_real_process(tmp_path: Path) -> None:
    p = _cli("train", "nope", "--out", str(tmp_path / "r"))
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown preset 'nope'" in lines[0] and "ring" in lines[0], p.stderr
    assert not (tmp_path / "r").exists()


# --- train errors (in-process) ------------------------------------------------------------------------------------
def test_train_errors(capsys, tmp_path: Path) -> None:
    out = str(tmp_path / "r")
    msg = one_line_error(capsys, "train", "nope", "--out", out)
    assert "unknown preset 'nope'" in msg and "presets:" in msg and "ring" in msg
    msg = one_line_error(capsys, "train", str(tmp_path / "missing.json"), "--out", out)
    assert "config file not found" in msg
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{")
    assert "corrupt JSON in" in one_line_error(capsys, "train", str(bad_json), "--out", out)
    msg = one_line_error(capsys, "train", "ring", "--out", out, "--set", "train.foo=1")
    assert "unknown config key 'train.foo'" in msg and "allowed here:" in msg and "steps" in msg
    msg = one_line_error(capsys, "train", "ring", "--out", out, "--set", "trian.steps=1")
    assert "unknown config key 'trian'" in msg and "train" in msg
    msg = one_line_error(capsys, "train", "ring", "--out", out, "--set", "train.steps=abc")
    assert "train.steps" in msg and "expects a number" in msg and "'abc'" in msg
    msg = one_line_error(capsys, "train", "ring", "--out", out, "--set", "train.ema_warmup=maybe")
    assert "train.ema_warmup" in msg and "true or false" in msg
    msg = one_line_error(capsys, "train", "ring", "--out", out, "--set", "model.channel_mult=1,2")
    assert "model.channel_mult" in msg and "list" in msg
    assert "--set expects key=value" in one_line_error(capsys, "train", "ring", "--out", out, "--set", "train.steps")
    assert "section.key" in one_line_error(capsys, "train", "ring", "--out", out, "--set", "steps=3")
    msg = one_line_error(capsys, "train", "ring", "--out", out, "--set", "train.steps=0")
    assert "train.steps must be a whole number >= 1, got 0" in msg
    msg = one_line_error(capsys, "train", "ring", "--out", out, "--set", "process.name=foo")
    assert "unknown process 'foo'" in msg and "ddpm" in msg
    msg = one_line_error(capsys, "train", "ring", "--out", out, "--set", "model.prediction=foo")
    assert "unknown prediction 'foo'" in msg and "eps" in msg
    msg = one_line_error(capsys, "train", "ring", "--out", out, "--set", "loss.name=foo")
    assert "unknown loss 'foo'" in msg and "dsm" in msg
    msg = one_line_error(capsys, "train", "ring", "--out", out, "--set", "loss.weighting=foo", "--set", "train.steps=2",
                 "--quiet")
    assert "unknown loss weighting 'foo'" in msg and "min_snr" in msg
    assert not (tmp_path / "r").exists()  # nothing was written by a failed start


def test_resume_into_a_different_config_is_an_error(run: Path, capsys, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    msg = one_line_error(capsys, "train", "ring", "--out", str(copy), *TINY[:-1], "--set", "model.hidden=64")
    assert "different model config" in msg and "--force" in msg


# --- sample errors (in-process) -----------------------------------------------------------------------------------
def test_sample_errors(run: Path, capsys, tmp_path: Path) -> None:
    r = str(run)
    msg = one_line_error(capsys, "sample", r, "--sampler", "nope")
    assert "unknown sampler 'nope'" in msg and "allowed:" in msg and "ddim" in msg
    msg = one_line_error(capsys, "sample", r, "--steps", "0")
    assert "steps" in msg and ">= 1" in msg and "got 0" in msg
    msg = one_line_error(capsys, "sample", r, "--grid", "nope", "--steps", "3")
    assert "unknown grid 'nope'" in msg and "uniform" in msg
    msg = one_line_error(capsys, "sample", str(tmp_path / "missing"))
    assert "run folder not found" in msg
    msg = one_line_error(capsys, "sample", r, "--class", "3", "--steps", "2")
    assert "--class" in msg and "not class-conditional" in msg
    assert "--guidance needs --class" in one_line_error(capsys, "sample", r, "--guidance", "2", "--steps", "2")
    assert "--opt expects key=value" in one_line_error(capsys, "sample", r, "--opt", "eta", "--steps", "2")
    msg = one_line_error(capsys, "sample", r, "--steps", "2", "--n", "4", "--out", str(tmp_path / "x.jpg"))
    assert ".png or .npz" in msg


def test_corrupt_and_missing_checkpoints(run: Path, capsys, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    (bad / "model.safetensors").write_bytes(b"garbage" * 100)
    msg = one_line_error(capsys, "sample", str(bad), "--no-ema", "--steps", "2")
    assert "corrupt checkpoint" in msg and "model.safetensors" in msg
    (bad / "ema.safetensors").unlink()
    msg = one_line_error(capsys, "sample", str(bad), "--steps", "2")
    assert "missing checkpoint file" in msg and "ema.safetensors" in msg
    (bad / "config.json").write_text("[1, 2")
    assert "corrupt JSON" in one_line_error(capsys, "sample", str(bad), "--steps", "2")
    (bad / "config.json").unlink()
    assert "missing file" in one_line_error(capsys, "sample", str(bad), "--steps", "2")
    # a run folder whose training state is corrupt cannot be resumed silently
    bad2 = tmp_path / "bad2"
    shutil.copytree(run, bad2)
    (bad2 / "train_state.safetensors").write_bytes(b"\x01" * 64)
    msg = one_line_error(capsys, "train", "ring", "--out", str(bad2), *TINY)
    assert "corrupt checkpoint" in msg and "train_state.safetensors" in msg


def test_no_command_prints_help(capsys) -> None:
    assert main([]) == 2
    assert "train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # argparse usage errors also exit with status 2
        main(["sample", "--n", "x"])
    assert e.value.code == 2
    assert main(["sample"]) == 2  # no RUN (and no --list): one line
    assert "sample needs a RUN folder" in capsys.readouterr().err
