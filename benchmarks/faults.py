"""Fault probes: try to lose work or get a silently wrong answer, as a new user (or a cluster scheduler) would.

Run (about 4 minutes on 2 CPU cores, as root for the tmpfs probes):  .venv/bin/python benchmarks/faults.py

Every probe runs the real command line (``python -m torchdiffusion ...``) in a fresh process against tiny runs
trained first (a 2-D ring run, a class-conditional digits run, a noise-conditional classifier trained on another
process). A probe expects either an error or a correct result. Every probe runs in an empty working folder with
an empty TMPDIR of its own, and afterwards every file and folder it touches (the paths it names, plus ``protect``,
``changes`` and ``may_write``) is checked on disk (issue 33 item 6):

- inputs (paths that existed before, and ``protect``): byte-identical, with the same file sets (SHA-256 of every
  file under a folder), unless listed in ``changes``: then the probe's ``check`` verifies the stated change;
- outputs (named paths that did not exist): absent after a refused command (``may_write`` only if complete); after
  a command that must work, verified by ``check`` (complete and correct, e.g. 64 finite 2-D samples);
- no temp files in the folders it names, and nothing left in its working folder or its TMPDIR.

Each outcome is classified:

- clean error: non-zero exit, exactly one stderr line ``torchdiffusion: error: ...`` (progress bars aside) that
  contains what the probe expects it to name (the file, the option, the cause);
- correct result: exit 0, ``check`` passes and the output says what ``names`` expects (e.g. which grid it used);
- unclear error: a clean one-line error that does not say what the probe expects;
- traceback: a Python traceback reached the user;
- silent wrong result: exit 0 where an error was due, or a result that fails its check (e.g. NaN);
- data loss: a protected file changed, a refused command left an output, or a temp file was left behind (checked
  first: a traceback that also lost data counts as data loss).

The results table says per probe what was checked on disk, and counts the probes that touch files and check every
one of them afterwards (a probe that names an output of a command that must work, or a changed input, without a
``check`` is not counted).

Then the signal events: kill -9 at seeded random moments (steps, inside checkpoint writes, half-written temp files,
from outside after a random delay), SIGTERM, and a second trainer on a busy folder, each resumed and compared with
an uninterrupted run (weights, EMA, optimizer and RNG state, log). Full-disk and read-only probes mount small
tmpfs file systems; where mounting is not allowed they are reported as skipped.

Results go to benchmarks/results/faults.md (written entirely by this script).
"""

from __future__ import annotations

import concurrent.futures
import datetime
import email.utils
import hashlib
import http.client
import importlib.util
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import _report  # noqa: E402  (benchmarks/ is on the path: python benchmarks/faults.py)
import test_faults as tf  # noqa: E402  (the kill driver and the run-state comparison of the tests)
from torchdiffusion.runs.sample_folder import complete_png  # noqa: E402
from torchdiffusion.training import checkpoint as ckpt  # noqa: E402

PROGRESS = re.compile(r"\d+%\|")
RESULTS = ROOT / "benchmarks" / "results" / "faults.md"


@dataclass
class Probe:
    group: str
    name: str
    argv: list[str]
    expect: str = "error"  # "error" (with ``names`` in the message) or "ok" (with ``check``)
    names: tuple[str, ...] = ()
    protect: tuple[Path, ...] = ()  # further files / folders that must come through byte-identical
    check: object = None  # ok probes: a callable returning True when the result (and its files) are right
    says: str = ""  # ok probes: what ``check`` verifies, in words (shown in the results table)
    python: str | None = None  # run this Python snippet instead of the CLI
    changes: tuple[Path, ...] = ()  # inputs the probe may change: ``check`` states and verifies the correct change
    may_write: tuple[Path, ...] = ()  # outputs a failing command may leave, if complete (a PNG written before a GIF)
    env: dict = field(default_factory=dict)  # extra environment variables
    timeout: float = 600.0  # beyond it the probe is a hang
    outcome: str = ""
    detail: str = ""
    checked: str = ""  # what was checked on disk afterwards
    touches: bool = False  # it names a file or folder: reads a run, writes an output, trains, fits, exports ...
    covered: bool = False  # every file and folder it touches was checked afterwards
    hashes: dict = field(default_factory=dict)


def cli(*argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torchdiffusion", *argv], capture_output=True, text=True,
                          env=tf._env(), timeout=timeout)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "absent"


def tree_hashes(paths) -> dict:
    """SHA-256 of every file under ``paths`` (a folder's file set included: a new file is a change too)."""
    out = {}
    for p in paths:
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for q in files:
            out[str(q)] = sha(q)
    return out


def argv_paths(argv: list[str]) -> list[Path]:
    """The paths a probe names: arguments with a ``/`` (and the values of ``key=/path`` settings)."""
    out = []
    for a in argv:
        v = a.split("=", 1)[1] if "=" in a and not a.startswith("/") else a
        if "/" in v:
            out.append(Path(v.rstrip("/")))
    return out


def leftovers(folder: Path) -> list[str]:
    """Everything under ``folder`` (files and folders): what a probe left in its working folder or TMPDIR. One
    exception: the empty ``torchinductor_USER`` folder that torch creates in TMPDIR when diffusers is imported (its
    shared per-user compile cache, made once and reused, not a leftover of the probe)."""
    return sorted(str(q.relative_to(folder)) for q in folder.rglob("*")
                  if not (q.parent == folder and q.name.startswith("torchinductor_") and q.is_dir()
                          and not any(q.iterdir())))


