"""Issue 29: ``Pipeline.from_pretrained("org/name")`` through huggingface_hub -- its cache, ``revision=`` and
offline mode -- against a cache laid out as huggingface_hub lays it out (models--org--name/snapshots/REV/...,
refs/main), with no network: HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing at a folder this test fills."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs.train import train

pytest.importorskip("huggingface_hub")
SRC = Path(__file__).resolve().parents[1] / "src"
REV_A, REV_B = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    for name, steps in (("ring_a", 20), ("ring_b", 30)):
        train(config_mod.resolve("ring", [f"train.steps={steps}", "model.hidden=16", "model.depth=1",
                                          "train.device=cpu", "train.ckpt_every=0"]), root / name, progress=False)
    repo = root / "cache" / "models--tdorg--ring"
    for rev, run in ((REV_A, "ring_a"), (REV_B, "ring_b")):
        snap = repo / "snapshots" / rev
        snap.mkdir(parents=True)
        for f in ("config.json", "model.safetensors", "ema.safetensors"):
            shutil.copy(root / run / f, snap / f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV_B)
    return root


def run_offline(cache: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_HUB_CACHE": str(cache / "cache"), "HF_HOME": str(cache / "home")}
    prelude = ("import torch, torchdiffusion as td\n"
               "def draw(p): return p(n=5, steps=5, generator=torch.Generator().manual_seed(0))\n")
    return subprocess.run([sys.executable, "-c", prelude + code], env=env, capture_output=True, text=True,
                          timeout=300)


def test_hub_ids_read_the_cache_offline(cache):
    code = (f"main = draw(td.Pipeline.from_pretrained('tdorg/ring'))\n"
            f"assert torch.equal(main, draw(td.Pipeline.from_pretrained({str(cache / 'ring_b')!r})))\n"
            f"a = draw(td.Pipeline.from_pretrained('tdorg/ring', revision={REV_A!r}))\n"
            f"assert torch.equal(a, draw(td.Pipeline.from_pretrained({str(cache / 'ring_a')!r})))\n"
            "assert not torch.equal(a, main)\n"
            "print('ok')\n")
    p = run_offline(cache, code)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


def test_missing_hub_ids_are_one_line(cache):
    code = ("for kw in ({}, {'revision': 'c' * 40}):\n"
            "    try:\n"
            "        td.Pipeline.from_pretrained('tdorg/absent' if not kw else 'tdorg/ring', **kw)\n"
            "    except ValueError as e:\n"
            "        print(e)\n")
    p = run_offline(cache, code)
    lines = p.stdout.strip().splitlines()
    assert p.returncode == 0 and len(lines) == 2, p.stderr[-2000:]
    assert "tdorg/absent is not a local folder and not in the Hugging Face cache" in lines[0]
    assert "at revision cccc" in lines[1] and "HF_HUB_OFFLINE" in lines[1]
    # a path that is not a Hub id stays a missing folder
    p = run_offline(cache, "try:\n    td.Pipeline.from_pretrained('runs/a/b')\nexcept ValueError as e:\n    print(e)\n")
    assert "run folder not found: runs/a/b" in p.stdout, p.stderr[-2000:]


def test_local_files_only_reads_the_cache(cache, monkeypatch):
    import torch

    import torchdiffusion as td

    monkeypatch.setenv("HF_HUB_CACHE", str(cache / "cache"))
    pipe = td.Pipeline.from_pretrained("tdorg/ring", local_files_only=True, cache_dir=cache / "cache")
    ref = td.Pipeline.from_pretrained(cache / "ring_b")
    a, b = (p(n=3, steps=3, generator=torch.Generator().manual_seed(1)) for p in (pipe, ref))
    assert torch.equal(a, b)
