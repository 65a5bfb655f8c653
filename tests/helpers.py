"""Helpers shared by test modules (imported as ``from helpers import ...``: pytest puts ``tests/`` on the path)."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess

import pytest
import torch

import torchdiffusion as td
from torchdiffusion.cli.main import main

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
PROGRESS = re.compile(r"\d+%\|")  # a tqdm bar (stderr): not an error line


def one_line_error(capsys, *argv: str) -> str:
    """``main(argv)`` in-process: exit status 2, one error line on stderr (progress bars aside), no traceback;
    returns the line."""
    capsys.readouterr()
    rc = main(list(argv))
    cap = capsys.readouterr()
    assert rc == 2, (argv, rc, cap.out, cap.err)
    assert "Traceback" not in cap.err + cap.out
    lines = [x for x in cap.err.strip().splitlines() if not PROGRESS.search(x)]
    assert len(lines) == 1 and lines[0].startswith("torchdiffusion: error: "), cap.err
    return lines[0]


def chromium() -> str:
    """The system Chromium, installed with apt-get when missing and we are root; else the test is skipped."""
    found = next((p for p in CHROMIUM if os.path.exists(p)), None) or shutil.which("chromium")
    if found:
        return found
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no system Chromium (/usr/bin/chromium) and not root with apt-get to install it: "
                    "run `apt-get install -y chromium` (Playwright cannot download its own browser here)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "chromium"]):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if cmd[1] == "install" and res.returncode == 0:
            break
    found = next((p for p in CHROMIUM if os.path.exists(p)), None)
    if not found:
        pytest.skip(f"`apt-get install -y chromium` failed: {(res.stderr or res.stdout).strip()[-300:]}")
    return found


def ring(K: int = 8, std: float = 0.075) -> td.GaussianMixture:
    """The exact 2-D ring of ``K`` Gaussians (float64), the cheap model of the grid-fit tests."""
    ang = torch.arange(K, dtype=torch.float64) * 2 * math.pi / K
    return td.GaussianMixture(torch.ones(K), torch.stack([ang.cos(), ang.sin()], 1), std**2)


class Counter:
    """Counts network calls (one per call, whatever the batch)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def launch_chromium(playwright, sync_api):
    """Headless Debian Chromium through a started Playwright (``sync_api.sync_playwright()``); the test is skipped,
    with the reason, when it does not start."""
    exe = chromium()
    try:
        return playwright.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
    except sync_api.Error as e:
        pytest.skip(f"Chromium at {exe} does not start under Playwright: {str(e).splitlines()[0]}")