def run_probe(p: Probe) -> Probe:
    """Run one probe in an empty working folder with its own empty TMPDIR, and classify it; afterwards every file or
    folder it touches is checked (issue 33 item 6): the inputs (existing paths, plus ``protect``) byte-identical
    with the same file sets, unless listed in ``changes`` (then ``check`` verifies the stated change); the outputs
    it names absent after an error, verified by ``check`` after a success; no temp files in the folders it names;
    nothing left in its working folder or TMPDIR."""
    named = argv_paths(p.argv)
    inputs = [q for q in named if q.exists()] + [q for q in p.protect if q not in named]
    outputs = [q for q in named if not q.exists()]
    guarded = [q for q in inputs if not any(q == c or c in q.parents for c in p.changes)]
    changed = [q for q in inputs if q not in guarded]
    p.touches = bool(named or p.protect or p.changes or p.may_write)
    gaps = (["a changed input without a check"] if changed and (p.expect != "ok" or p.check is None) else []) + \
        (["an output without a check"] if outputs and p.expect == "ok" and p.check is None else [])
    p.covered = p.touches and not gaps
    p.hashes = tree_hashes(guarded)
    box = Path(tempfile.mkdtemp(prefix="td_probe_"))
    cwd, tmp = box / "cwd", box / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    env = {**tf._env(), "TMPDIR": str(tmp), **p.env}
    cmd = [sys.executable, "-c", p.python, *p.argv] if p.python is not None else \
        [sys.executable, "-m", "torchdiffusion", *p.argv]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=p.timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        shutil.rmtree(box, ignore_errors=True)
        p.outcome, p.detail, p.checked = "hang", f"no answer within {p.timeout:.0f} s", "hung: files not checked"
        p.covered = False
        return p
    err_lines = [x for x in r.stderr.strip().splitlines() if x.strip() and not PROGRESS.search(x)]
    line = err_lines[-1] if err_lines else ""
    after = tree_hashes(guarded)
    lost = [k for k, v in after.items() if p.hashes.get(k) != v] + [k for k in p.hashes if k not in after]
    stray = [str(q) for q in outputs if q.exists() and q not in p.may_write  # (an empty folder holds nothing)
             and (q.is_file() or any(x.is_file() for x in q.rglob("*")))] if p.expect == "error" else []
    stray += [str(q) for q in p.may_write if q.exists() and not (q.suffix != ".png" or complete_png(q))]
    stray += ["working folder: " + x for x in leftovers(cwd)]
    temps = [str(q) for d in {q if q.is_dir() else q.parent for q in named} if d.is_dir()
             for q in d.iterdir() if tf.files.TEMP_RE.match(q.name)] + ["TMPDIR: " + x for x in leftovers(tmp)]
    shutil.rmtree(box, ignore_errors=True)
    folders = {q if q.is_dir() else q.parent for q in named}
    named_stray = [x for x in stray if not x.startswith("working folder: ")]
    parts = [f"{len(after)} files in {len(guarded)} inputs " + (f"{len(lost)} CHANGED" if lost else "byte-identical")
             if guarded else "",
             f"{', '.join(q.name for q in changed)} changed as stated" if changed else "",
             (f"{len(outputs)} named outputs " + ("LEFT" if named_stray else "absent")
              + (" (or complete)" if p.may_write else "")) if outputs and p.expect == "error" else "",
             f"{len(outputs)} outputs checked" if outputs and p.expect == "ok" else "",
             f"({p.says})" if p.says and (changed or outputs) else "",
             (f"{'TEMP FILES' if any(not x.startswith('TMPDIR') for x in temps) else 'no temp files'} in "
              f"{len(folders)} folders") if folders else "",
             "" if p.touches else "touches no file (refused before reading one)",
             "working folder and TMPDIR " + ("NOT empty" if len(stray) > len(named_stray) or any(
                 x.startswith("TMPDIR") for x in temps) else "empty"), "UNCHECKED: " + ", ".join(gaps) if gaps else ""]
    p.checked = "; ".join(x for x in parts if x).replace("; (", " (")
    if lost or temps or stray:
        p.outcome = "data loss"
        p.detail = (("traceback, and " if "Traceback" in r.stderr else "")
                    + f"changed: {lost[:3]} temp files: {temps[:3]} stray outputs: {stray[:3]}")
    elif "Traceback" in r.stderr:
        p.outcome, p.detail = "traceback", line
    elif p.expect == "error":
        if r.returncode == 0:
            p.outcome, p.detail = "silent wrong result", "exit 0: " + (r.stdout.strip().splitlines() or [""])[-1]
        elif len(err_lines) == 1 and line.startswith("torchdiffusion: error: ") and all(n in line for n in p.names):
            p.outcome, p.detail = "clean error", line
        else:
            p.outcome, p.detail = "unclear error", line or r.stderr[-200:]
    else:
        why = ""
        if r.returncode != 0:
            why = line or f"exit {r.returncode}"
        elif not all(n in r.stdout + r.stderr for n in p.names):
            why = "the output does not say " + repr([n for n in p.names if n not in r.stdout + r.stderr])
        elif p.check is not None:
            try:
                why = "" if p.check() else "check failed: " + (p.says or "the result")
            except Exception as e:  # a missing or unreadable output fails the check, it does not stop the run
                why = f"check failed: {type(e).__name__}: {e}"
        p.outcome = "silent wrong result" if why else "correct result"
        p.detail = why or (r.stdout.strip().splitlines() or [""])[-1]
    return p


def mount_tmpfs(path: Path, kb: int, read_only: bool = False) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={kb}k" + (",ro" if read_only else "")
    return shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


def damage(run: Path, work: Path) -> dict[str, Path]:
    """Copies of the ring run with one fault each."""
    out = {}
    bad = work / "damaged_bytes"
    shutil.copytree(run, bad)
    data = bytearray((bad / "ema.safetensors").read_bytes())
    data[-9] ^= 0xFF
    (bad / "ema.safetensors").write_bytes(bytes(data))
    out["bytes"] = bad
    nan = work / "nan_weight"
    shutil.copytree(run, nan)
    t, meta = ckpt.load_tensors(nan / "ema.safetensors")
    t[sorted(t)[0]].view(-1)[0] = float("nan")
    ckpt.save_tensors(t, nan / "ema.safetensors", meta)
    out["nan"] = nan
    for name, content in (("list_config", b"[1, 2]"), ("undecodable_config", b'{"a": "\xff\xfe"}')):
        d = work / name
        shutil.copytree(run, d)
        (d / "config.json").write_bytes(content)
        out[name] = d
    log = work / "undecodable_log"
    shutil.copytree(run, log)
    (log / "log.csv").write_bytes(b"step,loss\n\xff\xfe\n")
    out["log"] = log
    norng = work / "missing_key"
    shutil.copytree(run, norng)
    t, meta = ckpt.load_tensors(norng / "train_state.safetensors")
    del t["rng.gen"]
    ckpt.save_tensors(t, norng / "train_state.safetensors", meta)
    out["key"] = norng
    nostate = work / "no_train_state"
    shutil.copytree(run, nostate)
    (nostate / "train_state.safetensors").unlink()
    out["nostate"] = nostate
    return out


