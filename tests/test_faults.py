"""Run folders never lose work (docs/design.md section 6, issue 15).

Real processes are killed (SIGKILL at seeded random steps, inside checkpoint writes, and from outside after a
seeded random delay), terminated (SIGTERM) and raced (two trainers); every resumed run must end bit-identical
(weights, EMA, optimizer and RNG state, log) to one that was never interrupted, with no temp file left. Then the
file system fails (a full tmpfs, a read-only mount, a folder or a file in the way) and the outputs must be
refused or kept; damaged and non-finite inputs must be one-line errors. ``benchmarks/faults.py`` runs the same
kinds of probe as a table.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import torchdiffusion as td
from helpers import one_line_error
from torchdiffusion import _files as files
from torchdiffusion.cli.main import main
from torchdiffusion.data import datasets
from torchdiffusion.parameterization.denoiser import Denoiser
from torchdiffusion.parameterization.guidance import Classifier, ClassifierGuidance
from torchdiffusion.parameterization.interop import process_from_diffusers
from torchdiffusion.processes import DDPM, VP
from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs.build import load_run
from torchdiffusion.training import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

STEPS = 300
SETS = ["--set", "model.hidden=32", "--set", "model.depth=2", "--set", "train.batch=64", "--set", "data.n=2000",
        "--set", "train.log_every=1", "--set", "train.ckpt_every=25", "--set", "train.device=cpu",
        "--set", "train.schedule=constant", "--quiet"]
RUN_FILES = {".lock", "config.json", "log.csv", "model.safetensors", "ema.safetensors", "train_state.safetensors",
             "loss.png"}

# A subprocess that trains like `torchdiffusion train`, and can SIGKILL itself at a chosen moment: "step K" just
# before step K starts; "write K" inside the K-th atomic write, its temp file complete but not yet renamed;
# "partial K" half-way through writing the K-th temp file. A self-inflicted SIGKILL is what kill -9 does: no
# handler, no cleanup, at exactly that point.
DRIVER = r"""
import os, signal, sys
from pathlib import Path
from torchdiffusion.training import trainer
mode, k = sys.argv[1], int(sys.argv[2])
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if mode == "step":
    real_step = trainer.Trainer.train_step
    def step(self):
        if self.step == k:
            die()
        return real_step(self)
    trainer.Trainer.train_step = step
