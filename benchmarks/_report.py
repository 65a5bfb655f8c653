"""The header lines every benchmark's results file starts with: the command, the date, the machine and versions.

Benchmarks import it as a sibling module (``python benchmarks/NAME.py`` puts ``benchmarks/`` on the path).
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch


def command(script: str, argv: list[str] | None = None) -> str:
    """``Command: `.venv/bin/python benchmarks/SCRIPT ARGS``` (the arguments of this invocation by default)."""
    args = " ".join(argv if argv is not None else sys.argv[1:])
    return f"Command: `.venv/bin/python benchmarks/{script}{' ' + args if args else ''}`"


def machine(t0: float, threads: str = "1 thread", load0: tuple[float, ...] | None = None) -> str:
    """The date, machine, python and torch versions, threads, load average (when ``load0``, taken at the start, is
    given) and the wall-clock seconds since ``t0``."""
    load = (f"load average {load0[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
            if load0 is not None else "")
    return (f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}; machine: `{' '.join(platform.uname())}`, "
            f"{os.cpu_count()} cores; python {sys.version.split()[0]}, torch {torch.__version__}; "
            f"{threads}; {load}total {time.time() - t0:.0f} s (shared machine: seconds are wall-clock under load).")


def write_results(out: Path, lines: list[str], notes: list[str] | None = None) -> None:
    """Write a results file: ``lines``, then the ``--note`` lines under "About this run:"; also print it."""
    if notes:
        lines = [*lines, "", "About this run:", *[f"- {n}" for n in notes]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