def probes(work: Path, ring: Path, digits: Path, clf: Path, disk: Path | None, ro: Path | None,
           runs: dict) -> list[Probe]:
    d = damage(ring, work)
    afile = work / "afile"
    afile.write_text("x")
    for name in ("adir.json", "adir.png", "adir.gif"):
        (work / name).mkdir()
    run_files = tuple(ring / n for n in ("config.json", "model.safetensors", "ema.safetensors",
                                         "train_state.safetensors", "log.csv"))
    garbage = work / "garbage.npz"
    garbage.write_bytes(random.Random(0).randbytes(300))
    tiny = tf.SETS + ["--set", "train.steps=3"]
    s2 = ["--steps", "2", "--quiet"]
    P = []
    # --- data loss -------------------------------------------------------------------------------------------
    P += [Probe("data loss", "train moons into the ring run --no-resume", ["train", "moons", "--out", str(ring),
                "--no-resume", *tiny], names=("already holds a trained model", "--force"), protect=run_files),
          Probe("data loss", "train moons into the ring run (resume)", ["train", "moons", "--out", str(ring), *tiny],
                names=("different", "--force"), protect=run_files),
          Probe("data loss", "train into a folder whose train_state was deleted",
                ["train", "ring", "--out", str(d["nostate"]), *tiny], names=("no train_state", "--force"),
                protect=(d["nostate"],)),
          Probe("data loss", "Pipeline.save_pretrained over a run", [str(ring)], names=("already holds a model",),
                protect=run_files, python="import sys, torchdiffusion as td\n"
                "from torchdiffusion.cli.main import main\n"
                "try:\n    td.Pipeline.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[1])\n"
                "except ValueError as e:\n    print(f'torchdiffusion: error: {e}', file=sys.stderr); sys.exit(2)")]
    if disk is not None:  # every full-disk probe: the whole disk (the filler, old.npz, old.json) byte-identical
        old = disk / "old.npz"
        P += [Probe("data loss", "sample --out old.npz on a full disk", ["sample", str(ring), "--n", "2000", *s2,
                    "--out", str(old)], names=("No space left on device", str(old)), protect=(disk,)),
              Probe("data loss", "likelihood --json old.json on a full disk", ["likelihood", str(ring), "--n", "8",
                    "--steps", "4", "--json", str(disk / "old.json")], names=("No space left", "old.json"),
                    protect=(disk,)),
              Probe("tracebacks", "train on a full disk", ["train", "ring", "--out", str(disk / "run"), *tiny],
                    names=("No space left", str(disk)), protect=(disk,)),
              Probe("tracebacks", "sample PNG on a full disk", ["sample", str(ring), *s2, "--out",
                    str(disk / "s.png")], names=("No space left", "s.png"), protect=(disk,)),
              Probe("tracebacks", "sample --gif on a full disk", ["sample", str(digits), "--class", "1", "--n", "4",
                    *s2, "--out", str(work / "g.png"), "--gif", str(disk / "g.gif")], names=("No space left", "g.gif"),
                    may_write=(work / "g.png",), protect=(disk,)),  # the PNG, written before the GIF, is complete
              Probe("tracebacks", "demo on a full disk", ["demo", "--quick", "--out", str(disk / "demo")],
                    names=("No space left", str(disk)), protect=(disk,))]
    # --- silent wrong results --------------------------------------------------------------------------------
    P += [Probe("silent wrong", "damaged tensor bytes (header intact)", ["sample", str(d["bytes"]), *s2],
                names=("corrupt checkpoint", "checksum", "ema.safetensors"))]
    for cmd in (["sample", str(d["nan"]), *s2], ["likelihood", str(d["nan"]), "--n", "8"],
                ["eval", str(d["nan"]), "--n", "8", *s2], ["scorefield", str(d["nan"])]):
        P.append(Probe("silent wrong", f"one NaN weight: {cmd[0]}", cmd, names=("NaN/Inf", "ema.safetensors")))
    for opt, val in (("--guidance", "nan"), ("--guidance", "inf"), ("--classifier-scale", "nan")):
        extra = ["--classifier", str(clf)] if opt == "--classifier-scale" else []
        P.append(Probe("silent wrong", f"sample {opt} {val}", ["sample", str(digits), "--class", "3", opt, val, *extra,
                       *s2, "--out", str(work / "nan.png")], names=(opt, "finite")))
    P += [Probe("silent wrong", "sample --opt eta=nan", ["sample", str(ring), *s2, "--opt", "eta=nan"],
                names=("eta", "not NaN")),
          Probe("silent wrong", "eval --n 0", ["eval", str(ring), "--n", "0"], names=("--n",)),
          Probe("silent wrong", "--gif on 2-D data", ["sample", str(ring), *s2, "--gif", str(work / "r.gif")],
                names=("--gif", "image data"))]
    for kv in ("train.steps=2.5", "process.T=2.5", "model.hidden=0", "model.depth=-1", "train.lr=NaN"):
        P.append(Probe("silent wrong", f"--set {kv}", ["train", "ring", "--out", str(work / "cfg"), "--set", kv,
                       "--quiet"], names=(kv.split("=")[0],)))
    P.append(Probe("silent wrong", "sample a healthy run (control)", ["sample", str(ring), *s2, "--out",
                   str(work / "ok.npz")], expect="ok", check=lambda: finite_samples(work / "ok.npz", (64, 2)),
                   says="ok.npz: 64 finite 2-D samples"))
    # --- tracebacks ------------------------------------------------------------------------------------------
    P += [Probe("tracebacks", "likelihood --json to a folder", ["likelihood", str(ring), "--n", "4", "--json",
                str(work / "adir.json")], names=("is a folder", "adir.json")),
          Probe("tracebacks", "eval --json to a folder", ["eval", str(ring), "--n", "4", *s2, "--json",
                str(work / "adir.json")], names=("is a folder",)),
          Probe("tracebacks", "scorefield --out to a folder", ["scorefield", str(ring), "--out",
                str(work / "adir.png")], names=("is a folder",)),
          Probe("tracebacks", "--gif to a folder", ["sample", str(digits), "--class", "1", "--n", "4", *s2, "--out",
                str(work / "g2.png"), "--gif", str(work / "adir.gif")], names=("is a folder",))]
    def outputs_in(folder: Path, png: str) -> list[list[str]]:
        """sample, train, likelihood --json, --gif and demo, each writing into ``folder``."""
        return [["sample", str(ring), *s2, "--out", str(folder / "x.png")],
                ["train", "ring", "--out", str(folder / "run"), *tiny],
                ["likelihood", str(ring), "--n", "4", "--json", str(folder / "x.json")],
                ["sample", str(digits), "--class", "1", "--n", "4", *s2, "--out", str(work / png), "--gif",
                 str(folder / "x.gif")],
                ["demo", "--quick", "--out", str(folder / "demo")]]

    for cmd in outputs_in(afile, "g3.png"):  # the file in the way stays as it was
        P.append(Probe("tracebacks", f"{cmd[0]} output under a file", cmd, names=("afile",), protect=(afile,)))
    if ro is not None:
        for cmd in outputs_in(ro, "g4.png"):
            P.append(Probe("tracebacks", f"{cmd[0]} output on a read-only file system", cmd, names=("ead-only",)))
    P += [Probe("tracebacks", "train.log_every=0", ["train", "ring", "--out", str(work / "le"), "--set",
                "train.log_every=0"], names=("train.log_every",))]
    if not torch.cuda.is_available():
        P += [Probe("tracebacks", "train.device=cuda on a CPU build", ["train", "ring", "--out", str(work / "dc"),
                    "--set", "train.device=cuda"], names=("cuda", "CPU-only")),
              Probe("tracebacks", "sample --device cuda on a CPU build", ["sample", str(ring), *s2, "--device",
                    "cuda"], names=("cuda", "CPU-only"))]
    P += [Probe("tracebacks", "config.json holding [1,2]: sample", ["sample", str(d["list_config"]), *s2],
                names=("config.json", "list")),
          Probe("tracebacks", "a config file holding [1,2]: train", ["train", str(d["list_config"] / "config.json"),
                "--out", str(work / "lc")], names=("config.json", "list"))]
    # --- unclear errors --------------------------------------------------------------------------------------
    P += [Probe("unclear", "undecodable config.json", ["sample", str(d["undecodable_config"]), *s2],
                names=("config.json", "UTF-8")),
          Probe("unclear", "undecodable log.csv on resume", ["train", "ring", "--out", str(d["log"]), *tf.SETS,
                "--set", "train.steps=305"], names=("log.csv", "UTF-8")),
          Probe("unclear", "train_state without rng.gen", ["train", "ring", "--out", str(d["key"]), *tf.SETS,
                "--set", "train.steps=305"], names=("rng.gen", "train_state.safetensors")),
          Probe("unclear", "--opt eta=abc", ["sample", str(ring), *s2, "--opt", "eta=abc"], names=("eta", "'abc'")),
          Probe("unclear", "classifier of another process", ["sample", str(digits), "--class", "3", "--classifier",
                str(clf), *s2, "--out", str(work / "c.png")], names=("another process", "t_max")),
          Probe("unclear", "garbage .npz as data", ["train", "ring", "--out", str(work / "gz"), "--set",
                f"data.name={garbage}"], names=("not a .npz archive",))]
    P += issue28_probes(work, ring, digits, runs)
    P += fit_probes(work, ring, d["nan"])
    return P


def finite_samples(path: Path, shape: tuple[int, ...]) -> bool:
    """The ``.npz`` at ``path`` holds samples ``x`` of ``shape``, all finite (a complete, usable output)."""
    x = np.load(path)["x"]
    return x.shape == shape and bool(np.isfinite(x).all())


