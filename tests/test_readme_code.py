"""Issue 29: every ```python block of the README runs as a user would paste it -- the blocks in order, in one
fresh interpreter, in a folder where the runs the README names exist (tiny versions, trained here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.channels=8", "model.num_res_blocks=1", "train.batch=16", "train.ckpt_every=0", "train.log_every=2",
        "train.warmup=2", "train.device=cpu", "train.steps=3", "sample.steps=4", "train.sample_every=0"]
RUNS = {"runs/demo/digits": ("digits", TINY)}  # every run folder a README block loads


def blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def test_the_readme_has_python_blocks_and_names_only_runs_made_here():
    code = "\n".join(blocks())
    assert len(blocks()) >= 3
    named = set(re.findall(r"""from_pretrained\(["']([^"']+)["']""", code))
    assert named - {"exported", "elsewhere"} <= set(RUNS), named


def test_every_readme_python_block_runs(tmp_path):
    pytest.importorskip("diffusers")
    for name, (preset, sets) in RUNS.items():
        train(config_mod.resolve(preset, sets), tmp_path / name, progress=False)
    script = "\n\n".join(f"# --- README block {i + 1}\n{b}" for i, b in enumerate(blocks()))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
