"""Run folders never lose work (docs/design.md section 6, issue 15).

Real processes are killed (SIGKILL at seeded random steps, inside checkpoint writes, and from outside after a
seeded random delay), terminated (SIGTERM) and raced (two trainers); every resumed run must end bit-identical
(weights, EMA, optimizer and RNG state, log) to one that was never interrupted, with no temp file left. Then the
file system fails (a full tmpfs, a read-only mount, a folder or a file in the way) and the outputs must be
refused or kept; damaged and non-finite inputs must be one-line errors. ``benchmarks/faults.py`` runs the same
kinds of probe as a table.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import one_line_error
from torchdiffusion import _files as files
from torchdiffusion.cli.main import main
from torchdiffusion.parameterization.denoiser import Denoiser
from torchdiffusion.parameterization.guidance import Classifier, ClassifierGuidance
from torchdiffusion.processes import DDPM
from torchdiffusion.training import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

STEPS = 300
SETS = ["--set", "model.hidden=32", "--set", "model.depth=2", "--set", "train.batch=64", "--set", "data.n=2000",
        "--set", "train.log_every=1", "--set", "train.ckpt_every=25", "--set", "train.device=cpu",
        "--set", "train.schedule=constant", "--quiet"]
RUN_FILES = {".lock", "config.json", "log.csv", "model.safetensors", "ema.safetensors", "train_state.safetensors"}

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