def fit_probes(work: Path, ring: Path, nan_run: Path) -> list[Probe]:
    """``torchdiffusion fit`` (issue 33): a fit adds exactly its file to the run folder and sampling uses it; a
    refused fit leaves the run (and the fit it already holds) byte-identical; a damaged or foreign stored fit is a
    one-line error or not used."""
    fitted, damaged, foreign = work / "fit_run", work / "fit_damaged", work / "fit_foreign"
    for q in (fitted, damaged, foreign):
        shutil.copytree(ring, q)
    base = tree_hashes([fitted])
    rec_path = fitted / "fits" / "ddim-4.json"
    (damaged / "fits").mkdir()
    (damaged / "fits" / "ddim-4.json").write_text('{"sampler": "ddim", "times": [999.0, 6')  # cut off mid-write
    (foreign / "fits").mkdir()
    (foreign / "fits" / "ddim-4.json").write_text(json.dumps({
        "format": 1, "sampler": "ddim", "steps": 4, "options": {}, "times": [999.0, 700.0, 400.0, 100.0, -1.0],
        "weights_sha256": "0" * 64}))  # a fit of other weights
    small = ["--pilot", "24", "--runs", "6", "--quiet"]
    ref = work / "fit_reference.npz"
    four = ["--sampler", "ddim", "--steps", "4", "--n", "4", "--quiet"]

    def fit_ok() -> bool:
        now = tree_hashes([fitted])
        rec = json.loads(rec_path.read_text())
        ema = ckpt.load_tensors(fitted / "ema.safetensors")[0]
        grid = np.array(rec["times"])
        return ({k: v for k, v in now.items() if k != str(rec_path)} == base and str(rec_path) in now
                and rec["sampler"] == "ddim" and rec["steps"] == 4 and len(grid) == 5 and grid[0] == 999.0
                and bool(np.all(np.diff(grid) < 0)) and rec["weights_sha256"] == ckpt.tensors_checksum(ema)
                and "using " in cli("sample", str(fitted), *four, "--out", str(work / "fit_used.npz")).stdout)

    def foreign_ignored() -> bool:
        r = cli("sample", str(ring), *four, "--out", str(ref))  # the same command on the run without a fit
        return r.returncode == 0 and np.array_equal(np.load(ref)["x"], np.load(work / "fit_foreign.npz")["x"])
    have_diffusers = importlib.util.find_spec("diffusers") is not None
    P = [Probe("data loss", "fit RUN --sampler ddim --steps 4", ["fit", str(fitted), "--sampler", "ddim", "--steps",
               "4", *small], expect="ok", changes=(fitted,), check=fit_ok,
               says="exactly fits/ddim-4.json added, every other file byte-identical; the grid starts at t_max, "
                    "decreases, has 5 points, carries the EMA weights' checksum; sample then says it uses it"),
         Probe("data loss", "fit --steps 0", ["fit", str(fitted), "--steps", "0", *small],
               names=("steps must be an integer >= 1",)),
         Probe("data loss", "fit --export-diffusers to a folder", ["fit", str(fitted), "--sampler", "ddim", "--steps",
               "4", *small, "--export-diffusers", str(work / "adir.json")], names=("is a folder", "adir.json")),
         Probe("data loss", "fit --export-diffusers --scheduler Nope (a stored fit in place)", [
               "fit", str(fitted), "--sampler", "ddim", "--steps", "4", *small, "--export-diffusers",
               str(work / "fit_export.json"), "--scheduler", "Nope"],
               names=("unknown diffusers scheduler 'Nope'",) if have_diffusers else ("needs diffusers",))]
    if have_diffusers:
        P.append(Probe("data loss", "fit --export-diffusers --scheduler DDIMScheduler (takes no grid)", [
            "fit", str(fitted), "--sampler", "ddim", "--steps", "4", *small, "--export-diffusers",
            str(work / "fit_export.json"), "--scheduler", "DDIMScheduler"],
            names=("DDIMScheduler cannot be given this grid",)))
    P += [Probe("silent wrong", "fit a run with one NaN weight", ["fit", str(nan_run), "--steps", "4", *small],
                names=("NaN/Inf", "ema.safetensors")),
          Probe("silent wrong", "sample with a stored fit cut off mid-write", ["sample", str(damaged), *four, "--out",
                str(work / "fit_damaged.npz")], names=("corrupt JSON", "ddim-4.json")),
          Probe("silent wrong", "sample with a stored fit of other weights", ["sample", str(foreign), *four, "--out",
                str(work / "fit_foreign.npz")], expect="ok", names=("not using the fitted grid", "other weights"),
                check=foreign_ignored, says="fit_foreign.npz equals the same command's samples on the run without "
                "a fit (the foreign fit is ignored, and the output says so)")]
    return P


PY_ERR = ("import sys, torch, numpy as np, torchdiffusion as td\n"
          "def fail(e):\n    print(f'torchdiffusion: error: {e}', file=sys.stderr); sys.exit(2)\n")


def py(body: str) -> str:
    """A Python probe: ``body`` (indented under ``try:``) with one-line errors as the CLI prints them."""
    lines = "\n".join("    " + x for x in body.strip().splitlines())
    return PY_ERR + f"try:\n{lines}\nexcept (ValueError, TypeError) as e:\n    fail(e)\n"


