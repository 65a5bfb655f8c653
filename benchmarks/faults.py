"""Fault probes: try to lose work or get a silently wrong answer, as a new user (or a cluster scheduler) would.

Run (about 4 minutes on 2 CPU cores, as root for the tmpfs probes):  .venv/bin/python benchmarks/faults.py

Every probe runs the real command line (``python -m torchdiffusion ...``) in a fresh process against tiny runs
trained first (a 2-D ring run, a class-conditional digits run, a noise-conditional classifier trained on another
process). A probe expects either an error or a correct result, and may name files that must come through
byte-identical. Each outcome is classified:

- clean error: non-zero exit, exactly one stderr line ``torchdiffusion: error: ...`` (progress bars aside) that
  contains what the probe expects it to name (the file, the option, the cause);
- unclear error: a clean one-line error that does not say what the probe expects;
- traceback: a Python traceback reached the user;
- silent wrong result: exit 0 where an error was due, or a result that fails its check (e.g. NaN);
- data loss: a protected file changed, or a temp file was left behind.

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
import test_faults as tf  # noqa: E402  (the kill driver and the run-state comparison of the tests)
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
    protect: tuple[Path, ...] = ()
    check: object = None
    python: str | None = None  # run this Python snippet instead of the CLI
    outcome: str = ""
    detail: str = ""
    hashes: dict = field(default_factory=dict)


def cli(*argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torchdiffusion", *argv], capture_output=True, text=True,
                          env=tf._env(), timeout=timeout)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "absent"


def tree_hashes(paths: tuple[Path, ...]) -> dict:
    out = {}
    for p in paths:
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for q in files:
            out[str(q)] = sha(q)
    return out


def run_probe(p: Probe) -> Probe:
    p.hashes = tree_hashes(p.protect)
    if p.python is not None:
        r = subprocess.run([sys.executable, "-c", p.python, *p.argv], capture_output=True, text=True, env=tf._env(),
                           timeout=600)
    else:
        r = cli(*p.argv)
    err_lines = [x for x in r.stderr.strip().splitlines() if x.strip() and not PROGRESS.search(x)]
    line = err_lines[-1] if err_lines else ""
    lost = [k for k, v in tree_hashes(p.protect).items() if p.hashes.get(k) != v]
    lost += [k for k in p.hashes if not Path(k).exists()]
    temps = [str(q) for d in {Path(a).parent for a in p.argv if "/" in a} if d.is_dir()
             for q in d.iterdir() if tf.files.TEMP_RE.match(q.name)]
    if "Traceback" in r.stderr:
        p.outcome, p.detail = "traceback", line
    elif lost or temps:
        p.outcome, p.detail = "data loss", f"changed: {lost[:3]} temp files: {temps[:3]}"
    elif p.expect == "error":
        if r.returncode == 0:
            p.outcome, p.detail = "silent wrong result", "exit 0: " + (r.stdout.strip().splitlines() or [""])[-1]
        elif len(err_lines) == 1 and line.startswith("torchdiffusion: error: ") and all(n in line for n in p.names):
            p.outcome, p.detail = "clean error", line
        else:
            p.outcome, p.detail = "unclear error", line or r.stderr[-200:]
    else:
        ok = r.returncode == 0 and (p.check is None or p.check())
        p.outcome = "correct result" if ok else "silent wrong result"
        p.detail = (r.stdout.strip().splitlines() or [""])[-1] if ok else (line or "check failed")
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


def probes(work: Path, ring: Path, digits: Path, clf: Path, disk: Path | None, ro: Path | None) -> list[Probe]:
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
    if disk is not None:
        old = disk / "old.npz"
        P += [Probe("data loss", "sample --out old.npz on a full disk", ["sample", str(ring), "--n", "2000", *s2,
                    "--out", str(old)], names=("No space left on device", str(old)), protect=(old,)),
              Probe("data loss", "likelihood --json old.json on a full disk", ["likelihood", str(ring), "--n", "8",
                    "--steps", "4", "--json", str(disk / "old.json")], names=("No space left", "old.json"),
                    protect=(disk / "old.json",)),
              Probe("tracebacks", "train on a full disk", ["train", "ring", "--out", str(disk / "run"), *tiny],
                    names=("No space left", str(disk))),
              Probe("tracebacks", "sample PNG on a full disk", ["sample", str(ring), *s2, "--out",
                    str(disk / "s.png")], names=("No space left", "s.png")),
              Probe("tracebacks", "sample --gif on a full disk", ["sample", str(digits), "--class", "1", "--n", "4",
                    *s2, "--out", str(work / "g.png"), "--gif", str(disk / "g.gif")], names=("No space left", "g.gif")),
              Probe("tracebacks", "demo on a full disk", ["demo", "--quick", "--out", str(disk / "demo")],
                    names=("No space left", str(disk)))]
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
                   str(work / "ok.npz")], expect="ok",
                   check=lambda: bool(np.isfinite(np.load(work / "ok.npz")["x"]).all())))
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

    for cmd in outputs_in(afile, "g3.png"):
        P.append(Probe("tracebacks", f"{cmd[0]} output under a file", cmd, names=("afile",)))
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
    return P


def signal_events(work: Path, reference: dict, seed: int = 15) -> list[tuple[str, str, str]]:
    """kill -9 at seeded random moments, SIGTERM and a second trainer; each ends compared with ``reference``."""
    rng, rows = random.Random(seed), []
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
        results = [run_probe(p) for p in probes(work, ring, digits, clf, disk, ro)]
        results += studio_probes(work, ring)
        for p in results:
            print(f"{p.outcome:>20s} | {p.group:<13s} | {p.name}")
        events = signal_events(work, reference)
        for e in events:
            print(f"{e[2]:>30s} | {e[0]} | {e[1]}")
        write_results(results, events, disk is not None, ro is not None, time.time() - t0)
    finally:
        for m in mounts:
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def write_results(results: list[Probe], events: list, disk: bool, ro: bool, seconds: float) -> None:
    kinds = ("clean error", "correct result", "unclear error", "traceback", "silent wrong result", "data loss")
    count = {k: sum(p.outcome == k for p in results) for k in kinds}
    lines = ["# Fault probes: run folders, outputs and errors", "",
             f"Machine: {machine()}", "", "Command: `.venv/bin/python benchmarks/faults.py` "
             f"({seconds:.0f} s). Every probe is a fresh `python -m torchdiffusion` process; see the script's "
             "docstring for how outcomes are classified.", "",
             f"Full-disk probes: {'a 256 KiB tmpfs filled to the last byte' if disk else 'SKIPPED (cannot mount)'}; "
             f"read-only probes: {'a read-only tmpfs' if ro else 'SKIPPED (cannot mount)'}.", "",
             "| probes tried | clean errors | correct results | unclear errors | tracebacks (goal 0) | "
             "silent wrong results (goal 0) | data-loss paths (goal 0) |", "|---|---|---|---|---|---|---|",
             f"| {len(results)} | {count['clean error']} | {count['correct result']} | {count['unclear error']} | "
             f"{count['traceback']} | {count['silent wrong result']} | {count['data loss']} |", "",
             "## Signal events", "", "| event | moments (seeded) | outcome |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in events]
    lines += ["", "## Every probe", "", "| group | probe | outcome | what the user saw |", "|---|---|---|---|"]
    for p in results:
        detail = p.detail.replace("|", "\\|").replace(str(Path(tempfile.gettempdir())), "/tmp")
        detail = re.sub(r"/tmp/td_faults_\w+", "WORK", detail)
        lines.append(f"| {p.group} | {p.name} | {p.outcome} | {detail[:160]} |")
    RESULTS.write_text("\n".join(lines) + "\n")
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


def studio_probes(work: Path, ring: Path) -> list[Probe]:
    """The studio's security and robustness probes (issue 28); each a :class:`Probe` with its outcome set."""
    run = work / STUDIO_NAME
    shutil.copytree(ring, run)
    st = _Studio(run, work / "studio_tmp")
    out: list[Probe] = []
    seen = 0

    def add(name: str, outcome: tuple[str, str]) -> None:
        """Record a probe; anything the server wrote to stderr meanwhile overrides its outcome."""
        nonlocal seen
        time.sleep(0.2)
        new, seen = st.err[seen:], len(st.err)
        if new:
            kind = "traceback" if any("Traceback" in x for x in new) else "unclear error"
            outcome = (kind, "server stderr: " + new[-1].strip()[:140])
        out.append(Probe("studio", name, [], outcome=outcome[0], detail=outcome[1]))

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
