"""Helpers shared by test modules (imported as ``from helpers import ...``: pytest puts ``tests/`` on the path)."""

from __future__ import annotations

import re

from torchdiffusion.cli.main import main

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