def issue28_probes(work: Path, ring: Path, digits: Path, extra: dict) -> list[Probe]:
    """Issue 28 (second round of faults and bad input): each probe names the files it touches, checked afterwards
    by :func:`run_probe`; probes that change a file state the correct change in their ``check``."""
    ae, s2 = extra["ae"], ["--steps", "2", "--quiet"]
    P = []
    copies = {}
    for name in ("victim", "pretrained", "edited", "edited_sample"):
        copies[name] = work / f"i28_{name}"
        shutil.copytree(ring, copies[name])
    diffusers_like = work / "i28_diffusers"
    diffusers_like.mkdir()
    (diffusers_like / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    cfg = ckpt.load_json(copies["edited"] / "config.json")
    (copies["edited"] / "config.json").write_text(json.dumps({**cfg, "process": {**cfg["process"],
                                                                                 "betas": "cosine"}}))
    (copies["edited_sample"] / "config.json").write_text(json.dumps({**cfg, "sample": {**cfg["sample"],
                                                                                        "steps": 3}}))
    # --- outputs never name a run's files; one model per folder ---------------------------------------------
    P += [Probe("data loss", "likelihood --json RUN/config.json", ["likelihood", str(ring), "--n", "4", "--json",
                str(ring / "config.json")], names=("refusing to write", "config.json of the run folder")),
          Probe("data loss", "eval --json RUN/log.csv", ["eval", str(ring), "--n", "4", *s2, "--json",
                str(ring / "log.csv")], names=("refusing to write", "log.csv of the run folder")),
          Probe("data loss", "td.grids.save('RUN/config.json')", [str(ring / "config.json")],
                names=("refusing to write", "config.json"),
                python=py("td.grids.save(sys.argv[1], torch.tensor([999.0, -1.0]))")),
          Probe("data loss", "likelihood --json RUN/sub/../.lock", ["likelihood", str(ring), "--n", "4", "--json",
                str(ring) + "/sub/../.lock"], names=("refusing to write", ".lock")),
          Probe("data loss", "export-diffusers A VICTIM --force (VICTIM a run)", ["export-diffusers", str(digits),
                str(copies["victim"]), "--force"], names=("is a torchdiffusion run folder", "even with --force")),
          Probe("data loss", "Pipeline.save_pretrained(RUN, force=True) over a run", [str(copies["pretrained"])],
                expect="ok", changes=(copies["pretrained"],), python=py(
                    "p = td.Pipeline.from_pretrained(sys.argv[1])\n"
                    "x = p(n=4, steps=2, generator=torch.Generator().manual_seed(0))\n"
                    "p.save_pretrained(sys.argv[1], force=True)\n"
                    "y = td.Pipeline.from_pretrained(sys.argv[1])(n=4, steps=2, "
                    "generator=torch.Generator().manual_seed(0))\n"
                    "assert torch.equal(x, y)\nprint('saved; reloads to the same samples')"),
                check=lambda: {q.name for q in copies["pretrained"].iterdir()} ==
                {".lock", "config.json", "model.safetensors", "ema.safetensors"}
                and "no train_state" in cli(*tf.train_cmd(copies["pretrained"], 305)).stderr,
                says="the folder holds exactly .lock, config.json, model and EMA weights, which reload to the same "
                     "samples; training refuses to resume it (no train_state)"),
          Probe("data loss", "Pipeline.save_pretrained(DIFFUSERS_FOLDER, force=True)",
                [str(ring), str(diffusers_like)], names=("holds a diffusers model",), python=py(
                    "td.Pipeline.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2], force=True)"))]
    # --- config values checked for range -------------------------------------------------------------------
    for kv, msg in (("train.clip=-1", "train.clip must be a number > 0 or null"),
                    ("loss.min_snr_gamma=-1", "loss.min_snr_gamma must be a number > 0"),
                    ("loss.min_snr_gamma=0", "loss.min_snr_gamma must be a number > 0"),
                    ("train.ema=1.5", "train.ema must be a number in [0, 1)"),
                    ("loss.p_uncond=1", "loss.p_uncond must be a number in [0, 1)"),
                    ("sample.sampler=bogus", "unknown sampler 'bogus'"), ("data.classes=0", "data.classes"),
                    ("train.lr=0", "train.lr must be a number > 0")):
        P.append(Probe("silent wrong", f"--set {kv}", ["train", "ring", "--out", str(work / "i28_cfg"), "--set",
                       kv, "--quiet"], names=(msg,)))
    # --- labels on load and at sampling -----------------------------------------------------------------------
    for name, labels, msg in (("-1", [0, 1, -1, 2] * 25, "labels must lie in 0..2"),
                              ("0.7", [0.0, 0.7, 1.0, 2.0] * 25, "whole numbers, got 0.7"),
                              ("NaN", [0.0, float("nan"), 1.0, 2.0] * 25, "whole numbers, got nan"),
                              ("10^6", [0, 1, 2, 10**6] * 25, "imply 1000001 classes for 100 examples")):
        path = work / f"labels_{name.replace('^', '')}.npz"
        np.savez(path, x=np.random.default_rng(0).normal(size=(100, 2)).astype(np.float32), y=np.array(labels))
        P.append(Probe("silent wrong", f"data labels {name}", ["train", "ring", "--out", str(work / "i28_lab"),
                       "--set", f"data.name={path}", "--set", "data.conditional=true", "--quiet"], names=(msg,)))
    for val, msg in (("3.7", "whole numbers in 0..9, got 3.7"), ("-1", "class labels must be in 0..9"),
                     ("float('nan')", "whole numbers"), ("10**6", "got 1000000")):
        P.append(Probe("silent wrong", f"Pipeline(class_labels={val})", [str(digits)], names=(msg,), python=py(
            f"td.Pipeline.from_pretrained(sys.argv[1])(n=2, steps=2, class_labels={val})")))
    # --- the config bound to the weights ------------------------------------------------------------------------
    P += [Probe("silent wrong", "hand-edited process.betas in config.json", ["sample", str(copies["edited"]), *s2,
                "--out", str(work / "i28_edited.npz")], names=("does not match its weights", "process.betas")),
          Probe("silent wrong", "hand-edited sample.steps (not bound: allowed)", ["sample",
                str(copies["edited_sample"]), "--quiet", "--out", str(work / "i28_edited_sample.npz")], expect="ok",
                check=lambda: finite_samples(work / "i28_edited_sample.npz", (64, 2)),
                says="i28_edited_sample.npz: 64 finite 2-D samples")]
    # --- folder outputs record their settings -------------------------------------------------------------------
    folder = work / "i28_folder"
    base = ["sample", str(digits), "--n", "4", "--quiet", "--out", f"{folder}/"]
    assert cli(*base, "--class", "3").returncode == 0
    first = tree_hashes([folder])
    (folder / "000001.png").write_bytes(b"")  # a zero-byte PNG, a truncated one, a dead writer's temp file
    (folder / "000002.png").write_bytes((folder / "000002.png").read_bytes()[:-20])
    (folder / f".000003.png.{dead_pid()}.0123abcd.tmp").write_bytes(b"\0" * 10)
    user = work / "i28_user_pngs"
    user.mkdir()
    (user / "000000.png").write_bytes(b"the user's own picture")
    P += [Probe("silent wrong", "sample --out DIR/ after a zero-byte PNG, a truncated PNG, a dead writer's temp",
                [*base, "--class", "3"], expect="ok", changes=(folder,),  # stated change: those three redrawn
                check=lambda: tree_hashes([folder]) == first,
                says="the folder byte-identical to the first complete run: the three damaged files redrawn, the "
                     "temp file gone"),
          Probe("silent wrong", "sample --out DIR/ rerun with another --class", [*base, "--class", "4"],
                names=("holds samples of other settings", "class: '3' there, '4' now", "--force")),
          Probe("silent wrong", "sample --out DIR/ rerun with another --seed", [*base, "--class", "3", "--seed", "1"],
                names=("holds samples of other settings", "seed")),
          Probe("data loss", "sample --out DIR/ of the user's own numbered PNGs", ["sample", str(digits), "--n", "2",
                "--quiet", "--out", f"{user}/"], names=("no sample_settings.json", "--force"))]
    # --- wrong combinations: one line -----------------------------------------------------------------------------
    grid = work / "grid_from_500.json"
    grid.write_text(json.dumps({"times": [500.0, 250.0, -1.0]}))
    P += [Probe("silent wrong", "sample --grid FILE not starting at t_max", ["sample", str(ring), "--grid", str(grid),
                "--quiet", "--out", str(work / "i28_grid.npz")], names=("the grid starts at t = 500", "t_max = 999")),
          Probe("silent wrong", "scorefield --sigma 1e300", ["scorefield", str(ring), "--sigma", "1e300", "--out",
                str(work / "i28_field.png")], names=("--sigma must lie in",))]
    if extra.get("latent") is not None:
        P.append(Probe("silent wrong", "--anagram on a latent run", ["sample", str(extra["latent"]), "--class", "1",
                       "--class2", "2", "--anagram", "rot180", *s2, "--out", str(work / "i28_ana.png")],
                       names=("--anagram needs a pixel-space run",)))
    for opt in (["--class", "3"], ["--guidance", "1"], ["--sampler", "ddim"], ["--steps", "5"]):
        P.append(Probe("silent wrong", f"autoencoder run with {' '.join(opt)}", ["sample", str(ae), *opt, "--out",
                       str(work / "i28_ae.png")], names=("is an autoencoder run", opt[0])))
    for name, sched, msg in (("num_train_timesteps 2.7", {"_class_name": "DDPMScheduler", "num_train_timesteps": 2.7},
                              "num_train_timesteps must be a whole number"),
                             ("ScoreSdeVp with negative betas", {"_class_name": "ScoreSdeVpScheduler",
                              "beta_min": -0.1, "beta_max": -20.0}, "beta_min must be a number >= 0")):
        path = work / f"sched_{len(P)}.json"
        path.write_text(json.dumps(sched))
        P.append(Probe("silent wrong", f"diffusers config: {name}", [str(path)], names=(msg,), python=py(
            "from torchdiffusion.parameterization.interop import process_from_diffusers\n"
            "process_from_diffusers(sys.argv[1])")))
    # --- tracebacks, hangs and wrong causes -----------------------------------------------------------------------
    empty = work / "empty_examples.npz"
    np.savez(empty, x=np.zeros((10, 0), np.float32))
    port = str(free_port())
    P += [Probe("tracebacks", "ode sampler with rtol=1e-300", ["sample", str(ring), "--sampler", "ode", "--opt",
                "rtol=1e-300", "--opt", "atol=1e-300", "--quiet", "--out", str(work / "i28_ode.npz")],
                names=("rtol must be a number in [", "float32")),
          Probe("hangs", "sample --out DIR/ with a leftover WORLD_SIZE=2", ["sample", str(digits), "--n", "2",
                "--quiet", "--out", f"{work / 'i28_ws'}/"], names=("WORLD_SIZE=2 but only 1 of 2", "left over"),
                env={"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                     "TORCHDIFFUSION_RENDEZVOUS_S": "5"}, timeout=120),
          Probe("unclear", "(N, 0) data", ["train", "ring", "--out", str(work / "i28_empty"), "--set",
                f"data.name={empty}", "--quiet"], names=("hold no values", "(10, 0)")),
          Probe("unclear", "integer x_T", [str(ring)], names=("floating-point", "int64"), python=py(
                "p = td.Pipeline.from_pretrained(sys.argv[1])\n"
                "td.sample(p.model, torch.zeros(2, 2, dtype=torch.long), 'ddim', 2)")),
          Probe("unclear", "t beyond t_max", [str(ring)], names=("outside the process range", "999.5"), python=py(
                "td.Pipeline.from_pretrained(sys.argv[1]).process.check_time(999.5)"))]
    return P


def dead_pid() -> int:
    """The pid of a process that has ended (for a dead writer's temp file)."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ctrl_c_during_sample(work: Path, ring: Path) -> tuple[str, str, str]:
    """SIGINT (Ctrl-C) once the sampling progress bar shows: one line ``torchdiffusion: interrupted``, exit 130, the
    output not written, the run byte-identical."""
    out, before = work / "ctrlc.npz", tree_hashes([ring])
    p = subprocess.Popen([sys.executable, "-m", "torchdiffusion", "sample", str(ring), "--n", "200000", "--steps",
                          "1000", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=tf._env(),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # (a background job's
    # shell ignores SIGINT, and children inherit that: restore the default, as in a terminal)
    seen = bytearray()

    def read() -> None:
        while chunk := p.stderr.read1(4096):
            seen.extend(chunk)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    tf.wait_for(lambda: b"step" in seen or p.poll() is not None, timeout=300)
    p.send_signal(signal.SIGINT)
    p.wait(timeout=120)
    reader.join(timeout=10)
    lines = [x for x in seen.decode(errors="replace").replace("\r", "\n").splitlines()
             if x.strip() and not PROGRESS.search(x) and "step/s" not in x and "it/s" not in x]
    ok = p.returncode == 130 and lines[-1:] == ["torchdiffusion: interrupted"] and not out.exists() \
        and tree_hashes([ring]) == before and "Traceback" not in seen.decode(errors="replace")
    return ("Ctrl-C during sample", f"exit {p.returncode}: {lines[-1] if lines else ''}",
            "one line, exit 130, nothing written" if ok else "WRONG")


def signal_events(work: Path, reference: dict, ring: Path, seed: int = 15) -> list[tuple[str, str, str]]:
    """kill -9 at seeded random moments, SIGTERM, a second trainer (each ends compared with ``reference``) and
    Ctrl-C during sampling."""
    rng, rows = random.Random(seed), [ctrl_c_during_sample(work, ring)]
    for i in range(3):
        run = work / f"kill{i}"
        argv = tf.train_cmd(run)
        events = [("step", rng.randint(1, 280)), ("write", rng.randint(1, 12)), ("partial", rng.randint(2, 12)),
                  ("external", rng.uniform(0.05, 0.5))]
        for mode, k in events:
            if mode == "external":
                before, p = tf.log_steps(run), tf.start(argv)
                tf.wait_for(lambda p=p, before=before, run=run: tf.log_steps(run) > before + 5 or p.poll() is not None)
                time.sleep(k)
                p.send_signal(signal.SIGKILL)
                p.communicate()
            else:
                tf.drive(mode, k, argv)
        r = cli(*argv)
        ok = r.returncode == 0 and _same(run, reference) and {q.name for q in run.iterdir()} == tf.RUN_FILES
        desc = ", ".join(f"{m} {k:.2f}" if isinstance(k, float) else f"{m} {k}" for m, k in events)
        rows.append(("kill -9 x4, then resume", desc, "bit-identical, no leftovers" if ok else "DIFFERENT"))
    run = work / "term"
    p = tf.start(tf.train_cmd(run))
    tf.wait_for(lambda: tf.log_steps(run) >= 30 or p.poll() is not None)
    p.send_signal(signal.SIGTERM)
    p.communicate()
    step = ckpt.load_tensors(run / "train_state.safetensors")[1]["step"]
    saved = p.returncode == 128 + signal.SIGTERM and tf.log_steps(run) == step
    ok = saved and cli(*tf.train_cmd(run)).returncode == 0 and _same(run, reference)
    rows.append(("SIGTERM, then resume", f"stopped at step {step}, exit {p.returncode}",
                 "saved; resumed bit-identical" if ok else "LOST WORK"))
    run = work / "race"
    first = tf.start(tf.train_cmd(run))
    tf.wait_for(lambda: tf.log_steps(run) >= 5 or first.poll() is not None)
    second = cli(*tf.train_cmd(run))
    first.communicate()
    ok = second.returncode == 2 and "in use by another trainer" in second.stderr and _same(run, reference)
    rows.append(("second trainer on a busy folder", second.stderr.strip().splitlines()[-1][:90],
                 "refused; first bit-identical" if ok else "RACE"))
    return rows


def _same(run: Path, reference: dict) -> bool:
    try:
        tf.assert_same(tf.state(run), reference)
        return True
    except AssertionError:
        return False


def machine() -> str:
    return (f"{platform.platform()}; cpus {os.cpu_count()}; torch {torch.__version__}; python "
            f"{platform.python_version()}; {datetime.datetime.now().isoformat(timespec='seconds')}")


def main() -> None:
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="td_faults_"))
    mounts = []
    try:
        ring = work / "ring"
        r = cli(*tf.train_cmd(ring))
        assert r.returncode == 0, r.stderr
        reference = tf.state(ring)
        digits = work / "digits"
        r = cli("train", "digits", "--out", str(digits), "--set", "train.steps=10", "--set", "model.channels=16",
                "--set", "train.batch=32", "--set", "sample.steps=2", "--quiet")
        assert r.returncode == 0, r.stderr
        clf = work / "clf"
        r = cli("train", "classifier_digits", "--out", str(clf), "--set", "train.steps=5", "--set",
                "model.channels=16", "--set", "train.batch=32", "--set", "process.T=500", "--quiet")
        assert r.returncode == 0, r.stderr
        disk = work / "disk"
        if mount_tmpfs(disk, 256):
            mounts.append(disk)
            assert cli("sample", str(ring), "--n", "8", "--steps", "2", "--out", str(disk / "old.npz"),
                       "--quiet").returncode == 0
            (disk / "old.json").write_text('{"kept": true}')
            tf.fill(disk)
        else:
            disk = None
        ro = work / "ro"
        if mount_tmpfs(ro, 64, read_only=True):
            mounts.append(ro)
        else:
            ro = None
        extra = {"ae": work / "ae", "latent": work / "latent"}
        r = cli("train", "ae_digits", "--out", str(extra["ae"]), "--set", "train.steps=1", "--set",
                "model.channels=8", "--set", "train.batch=8", "--set", "data.size=8", "--set", "model.channel_mult=[1]",
                "--quiet")
        assert r.returncode == 0, r.stderr
        r = cli("train", "latent", "--out", str(extra["latent"]), "--set", f"data.autoencoder={extra['ae']}", "--set",
                "train.steps=1", "--set", "model.channels=8", "--set", "train.batch=8", "--set",
                "model.attn_resolutions=[]", "--set", "sample.steps=2", "--quiet")
        assert r.returncode == 0, r.stderr
        results = []
        for p in probes(work, ring, digits, clf, disk, ro, extra):
            results.append(run_probe(p))
            print(f"{p.outcome:>20s} | {p.group:<13s} | {p.name} | {p.checked}", flush=True)
        results += studio_probes(work, ring)
        events = signal_events(work, reference, ring)
        for e in events:
            print(f"{e[2]:>30s} | {e[0]} | {e[1]}")
        write_results(results, events, disk is not None, ro is not None, time.time() - t0)
    finally:
        for m in mounts:
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def write_results(results: list[Probe], events: list, disk: bool, ro: bool, seconds: float) -> None:
    kinds = ("clean error", "correct result", "unclear error", "traceback", "silent wrong result", "data loss", "hang")
    count = {k: sum(p.outcome == k for p in results) for k in kinds}
    touching = [p for p in results if p.touches]
    unchecked = [p.name for p in touching if not p.covered]
    lines = ["# Fault probes: run folders, outputs and errors", "",
             f"Machine: {machine()}", "", "Command: `.venv/bin/python benchmarks/faults.py` "
             f"({seconds:.0f} s). Every probe is a fresh `python -m torchdiffusion` process; see the script's "
             "docstring for how outcomes are classified.", "",
             f"Full-disk probes: {'a 256 KiB tmpfs filled to the last byte' if disk else 'SKIPPED (cannot mount)'}; "
             f"read-only probes: {'a read-only tmpfs' if ro else 'SKIPPED (cannot mount)'}.", "",
             "| probes tried | clean errors | correct results | unclear errors | tracebacks (goal 0) | "
             "silent wrong results (goal 0) | data-loss paths (goal 0) | hangs (goal 0) |",
             "|---|---|---|---|---|---|---|---|",
             f"| {len(results)} | {count['clean error']} | {count['correct result']} | {count['unclear error']} | "
             f"{count['traceback']} | {count['silent wrong result']} | {count['data loss']} | {count['hang']} |", "",
             f"**{len(touching) - len(unchecked)} of {len(touching)} probes that touch files check them "
             f"afterwards** ({len(results) - len(touching)} of the {len(results)} touch none: refused before "
             "reading a file)" + (f"; NOT checked: {', '.join(unchecked)}" if unchecked else "") + ". Checked on "
             "disk after each probe (last column): inputs byte-identical (SHA-256 of every file, file sets "
             "included, whole run folders where a run is read); the outputs of refused commands absent; the outputs "
             "of commands that must work complete and correct, and inputs they change changed exactly as stated "
             "(the check named in the column); no temp files in the folders named; nothing left in the probe's own "
             "working folder and TMPDIR. A failed check makes the probe data loss (a file changed, left or half "
             "written) or a silent wrong result (a wrong output) - `tests/test_fault_probes.py` shows both on fake "
             "probes.", "",
             "## Signal events", "", "| event | moments (seeded) | outcome |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in events]
    lines += ["", "## Every probe", "", "| group | probe | outcome | what the user saw | files checked afterwards |",
              "|---|---|---|---|---|"]
    for p in results:
        detail = p.detail.replace("|", "\\|").replace(str(Path(tempfile.gettempdir())), "/tmp")
        detail = re.sub(r"/tmp/td_faults_\w+", "WORK", detail)
        checked = re.sub(r"/tmp/td_faults_\w+", "WORK", p.checked.replace("|", "\\|"))
        lines.append(f"| {p.group} | {p.name} | {p.outcome} | {detail[:160]} | {checked} |")
    _report.write_results(RESULTS, lines, echo=False)
    print(f"wrote {RESULTS}")


# --- the studio server (issue 28): probes over raw sockets against `torchdiffusion studio` -----------------------
# A separate block: ``studio_probes`` starts the real command on a copy of the ring run in a folder named outside
# Latin-1, sends each request as a browser on another site, a DNS-rebinding page or a careless client would, and
# classifies the answers like the CLI probes: a refusal must be one JSON line with the right status naming its cause
# ("clean error"); a request that must work must work ("correct result"); no answer in time is a hang ("silent
# wrong result", detail HANG); anything on the server's stderr is a traceback.
STUDIO_NAME = "anneau-données-環"


class _Studio:
    """``torchdiffusion studio RUN --port 0`` in a fresh process, its stderr collected line by line."""

    def __init__(self, run: Path, tmp: Path):
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp
        self.proc = subprocess.Popen([sys.executable, "-m", "torchdiffusion", "studio", str(run), "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**tf._env(), "TMPDIR": str(tmp)})
        line = self.proc.stdout.readline()
        m = re.fullmatch(r"serving http://127\.0\.0\.1:(\d+)/\n", line)
        assert m, line + self.proc.stderr.read()
        self.port = int(m.group(1))
        self.err: list[str] = []
        threading.Thread(target=lambda: self.err.extend(iter(self.proc.stderr.readline, "")), daemon=True).start()

    def request(self, method: str, path: str, headers: dict | None = None, body: bytes | None = None, *,
                host: str | None = None, length: str | None = None) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host if host is not None else f'127.0.0.1:{self.port}'}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if length is not None or body is not None:
            lines.append(f"Content-Length: {length if length is not None else len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")

    def post(self, settings: dict | None = None, **headers) -> bytes:
        body = json.dumps(settings or {"sampler": "ddim", "grid": "", "steps": "2", "seed": "0", "n": "4"}).encode()
        return self.request("POST", "/api/generate", {"Content-Type": "application/json",
                                                      "Origin": f"http://127.0.0.1:{self.port}", **headers}, body)

    def exchange(self, data: bytes, wait: float = 30.0) -> tuple[int | None, dict, bytes, float]:
        """Send, read to the end: status (None: no status line), headers, body, seconds; raises on a reset or a
        hang (TimeoutError)."""
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port), timeout=wait) as sock:
            sock.sendall(data)
            chunks = []
            while c := sock.recv(65536):
                chunks.append(c)
        raw = b"".join(chunks)
        if not raw.startswith(b"HTTP/"):
            return None, {}, raw, time.monotonic() - t0
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        return int(lines[0].split()[1]), dict(x.split(": ", 1) for x in lines[1:]), body, time.monotonic() - t0


def _studio_refusal(st: _Studio, data: bytes, status: int, *names: str, within: float = 15.0) -> tuple[str, str]:
    try:
        code, _, body, seconds = st.exchange(data)
    except TimeoutError:
        return "silent wrong result", "HANG: no answer in 30 s"
    except OSError as e:
        return "silent wrong result", f"connection {type(e).__name__} instead of an answer"
    lines = body.decode("utf-8", "replace").splitlines()
    try:
        msg = json.loads(lines[0])["message"] if len(lines) == 1 else None
    except (ValueError, KeyError, TypeError):
        msg = None
    if code == 200:
        return "silent wrong result", "accepted (200): " + (lines[-1][:100] if lines else "")
    if msg is None:
        return "unclear error", f"{code}: {body[:100]!r}"
    if code != status or not all(n in msg for n in names) or seconds > within:
        return "unclear error", f"{code} after {seconds:.1f} s: {msg}"
    return "clean error", f"{code} after {seconds:.1f} s: {msg}"


def _studio_messages(body: bytes) -> list[dict]:
    return [json.loads(x) for x in body.decode().splitlines() if x.strip()]


def _complete_result(path: Path) -> bool:
    """A studio result file is complete: a PNG to its end, or a loadable .npz."""
    if path.suffix == ".png":
        return complete_png(path)
    try:
        return path.suffix == ".npz" and np.load(path)["x"].size > 0
    except (OSError, ValueError, KeyError):
        return False


def studio_probes(work: Path, ring: Path) -> list[Probe]:
    """The studio's security and robustness probes (issue 28); each a :class:`Probe` with its outcome set."""
    run = work / STUDIO_NAME
    shutil.copytree(ring, run)
    run_before = tree_hashes([run])
    st = _Studio(run, work / "studio_tmp")
    out: list[Probe] = []
    seen = 0
    results = tree_hashes([st.tmp])  # the studio's TMPDIR: where it keeps its results (ID.png, ID.npz)

    def add(name: str, outcome: tuple[str, str]) -> None:
        """Record a probe; anything the server wrote to stderr meanwhile overrides its outcome. Then the files: the
        run folder it serves byte-identical; a refused request wrote no result; a served one wrote complete results
        only (PNGs to their end, loadable .npz); no temp files in its TMPDIR (issue 33 item 6)."""
        nonlocal seen, results
        time.sleep(0.2)
        new, seen = st.err[seen:], len(st.err)
        if new:
            kind = "traceback" if any("Traceback" in x for x in new) else "unclear error"
            outcome = (kind, "server stderr: " + new[-1].strip()[:140])
        now, run_now = tree_hashes([st.tmp]), tree_hashes([run])
        lost = [k for k in run_before.keys() | run_now.keys() if run_before.get(k) != run_now.get(k)]
        wrote = [k for k in now if results.get(k) != now[k]]
        refused = outcome[0] in ("clean error", "unclear error")
        bad = wrote if refused else [k for k in wrote if not _complete_result(Path(k))]
        temps = [k for k in now if tf.files.TEMP_RE.match(Path(k).name)]
        checked = (f"run folder {len(run_now)} files byte-identical; studio results: "
                   + ("none written (refused)" if refused else f"{len(wrote)} written, all complete")
                   + "; no temp files")
        if lost or bad or temps:
            outcome = ("data loss", f"run folder changed: {lost[:2]} bad results: {bad[:2]} temp files: {temps[:2]}")
        results = now
        out.append(Probe("studio", name, [], outcome=outcome[0], detail=outcome[1], checked=checked, touches=True,
                         covered=True))

    evil = {"Origin": "http://evil.example"}
    try:
        code, _, body, _ = st.exchange(st.post())
        ok = code == 200 and _studio_messages(body)[-1]["type"] == "done"
        add("same-origin generate (control)", ("correct result" if ok else "silent wrong result", f"{code}"))
        rid = _studio_messages(body)[-1].get("id", "r1") if ok else "r1"
        add("cross-origin POST /api/generate (Origin: evil.example)", _studio_refusal(st, st.post(**evil), 403,
                                                                                     "cross-origin"))
        add("cross-site POST (Sec-Fetch-Site: cross-site, no Origin)",
            _studio_refusal(st, st.post(**{"Sec-Fetch-Site": "cross-site"}).replace(
                f"Origin: http://127.0.0.1:{st.port}\r\n".encode(), b""), 403, "another site"))
        for ctype in ("text/plain", "application/x-www-form-urlencoded"):
            add(f"POST with a {ctype} body", _studio_refusal(st, st.post().replace(
                b"Content-Type: application/json", f"Content-Type: {ctype}".encode()), 415, "application/json"))
        add("foreign Host: GET /api/info (Host: evil.example)",
            _studio_refusal(st, st.request("GET", "/api/info", host="evil.example"), 403, "Host"))
        for path in ("/api/info", f"/results/{rid}.png", "/"):
            add(f"DNS rebinding: GET {path} (Host: evil.example:PORT)", _studio_refusal(
                st, st.request("GET", path, host=f"evil.example:{st.port}"), 403, "Host"))
        add("cross-origin GET /api/info (Origin: evil.example)",
            _studio_refusal(st, st.request("GET", "/api/info", evil), 403, "cross-origin"))
        add("cross-site GET of a result (Sec-Fetch-Site: cross-site)", _studio_refusal(
            st, st.request("GET", f"/results/{rid}.npz", {"Sec-Fetch-Site": "cross-site"}), 403, "another site"))
        add("cross-origin POST /api/stop (Origin: evil.example)", _studio_refusal(st, st.request(
            "POST", "/api/stop", {"Content-Type": "application/json", **evil}, b"{}"), 403, "cross-origin"))
        add("CORS preflight OPTIONS /api/generate", _studio_refusal(st, st.request("OPTIONS", "/api/generate", {
            **evil, "Access-Control-Request-Method": "POST"}), 501))
        jhdr = {"Content-Type": "application/json"}
        add("POST Content-Length: -1", _studio_refusal(st, st.request("POST", "/api/generate", jhdr, length="-1"),
                                                       400, "Content-Length", within=2))
        add("POST Content-Length: 10^9 (announced)", _studio_refusal(
            st, st.request("POST", "/api/generate", jhdr, length=str(10**9)), 413, "bytes", within=2))
        add("POST a 2 MB body", _studio_refusal(st, st.request("POST", "/api/generate", jhdr, b"{" + b" " * 2_000_000
                                                               + b"}"), 413, "bytes", within=5))
        add("POST 5000 nested brackets", _studio_refusal(st, st.request("POST", "/api/generate", jhdr,
                                                                        b"[" * 5000 + b"]" * 5000), 400, "nested"))
        add("POST a body shorter than announced (client waits)", _studio_refusal(
            st, st.request("POST", "/api/generate", jhdr, length="100") + b"{}", 408, "did not arrive", within=15))
        t0 = time.monotonic()  # a client dribbling its headers
        try:
            with socket.create_connection(("127.0.0.1", st.port), timeout=30) as sock:
                sock.sendall(b"GET /api/info HTTP/1.1\r\n")
                while time.monotonic() - t0 < 30:
                    sock.sendall(b"X-Slow: 1\r\n")
                    time.sleep(0.5)
            res = ("silent wrong result", "HANG: a dribbling client held a thread for 30 s")
        except OSError:
            res = ("clean error", f"closed after {time.monotonic() - t0:.1f} s")
        add("slow client dribbling headers", res)
        for label, data in (("mid-POST", st.request("POST", "/api/generate", jhdr, length="500") + b'{"sa'),
                            ("mid-stream", st.post({"sampler": "ddim", "grid": "", "steps": "400", "seed": "0",
                                                    "n": "2000"}))):
            with socket.create_connection(("127.0.0.1", st.port), timeout=30) as sock:
                sock.sendall(data)
                if label == "mid-stream":
                    sock.recv(100)
            time.sleep(0.5)
            code, _, body, seconds = st.exchange(st.post())
            ok = code == 200 and _studio_messages(body)[-1]["type"] == "done"
            add(f"client disconnects {label}, then a generate", ("correct result" if ok else "silent wrong result",
                                                                 f"next generate {code} in {seconds:.1f} s"))

        def one(_):
            conn = http.client.HTTPConnection("127.0.0.1", st.port, timeout=120)
            try:
                conn.request("POST", "/api/generate", body=json.dumps({"sampler": "ddim", "grid": "", "steps": "1",
                                                                       "seed": "0", "n": "1"}),
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                return resp.status, _studio_messages(resp.read())[-1]["type"]
            except OSError as e:
                return None, type(e).__name__
            finally:
                conn.close()

        with concurrent.futures.ThreadPoolExecutor(200) as pool:
            answers = list(pool.map(one, range(200)))
        resets = [a for a in answers if a[0] is None]
        done = sum(a == (200, "done") for a in answers)
        busy = sum(a == (503, "error") for a in answers)
        add("200 concurrent generates", ("correct result" if not resets and done + busy == 200 else
                                         "silent wrong result",
                                         f"{done} done, {busy} busy (503, one line), {len(resets)} resets/failures"))
        code, headers, png, _ = st.exchange(st.request("GET", f"/results/{rid}.png"))
        cd = headers.get("Content-Disposition", "")
        m = re.search(r"filename\*=([^;]+)", cd)
        name = ""
        if m is not None:
            charset, _, value = email.utils.decode_rfc2231(m.group(1))
            name = urllib.parse.unquote(value, encoding=charset or "utf-8")
        ok = code == 200 and png.startswith(b"\x89PNG") and name == f"{STUDIO_NAME}-{rid}.png" and cd.isascii()
        add(f"download from a run folder named {STUDIO_NAME!r}", ("correct result" if ok else "silent wrong result",
                                                                  f"{code}: {cd[:120]}"))
    finally:
        st.proc.send_signal(signal.SIGTERM)
        try:
            st.proc.wait(30)
        except subprocess.TimeoutExpired:
            st.proc.kill()
    left = list(st.tmp.iterdir())
    add("SIGTERM the studio", ("correct result" if st.proc.returncode == 0 and not left else "data loss",
                               f"exit {st.proc.returncode}, temp folders left: {len(left)}"))
    return out


if __name__ == "__main__":
    main()
