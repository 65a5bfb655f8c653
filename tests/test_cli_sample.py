"""Issue 29, the command line: several classes per call, conditional runs never silently unconditional, an .npz
that holds labels, seeds and settings, a bar with a total, --threads, a fast --version and a quiet broken pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import torchdiffusion as td
from torchdiffusion.cli.main import main
from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = Path(__file__).resolve().parents[1] / "src"
TINY = ["model.channels=8", "model.num_res_blocks=1", "train.batch=16", "train.ckpt_every=0", "train.log_every=2",
        "train.threads=0", "train.warmup=2", "train.device=cpu", "train.steps=3", "sample.steps=3",
        "train.sample_every=0"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("clis")
    train(config_mod.resolve("digits", TINY), root / "digits", progress=False)
    return root / "digits"


def test_class_list_and_npz_contents(digits, tmp_path):
    out = tmp_path / "s.npz"
    assert main(["sample", str(digits), "--class", "0,3,9", "--n", "2", "--seed", "5", "--guidance", "0.5",
                 "--out", str(out), "--quiet"]) == 0
    f = np.load(out, allow_pickle=False)
    assert sorted(f.files) == ["labels", "seeds", "settings", "x"]
    assert f["labels"].tolist() == [0, 0, 3, 3, 9, 9] and f["x"].shape == (6, 1, 8, 8)
    ref = td.Pipeline.from_pretrained(digits)(class_labels=[0, 0, 3, 3, 9, 9], guidance=0.5, generator=gen(5))
    np.testing.assert_array_equal(f["x"], ref.numpy())
    settings = json.loads(str(f["settings"]))
    assert settings["sampler"] == "ddim" and settings["steps"] == 3 and settings["guidance"] == 0.5
    assert settings["seed"] == 5 and settings["run"] == str(digits)
    # each sample's seed redraws it alone
    pipe = td.Pipeline.from_pretrained(digits)
    one = pipe.generate(td.CFG(pipe.model, 0.5), 1, cond=torch.tensor([3]), seeds=f["seeds"][3:4].tolist())
    torch.testing.assert_close(one[0], torch.from_numpy(f["x"][3]), rtol=1e-5, atol=1e-5)


def test_all_classes_one_row_each_and_no_silent_unconditional(digits, tmp_path, capsys):
    png = tmp_path / "all.png"
    assert main(["sample", str(digits), "--class", "all", "--n", "3", "--out", str(png), "--quiet"]) == 0
    assert "30 samples (3 per class x 10 classes)" in capsys.readouterr().out
    w, h = Image.open(png).size
    assert h / w == pytest.approx(10 / 3, rel=0.05)  # 10 rows of 3
    # without --class a conditional run draws every class, not the null class
    out = tmp_path / "d.npz"
    assert main(["sample", str(digits), "--n", "1", "--out", str(out), "--quiet"]) == 0
    assert np.load(out)["labels"].tolist() == list(range(10))
    out = tmp_path / "u.npz"
    assert main(["sample", str(digits), "--n", "2", "--unconditional", "--seed", "1", "--out", str(out),
                 "--quiet"]) == 0
    f = np.load(out)
    assert f["labels"].tolist() == [-1, -1]
    np.testing.assert_array_equal(f["x"], td.Pipeline.from_pretrained(digits)(n=2, generator=gen(1)).numpy())
    for argv, msg in ((["--class", "1,x"], "--class must be N, N,M,... or all"),
                      (["--class", "3,3"], "lists a class twice"), (["--class", "0,12"], "0..9"),
                      (["--unconditional", "--class", "2"], "exclude each other"),
                      (["--unconditional", "--guidance", "1"], "--guidance needs a class")):
        assert main(["sample", str(digits), *argv, "--out", str(tmp_path / "e.npz")]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err


def test_sample_bar_has_a_total_and_threads(digits, tmp_path, capsys):
    capsys.readouterr()
    assert main(["sample", str(digits), "--class", "1", "--n", "4", "--max-batch", "2", "--steps", "3",
                 "--threads", "1", "--out", str(tmp_path / "b.npz")]) == 0
    assert "6/6" in capsys.readouterr().err  # 3 steps x 2 batches
    assert main(["sample", str(digits), "--class", "1", "--threads", "-1", "--out", str(tmp_path / "b.npz")]) == 2
    assert "--threads must be" in capsys.readouterr().err


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", "import sys; from torchdiffusion.__main__ import main; "
                           "rc = main(); assert 'torch' not in sys.modules or sys.argv[1] != '--version'; "
                           "sys.exit(rc)", *args], env=env, capture_output=True, text=True, timeout=120, **kw)


def test_version_does_not_import_torch():
    p = _cli("--version")
    assert p.returncode == 0 and p.stdout.startswith("torchdiffusion ") and p.stderr == ""


def test_broken_pipe_exits_quietly():
    r, w = os.pipe()
    os.close(r)  # the reader is gone before anything is written (`| head -1` that already quit)
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torchdiffusion", "config", "digits"], stdout=w,
                       stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    os.close(w)
    assert p.returncode == 0 and p.stderr == "", p.stderr