elif mode in ("write", "partial"):
    count = [0]
    real_replace, real_write = os.replace, Path.write_bytes
    def replace(src, dst):
        count[0] += 1
        if mode == "write" and count[0] == k:
            die()
        return real_replace(src, dst)
    def write_bytes(self, data):
        if mode == "partial" and count[0] + 1 == k and self.name.endswith(".tmp"):
            real_write(self, data[: len(data) // 2])
            die()
        return real_write(self, data)
    os.replace, Path.write_bytes = replace, write_bytes
from torchdiffusion.cli.main import main
sys.exit(main(sys.argv[3:]))
"""


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def train_cmd(out: Path, steps: int = STEPS, *extra: str) -> list[str]:
    return ["train", "ring", "--out", str(out), "--set", f"train.steps={steps}", *SETS, *extra]


def drive(mode: str, k: int, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, mode, str(k), *argv], capture_output=True, text=True,
                          env=_env(), timeout=300)


def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torchdiffusion", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())


def log_steps(run: Path) -> int:
    """The number of complete rows in ``run/log.csv`` (0 while it does not exist)."""
    try:
        return max(0, (run / "log.csv").read_text().count("\n") - 1)
    except OSError:
        return 0


def wait_for(cond, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.01)


def state(run: Path) -> dict:
    """Everything a run folder holds that a resume must reproduce (log without its wall-clock column)."""
    out = {}
    for name in ("model", "ema", "train_state"):
        t, meta = ckpt.load_tensors(run / f"{name}.safetensors")
        out[name] = (t, meta)
    rows = list(csv.DictReader((run / "log.csv").open()))
    out["log"] = [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    return out


def assert_same(a: dict, b: dict) -> None:
    for name in ("model", "ema", "train_state"):
        (ta, ma), (tb, mb) = a[name], b[name]
        assert ta.keys() == tb.keys(), name
        diff = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not diff and ma == mb, f"{name}: {diff[:5]} differ"
    assert a["log"] == b["log"]


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    """A run never interrupted, trained by a real process (the state every resumed run must reach)."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    p = subprocess.run([sys.executable, "-m", "torchdiffusion", *train_cmd(out)], capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    return out, state(out)


# --- kill -9, SIGTERM, two trainers ------------------------------------------------------------------------------
def test_kill_9_at_random_moments_resumes_bit_identically(reference, tmp_path: Path) -> None:
    """Seven SIGKILLs in one run, at seeded random steps, inside checkpoint writes (complete and half-written temp
    files) and from outside after a random delay; after each the same command resumes. The end state equals the
    uninterrupted run's, and no temp file is left."""
    rng = random.Random(15)
    run, argv = tmp_path / "run", train_cmd(tmp_path / "run")
    events = [("step", rng.randint(1, 60)), ("write", rng.randint(1, 8)), ("partial", rng.randint(2, 8)),
              ("step", rng.randint(100, 180)), ("external", rng.uniform(0.05, 0.4)), ("write", rng.randint(2, 9)),
              ("partial", rng.randint(3, 9))]
    for mode, k in events:
        if mode == "external":  # kill -9 from outside, at whatever the trainer is doing then
            before, p = log_steps(run), start(argv)
            wait_for(lambda p=p, before=before: log_steps(run) > before + 5 or p.poll() is not None)
            time.sleep(k)
            p.send_signal(signal.SIGKILL)
            p.communicate()
            continue
        p = drive(mode, k, argv)
        assert p.returncode == -signal.SIGKILL, (mode, k, p.returncode, p.stderr[-500:])
    p = subprocess.run([sys.executable, "-m", "torchdiffusion", *argv], capture_output=True, text=True, env=_env(),
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert_same(state(run), reference[1])
    assert {p.name for p in run.iterdir()} == RUN_FILES  # no temp files left


def test_sigterm_saves_a_checkpoint_and_resumes_bit_identically(reference, tmp_path: Path) -> None:
    run = tmp_path / "run"
    p = start(train_cmd(run))
    wait_for(lambda: log_steps(run) >= 30 or p.poll() is not None)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err
    step = ckpt.load_tensors(run / "train_state.safetensors")[1]["step"]
    assert 30 <= step < STEPS and f"interrupted at step {step} (SIGTERM); checkpoint saved" in err
    assert int(list(csv.DictReader((run / "log.csv").open()))[-1]["step"]) == step  # nothing lost
    assert main(train_cmd(run)) == 0
    assert_same(state(run), reference[1])


def test_a_second_trainer_is_refused_while_the_first_finishes(reference, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    first = start(train_cmd(run))
    wait_for(lambda: log_steps(run) >= 5 or first.poll() is not None)
    assert first.poll() is None, "the first trainer ended before the second could try"
    msg = one_line_error(capsys, *train_cmd(run))
    assert f"{run} is in use by another trainer (pid {first.pid})" in msg
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert_same(state(run), reference[1])


# --- overwrites --------------------------------------------------------------------------------------------------
def test_a_folder_with_a_model_is_not_overwritten_without_force(reference, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    before = file_hashes(run)
    msg = one_line_error(capsys, "train", "moons", "--out", str(run), "--no-resume", "--quiet")
    assert "already holds a trained model" in msg and "--force" in msg
    msg = one_line_error(capsys, "train", "moons", "--out", str(run), "--quiet")
    assert "with a different data/model config" in msg and "--force" in msg
    (run / "train_state.safetensors").unlink()
    before.pop("train_state.safetensors")
    msg = one_line_error(capsys, *train_cmd(run))
    assert "no train_state.safetensors to resume" in msg
    assert file_hashes(run) == before  # byte-identical
    # --force: a fresh run with a fresh log
    assert main(["train", "moons", "--out", str(run), "--force", *SETS, "--set", "train.steps=4"]) == 0
    rows = list(csv.DictReader((run / "log.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert ckpt.load_json(run / "config.json")["data"]["name"] == "moons"


# --- the file system fails -------------------------------------------------------------------------------------
@contextlib.contextmanager
def small_disk(root: Path, kb: int = 256, read_only: bool = False):
    """A tmpfs of ``kb`` KiB mounted at ``root`` (read-only if asked); skips the test where mounting is not allowed
    (the patched-write variant below runs everywhere)."""
    root.mkdir(parents=True, exist_ok=True)
    opts = f"size={kb}k" + (",ro" if read_only else "")
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(root)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root or no mount); the patched-write test covers this")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], capture_output=True)


def fill(folder: Path) -> None:
    """Fill the file system of ``folder`` to the last byte."""
    for name, chunk in (("filler", 4096), ("filler2", 1)):
        with contextlib.suppress(OSError), open(folder / name, "wb", buffering=0) as f:
            while True:
                f.write(b"\0" * chunk)


def test_a_full_disk_keeps_the_old_outputs(reference, tmp_path: Path, capsys) -> None:
    run = reference[0]
    with small_disk(tmp_path / "disk") as disk:
        old = disk / "old.npz"
        assert main(["sample", str(run), "--n", "8", "--steps", "2", "--out", str(old), "--quiet"]) == 0
        old_json = disk / "old.json"
        old_json.write_text('{"kept": true}')
        kept = {p: p.read_bytes() for p in (old, old_json)}
        fill(disk)
        for argv in (["sample", str(run), "--n", "2000", "--steps", "2", "--out", str(old), "--quiet"],
                     ["sample", str(run), "--n", "8", "--steps", "2", "--out", str(disk / "new.png"), "--quiet"],
                     ["likelihood", str(run), "--n", "8", "--steps", "4", "--json", str(old_json)],
                     ["eval", str(run), "--n", "8", "--steps", "2", "--json", str(old_json), "--quiet"],
                     ["scorefield", str(run), "--out", str(disk / "f.png")],
                     train_cmd(disk / "run", 3)):
            msg = one_line_error(capsys, *argv)
            assert "No space left on device" in msg and str(disk) in msg, msg
        assert {p: p.read_bytes() for p in kept} == kept
        assert not [p for p in disk.rglob("*.tmp")]


def test_a_failed_write_keeps_the_old_file_everywhere(reference, tmp_path: Path, capsys, monkeypatch) -> None:
    """The same as a full disk where no tmpfs can be mounted: the write fails after the temp file was filled."""
    run, old = reference[0], tmp_path / "old.npz"
    assert main(["sample", str(run), "--n", "8", "--steps", "2", "--out", str(old), "--quiet"]) == 0
    kept = old.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files.os, "fsync", no_space)
    msg = one_line_error(capsys, "sample", str(run), "--n", "16", "--steps", "2", "--out", str(old), "--quiet")
    assert f"cannot write {old}: No space left on device" in msg
    assert old.read_bytes() == kept and [p.name for p in tmp_path.iterdir()] == ["old.npz"]


def test_read_only_folders_directories_and_files_in_the_way(reference, tmp_path: Path, capsys) -> None:
    run = reference[0]
    (tmp_path / "afile").write_text("x")
    for name in ("adir.png", "adir.json"):  # (an existing folder is sample's --out DIR/ of numbered PNGs)
        (tmp_path / name).mkdir()
    in_the_way = [("adir", "is a folder; give a file name"), ("afile/x", "afile is a file, not a folder")]
    for stem, why in in_the_way:
        out = tmp_path / stem
        for argv in (["likelihood", str(run), "--n", "4", "--json", f"{out}.json"],
                     ["eval", str(run), "--n", "4", "--json", f"{out}.json", "--quiet"],
                     ["scorefield", str(run), "--out", f"{out}.png"]):
            msg = one_line_error(capsys, *argv)
            assert why in msg and str(tmp_path) in msg, msg
    msg = one_line_error(capsys, "sample", str(run), "--steps", "2", "--out", str(tmp_path / "afile" / "x.png"),
                         "--quiet")
    assert "afile is a file, not a folder" in msg
    msg = one_line_error(capsys, "train", "ring", "--out", str(tmp_path / "afile" / "run"), "--quiet")
    assert "afile" in msg
    msg = one_line_error(capsys, "demo", "--quick", "--out", str(tmp_path / "afile"))
    assert "afile" in msg
    with small_disk(tmp_path / "ro", read_only=True) as ro:
        for argv in (["sample", str(run), "--steps", "2", "--out", str(ro / "s.png"), "--quiet"],
                     ["likelihood", str(run), "--n", "4", "--json", str(ro / "l.json")],
                     train_cmd(ro / "run", 3), ["demo", "--quick", "--out", str(ro / "demo")]):
            msg = one_line_error(capsys, *argv)
            assert "read-only" in msg.lower() and str(ro) in msg, msg


def test_stale_temp_files_of_dead_writers_are_removed(reference, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = run / f".model.safetensors.{pid}.0123abcd.tmp"
    stale.write_bytes(b"\0" * 1000)
    live = run / f".model.safetensors.{os.getppid()}.4567cdef.tmp"  # a live process's: kept
    live.write_bytes(b"\0")
    assert main(train_cmd(run, STEPS + 2)) == 0
    assert not stale.exists() and live.exists()
    sample_dir = tmp_path / "out"
    sample_dir.mkdir()
    (sample_dir / f".s.png.{pid}.89abcdef.tmp").write_bytes(b"\0")
    assert main(["sample", str(run), "--steps", "2", "--n", "4", "--out", str(sample_dir / "s.png"), "--quiet"]) == 0
    assert [p.name for p in sample_dir.iterdir()] == ["s.png"]


# --- damaged and non-finite inputs -------------------------------------------------------------------------------
def test_damaged_bytes_and_nan_weights_are_one_line_errors(reference, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    data = bytearray((run / "model.safetensors").read_bytes())
    data[-7] ^= 0xFF  # a weight's bytes, the header intact
    (run / "model.safetensors").write_bytes(bytes(data))
    msg = one_line_error(capsys, "sample", str(run), "--no-ema", "--steps", "2", "--quiet")
    assert "corrupt checkpoint" in msg and "checksum" in msg and "model.safetensors" in msg
    tensors, meta = ckpt.load_tensors(run / "ema.safetensors")
    first = sorted(tensors)[0]
    tensors[first].view(-1)[0] = float("nan")
    ckpt.save_tensors(tensors, run / "ema.safetensors", meta)  # a valid file (checksum and all) holding a NaN
    for argv in (["sample", str(run), "--steps", "2"], ["likelihood", str(run), "--n", "4"],
                 ["eval", str(run), "--n", "4", "--steps", "2"], ["scorefield", str(run)]):
        msg = one_line_error(capsys, *argv, "--quiet") if argv[0] in ("sample", "eval") else \
            one_line_error(capsys, *argv)
        assert "NaN/Inf" in msg and "ema.safetensors" in msg and repr(first) in msg, msg
    state_t, state_meta = ckpt.load_tensors(run / "train_state.safetensors")
    del state_t["rng.gen"]
    ckpt.save_tensors(state_t, run / "train_state.safetensors", state_meta)
    msg = one_line_error(capsys, *train_cmd(run, STEPS + 5))
    assert "lacks tensor 'rng.gen'" in msg and "train_state.safetensors" in msg


@pytest.mark.parametrize("argv, expected", [
    (["--guidance", "nan"], "--guidance must be a finite number, got nan"),
    (["--guidance", "inf"], "--guidance must be a finite number, got inf"),
    (["--classifier-scale", "nan"], "--classifier-scale must be a finite number"),
    (["--opt", "eta=nan"], "sampler option eta must be a number (not NaN), got nan"),
    (["--opt", "eta=abc"], "sampler option eta must be a number (not NaN), got 'abc'"),
    (["--opt", "eta=inf"], "the ddim sample has"),
    (["--opt", "eta=1", "--sampler", "ddpm"], "sampler 'ddpm' has no option 'eta'"),
    (["--n", "0"], "--n must be a whole number >= 1, got 0"),
    (["--gif", "x.gif"], "--gif needs image data"),
    (["--device", "cuda"], "device 'cuda' requested but this torch"),
])
def test_bad_sample_options_are_one_line_errors(reference, capsys, tmp_path: Path, argv, expected) -> None:
    if argv[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    msg = one_line_error(capsys, "sample", str(reference[0]), "--steps", "2", "--quiet", *argv,
                         "--out", str(tmp_path / "s.png"))
    assert expected in msg, msg
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("sets, expected", [
    ("train.steps=2.5", "train.steps must be a whole number >= 1, got 2.5"),
    ("process.T=2.5", "process.T must be a whole number >= 2, got 2.5"),
    ("model.hidden=0", "model.hidden must be a whole number >= 1, got 0"),
    ("model.depth=-1", "model.depth must be a whole number >= 1, got -1"),
    ("train.log_every=0", "train.log_every must be a whole number >= 1, got 0"),
    ("train.lr=NaN", "config key 'train.lr' must be a finite number, got nan"),
    ("process.beta_min=Infinity", "config key 'process.beta_min' must be a finite number"),
    ("train.device=cuda", "device 'cuda' requested but this torch"),
])
def test_bad_config_values_are_one_line_errors(capsys, tmp_path: Path, sets, expected) -> None:
    if "cuda" in sets and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    msg = one_line_error(capsys, "train", "ring", "--out", str(tmp_path / "r"), "--set", sets, "--quiet")
    assert expected in msg, msg
    assert not (tmp_path / "r").exists()  # nothing written by a refused start


def test_damaged_files_are_named(reference, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    (run / "log.csv").write_bytes(b"step,loss\n\xff\xfe\x00garbage\n")
    msg = one_line_error(capsys, *train_cmd(run, STEPS + 5))
    assert f"cannot read training log {run / 'log.csv'}: not UTF-8" in msg
    (run / "config.json").write_text("[1, 2]")
    msg = one_line_error(capsys, "sample", str(run), "--steps", "2", "--quiet")
    assert f"corrupt JSON in {run / 'config.json'}: it holds a list" in msg
    (run / "config.json").write_bytes(b'{"a": "\xff"}')
    msg = one_line_error(capsys, "sample", str(run), "--steps", "2", "--quiet")
    assert f"{run / 'config.json'}: not UTF-8" in msg
    cfg_list = tmp_path / "list.json"
    cfg_list.write_text("[1, 2]")
    msg = one_line_error(capsys, "train", str(cfg_list), "--out", str(tmp_path / "r2"), "--quiet")
    assert "it holds a list" in msg and "list.json" in msg
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(os.urandom(300))
    msg = one_line_error(capsys, "train", "ring", "--out", str(tmp_path / "r3"), "--set", f"data.name={garbage}",
                         "--quiet")
    assert f"cannot read {garbage}: not a .npz archive" in msg and "pickle" not in msg
    np.savez(tmp_path / "strings.npz", x=np.array([["a", "b"]]))
    msg = one_line_error(capsys, "train", "ring", "--out", str(tmp_path / "r4"), "--set",
                         f"data.name={tmp_path / 'strings.npz'}", "--quiet")
    assert "must hold numbers" in msg


def test_a_classifier_of_another_process_names_the_difference() -> None:
    model = Denoiser(lambda x, t, cond=None: torch.zeros_like(x), DDPM(T=1000))
    clf = Classifier(lambda x, t: torch.zeros(len(x), 3), DDPM(T=1000, betas="cosine"))
    with pytest.raises(ValueError, match=r"another process than the model's \(at t = 0 alpha, sigma = "
                                         r".* against .*other schedule"):
        ClassifierGuidance(model, clf, 1.0)
    clf = Classifier(lambda x, t: torch.zeros(len(x), 3), DDPM(T=500))
    with pytest.raises(ValueError, match="t_max 499 against 999"):
        ClassifierGuidance(model, clf, 1.0)


# --- issue 28: outputs never name a run's files; single-model folders ---------------------------------------------
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A tiny class-conditional digits U-Net (DDPM, v-prediction: exportable to diffusers), trained in-process."""
    out = tmp_path_factory.mktemp("faults_digits") / "digits"
    assert main(["train", "digits", "--out", str(out), "--set", "train.steps=2", "--set", "model.channels=8",
                 "--set", "train.batch=8", "--set", "model.num_res_blocks=1", "--set", "sample.steps=2",
                 "--quiet"]) == 0
    return out


def _copy_run(reference, tmp_path: Path, name: str = "run") -> tuple[Path, dict]:
    run = tmp_path / name
    shutil.copytree(reference[0], run)
    return run, file_hashes(run)


@pytest.mark.parametrize("target", sorted(files.RUN_FOLDER_FILES))
def test_no_output_may_name_a_file_of_a_run_folder(reference, tmp_path: Path, capsys, target) -> None:
    """Every writer of a user-named output (the CLI's --json, td.grids.save, the JSON and byte writers) refuses a
    run folder's own file with one line; the run stays byte-identical. The same name outside a run is written."""
    run, before = _copy_run(reference, tmp_path)
    path = run / "sub" / ".." / target  # relative parts do not get round the guard
    msg = one_line_error(capsys, "likelihood", str(run), "--n", "4", "--json", str(path))
    assert f"it is the {target} of the run folder {run}" in msg, msg
    for write in (lambda p: td.grids.save(p, torch.tensor([999.0, 0.0])), lambda p: files.write_json(p, {"a": 1}),
                  lambda p: files.write_bytes(p, b"x")):
        with pytest.raises(files.FileError, match=f"refusing to write .*{target}: it is the {target}"):
            write(run / target)
    assert file_hashes(run) == before
    elsewhere = tmp_path / "not_a_run" / target  # (a folder without weights, state or lock is not a run)
    td.grids.save(elsewhere, torch.tensor([999.0, 0.0]))
    assert td.grids.load(elsewhere).tolist() == [999.0, 0.0]


def test_eval_json_onto_the_log_is_refused(reference, tmp_path: Path, capsys) -> None:
    run, before = _copy_run(reference, tmp_path)
    msg = one_line_error(capsys, "eval", str(run), "--n", "4", "--steps", "2", "--quiet", "--json",
                         str(run / "log.csv"))
    assert "refusing to write" in msg and "log.csv of the run folder" in msg
    assert file_hashes(run) == before


def test_save_pretrained_with_force_replaces_a_run_whole(reference, tmp_path: Path, capsys) -> None:
    """save_pretrained(RUN, force=True) over a run leaves one complete model: config, model and EMA bound to it,
    no train_state (a later `train` cannot resume the old optimizer over these weights) and no old log."""
    run, before = _copy_run(reference, tmp_path)
    pipe = td.Pipeline.from_pretrained(run)
    with pytest.raises(files.FileError, match="already holds a model"):
        pipe.save_pretrained(run)
    assert file_hashes(run) == before
    x = pipe(n=4, steps=2, generator=torch.Generator().manual_seed(0))
    pipe.save_pretrained(run, force=True)
    assert {p.name for p in run.iterdir()} == {".lock", "config.json", "model.safetensors", "ema.safetensors"}
    meta = ckpt.load_tensors(run / "model.safetensors")[1]
    assert meta["config_sections"]["process"] == pipe.config["process"] and len(meta["config_sha256"]) == 64
    again = td.Pipeline.from_pretrained(run)(n=4, steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, again)
    after = file_hashes(run)
    msg = one_line_error(capsys, *train_cmd(run, STEPS + 5))
    assert "no train_state.safetensors to resume" in msg
    assert file_hashes(run) == after
    diffusers_like = tmp_path / "diffusers"
    diffusers_like.mkdir()
    (diffusers_like / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    with pytest.raises(files.FileError, match="holds a diffusers model"):
        pipe.save_pretrained(diffusers_like, force=True)
    assert [p.name for p in diffusers_like.iterdir()] == ["model_index.json"]
    busy = tmp_path / "busy"
    shutil.copytree(reference[0], busy)
    busy_before = file_hashes(busy)
    with files.FolderLock(busy, "trainer"), pytest.raises(files.FileError, match="in use"):  # a trainer holds it
        pipe.save_pretrained(busy, force=True)
    assert file_hashes(busy) == busy_before


def test_export_diffusers_never_writes_into_a_run_folder(reference, digits_run: Path, tmp_path: Path,
                                                         capsys) -> None:
    victim, before = _copy_run(reference, tmp_path, "victim")
    msg = one_line_error(capsys, "export-diffusers", str(digits_run), str(victim), "--force")
    assert "is a torchdiffusion run folder" in msg and "even with --force" in msg
    assert file_hashes(victim) == before
    # --force onto an old diffusers folder replaces its components whole: no stale weights beside the new ones
    out = tmp_path / "exported"
    (out / "unet").mkdir(parents=True)
    (out / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"stale weights of another model")
    (out / "notes.txt").write_text("kept")
    assert main(["export-diffusers", str(digits_run), str(out), "--force"]) == 0
    assert sorted(p.name for p in (out / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert (out / "notes.txt").read_text() == "kept"


# --- issue 28: config values checked for range; one table -----------------------------------------------------------
def _outside_and_inside(rng) -> tuple[list, object]:
    """Values just outside a Range (each side it has) and one inside it."""
    out = []
    if rng.lo is not None:
        out.append(rng.lo if rng.lo_open else (rng.lo - 1 if rng.whole else rng.lo - 1e-9))
    if rng.hi is not None:
        out.append(rng.hi if rng.hi_open else (rng.hi + 1 if rng.whole else rng.hi * (1 + 1e-9) + 1e-12))
    if rng.whole:
        out.append((rng.lo or 0) + 1.5)  # not a whole number
    out.append("abc" if rng.lo is None and rng.hi is None else None if rng.null is None else "abc")
    if rng.lo is None:
        inside = 0.5
    elif rng.whole:
        inside = int(rng.lo) + (1 if rng.lo_open else 0)
    else:
        inside = rng.lo if not rng.lo_open else (rng.lo + (min(1.0, (rng.hi - rng.lo) / 2) if rng.hi else 1.0))
    return out, inside


@pytest.mark.parametrize("key", sorted(config_mod.RANGES))
def test_every_numeric_config_key_is_range_checked(key) -> None:
    """Enumerates the range table: a value just outside is refused with one line naming the key and the range; a
    value inside is accepted; null only where the table says what it means."""
    rng = config_mod.RANGES[key]
    outside, inside = _outside_and_inside(rng)
    for v in outside:
        with pytest.raises(ValueError) as e:
            config_mod.resolve(None, [f"{key}={json.dumps(v) if not isinstance(v, str) else v}"])
        msg = str(e.value)
        assert key in msg and "\n" not in msg, msg
        if "finite number" not in msg and "expects" not in msg:  # (the kind check may speak first)
            assert f"{key} must be {rng.text()}, got" in msg, msg
    cfg = config_mod.resolve(None, [f"{key}={json.dumps(inside)}"])
    assert config_mod._get(cfg, key) == inside
    if rng.null is not None:
        assert config_mod._get(config_mod.resolve(None, [f"{key}=null"]), key) is None


def test_the_range_table_covers_every_numeric_key() -> None:
    numeric = {f"{s}.{k}" for s, sec in config_mod.DEFAULTS.items() for k, v in sec.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    keys = {f"{s}.{k}" for s, sec in config_mod.DEFAULTS.items() for k in sec}
    assert numeric <= set(config_mod.RANGES) <= keys
    for name in config_mod.PRESETS:  # every preset is inside the table
        config_mod.resolve(name)


@pytest.mark.parametrize("sets, expected", [
    ("train.clip=-1", "train.clip must be a number > 0 or null (no clipping), got -1"),
    ("loss.min_snr_gamma=0", "loss.min_snr_gamma must be a number > 0, got 0"),
    ("loss.min_snr_gamma=-1", "loss.min_snr_gamma must be a number > 0, got -1"),
    ("train.ema=1.5", "train.ema must be a number in [0, 1), got 1.5"),
    ("loss.p_uncond=1", "loss.p_uncond must be a number in [0, 1), got 1"),
    ("sample.steps=0", "sample.steps must be a whole number >= 1, got 0"),
    ("sample.sampler=bogus", "sample.sampler: unknown sampler 'bogus'; allowed: "),
    ("sample.grid=bogus", "sample.grid: unknown grid 'bogus'"),
    ("data.classes=0", "data.classes must be a whole number in [1, 100000] or null"),
    ("process.sigma_min=9", "process.sigma_min must be < process.sigma_max, got 9 and 5"),
])
def test_out_of_range_config_values_refuse_to_train(capsys, tmp_path: Path, sets, expected) -> None:
    extra = ["--set", "process.name=ve", "--set", "process.sigma_max=5"] if "sigma" in sets else []
    msg = one_line_error(capsys, "train", "ring", "--out", str(tmp_path / "r"), *extra, "--set", sets, "--quiet")
    assert expected in msg, msg
    assert not (tmp_path / "r").exists()


# --- issue 28: labels on load and at sampling --------------------------------------------------------------------
@pytest.mark.parametrize("labels, expected", [
    (np.array([0, 1, -1, 2]), "labels must lie in 0..2"),
    (np.array([0.0, 0.7, 1.0, 2.0]), "labels must be whole numbers, got 0.7 at index 1"),
    (np.array([0.0, np.nan, 1.0, 2.0]), "labels must be whole numbers, got nan at index 1"),
    (np.array([0, 1, 2, 10**6]), "labels up to 1000000 imply 1000001 classes for 4 examples"),
    (np.array([True, False, True, False]), "labels must be whole numbers, got an array of dtype bool"),
])
def test_npz_labels_are_checked_on_load(tmp_path: Path, labels, expected) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 2), np.float32), y=labels)
    with pytest.raises(ValueError, match=re.escape(expected)):
        datasets.load(str(path))


def test_declared_class_counts_bound_the_labels(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 2), np.float32), y=np.array([0.0, 1.0, 1.0, 0.0]))  # whole floats are labels
    assert datasets.load(str(path)).num_classes == 2
    assert datasets.load(str(path), classes=7).num_classes == 7  # a declared count may exceed the labels seen
    with pytest.raises(ValueError, match=r"labels must lie in 0..0 \(1 classes\)"):
        datasets.load(str(path), classes=1)
    with pytest.raises(ValueError, match="labels must lie in 0..4"):
        datasets.load("digits", classes=5)


@pytest.mark.parametrize("labels, expected", [
    (3.7, "class_labels must be whole numbers in 0..9, got 3.7"), (-1, "class labels must be in 0..9"),
    (float("nan"), "class_labels must be whole numbers"), (10**6, "got 1000000"), (True, "whole numbers"),
    ([1, 2.5], "whole numbers"), ("3", "whole numbers"),
])
def test_class_labels_at_sampling_are_checked_not_truncated(labels, expected) -> None:
    model = Denoiser(lambda x, t, cond=None: torch.zeros_like(x), DDPM(T=10))
    pipe = td.Pipeline(model, {"run": {"data_shape": [2], "num_classes": 10}, "sample": {}})
    with pytest.raises(ValueError, match=re.escape(expected)):
        pipe(n=2, class_labels=labels, steps=2)
    assert pipe.labels([3, 9], 2).tolist() == [3, 9] and pipe.labels(np.int64(4), 2).tolist() == [4, 4]


# --- issue 28: a run's config is bound to its weights ----------------------------------------------------------------
def test_a_changed_process_or_model_section_is_refused_by_name(reference, tmp_path: Path, capsys) -> None:
    run, _ = _copy_run(reference, tmp_path)
    cfg = ckpt.load_json(run / "config.json")
    edited = {**cfg, "process": {**cfg["process"], "betas": "cosine"}}
    (run / "config.json").write_text(json.dumps(edited))
    before = file_hashes(run)
    msg = one_line_error(capsys, "sample", str(run), "--steps", "2", "--quiet", "--out", str(tmp_path / "s.npz"))
    assert ("config.json does not match its weights ema.safetensors: process.betas is 'cosine' there, but the weights "
            "were trained with 'linear'") in msg
    with pytest.raises(ValueError, match="model.safetensors: process.betas"):
        load_run(run, ema=False)
    assert file_hashes(run) == before and not (tmp_path / "s.npz").exists()
    (run / "config.json").write_text(json.dumps({**cfg, "sample": {**cfg["sample"], "steps": 7}}))
    assert load_run(run)[1]["sample"]["steps"] == 7  # the sample section is not bound: defaults may change


# --- issue 28: folder outputs record their settings ---------------------------------------------------------------
def test_a_sample_folder_refuses_other_settings_and_redraws_broken_pngs(digits_run: Path, tmp_path: Path,
                                                                       capsys) -> None:
    out = tmp_path / "samples"
    base = ["sample", str(digits_run), "--n", "4", "--quiet", "--out", f"{out}/"]
    assert main([*base, "--class", "3"]) == 0
    first = file_hashes(out)
    assert set(first) == {f"{i:06d}.png" for i in range(4)} | {"sample_settings.json"}
    for other, key in ((["--class", "4"], "class: '3' there, '4' now"), (["--class", "3", "--seed", "1"], "seed: 0"),
                       (["--class", "3", "--steps", "3"], "steps: 2 there, 3 now")):
        msg = one_line_error(capsys, *base, *other)
        assert f"holds samples of other settings ({key}" in msg and "--force" in msg, msg
        assert file_hashes(out) == first  # nothing mixed, nothing lost
    (out / "000001.png").write_bytes(b"")  # a zero-byte PNG and a truncated one are not done
    (out / "000002.png").write_bytes((out / "000003.png").read_bytes()[:-20])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / f".000005.png.{int(dead.stdout)}.0123abcd.tmp").write_bytes(b"\0")  # a dead writer's temp file
    assert main([*base, "--class", "3", "--n", "6"]) == 0  # a larger --n adds samples (same settings)
    after = file_hashes(out)
    assert {k: after[k] for k in first if k != "sample_settings.json"} == \
        {k: v for k, v in first.items() if k != "sample_settings.json"}  # redrawn byte-identical
    assert set(after) == {f"{i:06d}.png" for i in range(6)} | {"sample_settings.json"}
    assert main([*base, "--class", "4", "--force"]) == 0  # --force: the old set goes, the new one is whole
    assert set(file_hashes(out)) == set(first)
    assert ckpt.load_json(out / "sample_settings.json")["class"] == "4"
    user = tmp_path / "mine"  # numbered PNGs that this command did not write are not overwritten
    user.mkdir()
    (user / "000000.png").write_bytes(b"the user's own picture")
    msg = one_line_error(capsys, "sample", str(digits_run), "--n", "2", "--quiet", "--out", f"{user}/")
    assert "no sample_settings.json" in msg
    assert (user / "000000.png").read_bytes() == b"the user's own picture"


# --- issue 28: wrong combinations are one line ---------------------------------------------------------------------
def test_a_grid_file_must_start_at_t_max(reference, tmp_path: Path, capsys) -> None:
    grid = tmp_path / "g.json"
    td.grids.save(grid, torch.tensor([500.0, 250.0, -1.0]))
    msg = one_line_error(capsys, "sample", str(reference[0]), "--grid", str(grid), "--quiet", "--out",
                         str(tmp_path / "s.npz"))
    assert "the grid starts at t = 500, but samples start from the prior at t_max = 999" in msg
    assert not (tmp_path / "s.npz").exists()
    td.grids.save(grid, torch.tensor([999.0, 250.0, -1.0]))  # from t_max to t_zero: sampled
    assert main(["sample", str(reference[0]), "--grid", str(grid), "--quiet", "--out", str(tmp_path / "s.npz")]) == 0


def test_anagram_on_a_latent_run_is_refused() -> None:
    from torchdiffusion.cli.sample import guided_model

    a = argparse.Namespace(class2=1, anagram="rot180", classifier_scale=None, classifier=None, null_class=False,
                           guidance=None, klass="0", n=2, device="cpu", labels=None, prompt=None,
                           negative_prompt=None, unconditional=False, run=None)
    with pytest.raises(ValueError, match="--anagram needs a pixel-space run: on a latent run"):
        guided_model(a, None, {"latent": {"image_shape": [1, 16, 16]}, "num_classes": 10, "data_shape": [4, 4, 4]})


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults_ae") / "ae"
    assert main(["train", "ae_digits", "--out", str(out), "--set", "train.steps=1", "--set", "model.channels=8",
                 "--set", "train.batch=8", "--set", "data.size=8", "--set", "model.channel_mult=[1]", "--quiet"]) == 0
    return out


@pytest.mark.parametrize("opt", [["--class", "3"], ["--guidance", "1"], ["--sampler", "ddim"], ["--steps", "5"],
                                 ["--opt", "eta=1"]])
def test_an_autoencoder_run_refuses_diffusion_options(ae_run: Path, tmp_path: Path, capsys, opt) -> None:
    before = file_hashes(ae_run)
    msg = one_line_error(capsys, "sample", str(ae_run), *opt, "--out", str(tmp_path / "s.png"))
    assert f"is an autoencoder run (prior samples and reconstructions): {opt[0]} apply" in msg
    assert file_hashes(ae_run) == before and not list(tmp_path.glob("s*"))


def test_scorefield_refuses_a_sigma_the_process_does_not_have(reference, tmp_path: Path, capsys) -> None:
    msg = one_line_error(capsys, "scorefield", str(reference[0]), "--sigma", "1e300", "--out", str(tmp_path / "f.png"))
    assert "--sigma must lie in [" in msg and "got 1e+300" in msg and not (tmp_path / "f.png").exists()


@pytest.mark.parametrize("cfg, expected", [
    ({"_class_name": "DDPMScheduler", "num_train_timesteps": 2.7}, "num_train_timesteps must be a whole number >= 2"),
    ({"_class_name": "ScoreSdeVpScheduler", "beta_min": -1.0, "beta_max": 20.0}, "beta_min must be a number >= 0"),
    ({"_class_name": "ScoreSdeVpScheduler", "beta_min": 0.1, "beta_max": -20.0}, "beta_max must be a number > 0"),
    ({"_class_name": "DDPMScheduler", "beta_start": 0.0}, "beta_start must be a number in (0, 1)"),
    ({"_class_name": "DDPMScheduler", "trained_betas": [0.1, -0.1], "num_train_timesteps": 2}, "trained_betas"),
    ({"_class_name": "ScoreSdeVeScheduler", "sigma_max": float("nan")}, "sigma_max must be a number > 0"),
])
def test_bad_diffusers_scheduler_configs_are_one_line(cfg, expected) -> None:
    with pytest.raises(ValueError, match=re.escape(expected)):
        process_from_diffusers(cfg)
    assert process_from_diffusers({"_class_name": "DDPMScheduler", "num_train_timesteps": 1000.0}).T == 1000
    with pytest.raises(ValueError, match="beta_min >= 0"):
        VP(beta_min=-1.0)


# --- issue 28: tracebacks, hangs and wrong causes ----------------------------------------------------------------
def test_ode_tolerances_outside_the_precision_are_one_line() -> None:
    model = Denoiser(lambda x, t, cond=None: torch.zeros_like(x), DDPM(T=100))
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    for kw in ({"rtol": 1e-300, "atol": 1e-300}, {"rtol": 1e-5, "atol": 0.0}, {"rtol": 2.0}):
        with pytest.raises(ValueError, match=r"ode sampler: \w+ must be a number in \[9.5e-07, 1\] for float32"):
            td.sample(model, x_T, "ode", **kw)
    assert torch.isfinite(td.sample(model, x_T.double(), "ode", rtol=1e-8, atol=1e-8)).all()  # float64: finer allowed


def test_a_leftover_world_size_does_not_hang(monkeypatch) -> None:
    import socket

    from torchdiffusion.training import distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in (("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)),
                 ("TORCHDIFFUSION_RENDEZVOUS_S", "1")):
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    t0 = time.time()
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but only 1 of 2 processes joined .* within 1 s; a WORLD_SIZE "
                                         "left over"):
        distributed.init_from_env("cpu")
    assert time.time() - t0 < 30


def test_ctrl_c_prints_interrupted_and_exits_130(capsys, monkeypatch) -> None:
    from torchdiffusion.cli.commands import COMMANDS

    def interrupted(a):
        raise KeyboardInterrupt
    help_, add, _ = COMMANDS["config"]
    monkeypatch.setitem(COMMANDS, "config", (help_, add, interrupted))
    assert main(["config", "ring"]) == 130
    assert capsys.readouterr().err.strip() == "torchdiffusion: interrupted"


def test_wrong_cause_messages_name_the_right_cause(tmp_path: Path, capsys) -> None:
    np.savez(tmp_path / "empty.npz", x=np.zeros((10, 0), np.float32))
    msg = one_line_error(capsys, "train", "ring", "--out", str(tmp_path / "r"), "--set",
                         f"data.name={tmp_path / 'empty.npz'}", "--quiet")
    assert "its examples hold no values (shape (10, 0))" in msg and "diverged" not in msg
    model = Denoiser(lambda x, t, cond=None: torch.zeros_like(x), DDPM(T=1000))
    with pytest.raises(TypeError, match="x_T must be a floating-point tensor .* got dtype torch.int64"):
        td.sample(model, torch.zeros(2, 2, dtype=torch.long), "ddim", 2)
    with pytest.raises(ValueError, match=r"outside the process range \[-1, 999\] \(got min 999.5, max 999.5\)"):
        DDPM(T=1000).check_time(999.5)
    assert float(DDPM(T=1000).check_time(torch.tensor(999.0001, dtype=torch.float32))) == 999.0  # round-off
